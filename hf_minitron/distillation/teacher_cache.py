"""Offline teacher: run the teacher once over the training data, then distil from its stored outputs many times.

[`cache_teacher`] writes a `datasets.Dataset` (Arrow shards) that holds, next to each sample's token ids, what the KD
loss needs from the teacher, and [`DistillationTrainer`] given such a dataset (and no teacher) distils from it:

- `mode="hidden"` (exact): the teacher's final post-norm hidden state of every token (`teacher_hidden`, fp32 or bf16)
  and, once for the whole cache, the teacher's output layer (`teacher_lm_head.safetensors`). The fused KD loss
  recomputes the teacher's logits chunk by chunk from them ([`fused_kd_loss`]): the loss of a live teacher, up to the
  storage dtype, for every loss kind, temperature and `kd_top_k`. `hidden_size * 4` (fp32) or `* 2` (bf16) bytes per
  token.
- `mode="topk"`: per token the teacher's `top_k` most likely tokens (`teacher_topk_ids`), their log-probabilities at
  the cache's `temperature` (`teacher_topk_logprobs`) and the log of the remaining probability mass
  (`teacher_topk_rest`). The tail is one bucket: the divergence is taken between the `top_k + 1`-bucket distributions
  of teacher and student ([`topk_kd_loss`]), which for forward KL is a lower bound of the full KL and equals it at
  `top_k` = vocabulary size. `top_k * (2 + 4) + 4` bytes per token (uint16 ids, fp32 log-probabilities; 2-byte
  log-probabilities with `dtype="float16"` / `"bfloat16"`). With `compress=True` the log-probabilities are quantised
  to `dtype="uint8"` or `"uint16"` (within 0.049 or 1.9e-4 nats, see [`quantize_log_probs`]) and each sample's ids,
  codes and rest are stored in one blob (`teacher_topk_packed`, [`encode_topk`]): the ids' low bytes and the rest as
  they are, the ids' high parts and the codes (as differences between ranks) compressed losslessly with zstd: 135
  bytes of teacher values per token at k = 64 on the embedded SmolLM2 against `64 * 6 + 4` = 388 raw, and it reads
  faster than the raw cache; at most `top_k * (2 + 1) + 4` (uint8 codes; ids of a vocabulary over 65,536 take 3 or 5
  bytes, uint16 codes 2).
- `mode="sampled"` (Sparse Logit Sampling, [Anshumann et al., 2025](https://arxiv.org/abs/2503.16870)): per token
  `num_samples` = K tokens drawn with replacement from the teacher's distribution at the cache's `temperature`, kept
  as the distinct ids (`teacher_sample_ids`, uint16) and how often each came up (`teacher_sample_counts`, uint8), and
  the teacher's entropy (`teacher_entropy`). With `p^ = counts / K` the loss `-sum p^ log q` has an unbiased gradient
  of the forward KL ([`sampled_kd_loss`]): noisier than the exact loss, but not biased towards the head of the
  distribution as a top-k cache is. At most `K * (2 + 1) + 4` bytes per token, fewer the more peaked the teacher (a
  confident position repeats its token). The draws come from a generator seeded from `seed` and each shard's data.

The teacher columns are flat lists (`[tokens * hidden_size]`, `[tokens * top_k]`, one entry per position of
`input_ids`: position t holds the teacher's prediction of token t + 1; the sampled ids and counts, position after
position, need no boundaries since each position's counts sum to K, see [`unpack_samples`]); bf16 values are stored
as their uint16 bit patterns (Arrow has no bf16). [`load_teacher_cache`] (or `datasets.load_from_disk`) returns the
dataset with numpy formatting.

Writing ([`teacher_cache_writer`]) streams shard by shard into a work folder that survives a kill (a rerun computes
only the missing shards) and runs under `torch.distributed` with one shard in N per process; the on-disk format, its
fingerprints and the checks of a cache before it is read are in [`teacher_cache_format`]; what the trainer reads, in
[`teacher_cache_reader`]. This module holds the entry point and the check of its arguments, and keeps every name
importable from `hf_minitron.distillation.teacher_cache`.
"""

import itertools
import os

from ..output_lock import output_locks
from .teacher_cache_format import (
    CACHE_INFO_NAME,
    COMPRESS_CODEC,
    ENTROPY,
    FORMAT_VERSION,
    HIDDEN,
    LM_HEAD_NAME,
    MAX_NUM_SAMPLES,
    MODES,
    QUANTIZED_DTYPES,
    QUANTIZED_LOG_PROB_MIN,
    SAMPLE_COUNTS,
    SAMPLE_IDS,
    SETTINGS_NAME,
    STORAGE_DTYPES,
    TEACHER_COLUMNS,
    TOPK_IDS,
    TOPK_LOGPROBS,
    TOPK_PACKED,
    TOPK_QUANTIZED,
    TOPK_REST,
    cache_directory,
    check_cache_files,
    check_teacher_cache,
    data_fingerprint,
    decode_topk,
    dequantize_log_probs,
    encode_topk,
    id_bits,
    is_teacher_cache,
    load_teacher_cache,
    quantize_log_probs,
    read_cache_info,
    teacher_fingerprint,
    tokenizer_fingerprint,
    unpack_samples,
)
from .teacher_cache_reader import CachedTeacher, collate_teacher_columns
from .teacher_cache_writer import draw_samples, estimated_cache_bytes, write_teacher_cache


__all__ = [
    "CACHE_INFO_NAME", "COMPRESS_CODEC", "ENTROPY", "FORMAT_VERSION", "HIDDEN", "LM_HEAD_NAME", "MAX_NUM_SAMPLES", "MODES",
    "QUANTIZED_DTYPES", "QUANTIZED_LOG_PROB_MIN", "SAMPLE_COUNTS", "SAMPLE_IDS", "SETTINGS_NAME", "STORAGE_DTYPES",
    "TEACHER_COLUMNS", "TOPK_IDS", "TOPK_LOGPROBS", "TOPK_PACKED", "TOPK_QUANTIZED", "TOPK_REST", "CachedTeacher",
    "cache_directory", "cache_teacher", "check_cache_files", "check_teacher_cache", "collate_teacher_columns",
    "data_fingerprint", "decode_topk", "dequantize_log_probs", "draw_samples", "encode_topk", "estimated_cache_bytes",
    "id_bits", "is_teacher_cache", "load_teacher_cache", "quantize_log_probs", "read_cache_info", "teacher_fingerprint",
    "tokenizer_fingerprint", "unpack_samples",
]  # fmt: skip


def _settings(
    teacher, mode, top_k, num_samples, seed, compress, dtype, temperature, tokenizer, vocab_size, shard_size,
    with_labels,
) -> dict:  # fmt: skip
    head = teacher.get_output_embeddings()
    vocab = vocab_size or head.weight.shape[0]
    return {
        "format_version": FORMAT_VERSION,
        "mode": mode,
        "dtype": dtype,
        "top_k": top_k if mode == "topk" else None,
        "num_samples": num_samples if mode == "sampled" else None,
        "seed": seed if mode == "sampled" else None,
        # Absent from older caches: compare as None, like an uncompressed cache's.
        "compress": COMPRESS_CODEC if compress else None,
        "temperature": float(temperature) if mode != "hidden" else None,
        "vocab_size": vocab,
        "id_dtype": "uint16" if vocab <= 2**16 else "int32",
        "hidden_size": head.weight.shape[1],
        "teacher_softcap": getattr(teacher.config.get_text_config(), "final_logit_softcapping", None),
        "teacher_bias": head.bias is not None,
        "shard_size": shard_size,
        "with_labels": with_labels,
        "teacher": teacher_fingerprint(teacher),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }


def _check_arguments(
    mode, top_k, num_samples, seed, compress, dtype, temperature, batch_size, shard_size, vocab_size, teacher
) -> None:
    if mode not in MODES:
        raise ValueError(f"cache_teacher mode={mode!r} is not supported: choose one of {list(MODES)}.")
    if compress and mode != "topk":
        raise ValueError(f"cache_teacher compress=True is for mode='topk': drop it (mode={mode!r}).")
    if compress and dtype not in QUANTIZED_DTYPES:
        raise ValueError(
            f"cache_teacher compress=True quantises the top-k log-probabilities: pass dtype='uint8' (within 0.049 "
            f"nats) or dtype='uint16' (within 1.9e-4 nats), not dtype={dtype!r}."
        )
    allowed = ("float32", "bfloat16") if mode == "hidden" else STORAGE_DTYPES
    if not compress and dtype not in allowed:
        raise ValueError(
            f"cache_teacher dtype={dtype!r} is not supported for mode={mode!r}: choose one of {list(allowed)} (hidden "
            "states may exceed the float16 range)."
        )
    if mode == "topk" and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k <= 0):
        raise ValueError(
            f"cache_teacher mode='topk' needs top_k, a positive number of tokens per position (got {top_k!r}); e.g. "
            "top_k=128, or the vocabulary size for the exact loss."
        )
    if mode != "topk" and top_k is not None:
        raise ValueError(f"cache_teacher top_k is for mode='topk': drop it (mode={mode!r}).")
    if mode == "sampled" and (
        not isinstance(num_samples, int) or isinstance(num_samples, bool) or not 0 < num_samples <= MAX_NUM_SAMPLES
    ):
        raise ValueError(
            f"cache_teacher mode='sampled' needs num_samples, the tokens drawn per position, from 1 to "
            f"{MAX_NUM_SAMPLES} (stored as uint8 counts), got {num_samples!r}; e.g. num_samples=12."
        )
    if mode != "sampled" and num_samples is not None:
        raise ValueError(f"cache_teacher num_samples is for mode='sampled': drop it (mode={mode!r}).")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"cache_teacher seed={seed!r} is invalid: use a non-negative integer.")
    if not temperature > 0:
        raise ValueError(f"cache_teacher temperature={temperature!r} is invalid: use a positive number (1.0).")
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"cache_teacher {name}={value!r} is invalid: use a positive integer.")
    rows = teacher.get_output_embeddings().weight.shape[0]
    if vocab_size is not None and not 0 < vocab_size <= rows:
        raise ValueError(
            f"cache_teacher vocab_size={vocab_size!r} is invalid: use at most the teacher's {rows} output rows (the "
            "student's vocabulary when the teacher's is padded), or None."
        )


def _first_row(dataset):
    """The first sample, and the dataset to iterate from the start (a one-pass iterator is chained back)."""
    if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        return (dataset[0] if len(dataset) else None), dataset
    iterator = iter(dataset)
    first = next(iterator, None)
    return first, (dataset if hasattr(dataset, "features") else itertools.chain([first], iterator))


def cache_teacher(
    teacher,
    dataset,
    output_dir: str | os.PathLike,
    mode: str = "hidden",
    top_k: int | None = None,
    num_samples: int | None = None,
    dtype: str = "float32",
    temperature: float = 1.0,
    tokenizer=None,
    batch_size: int = 8,
    shard_size: int = 256,
    vocab_size: int | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    seed: int = 0,
    compress: bool = False,
):
    """Runs `teacher` once over `dataset` and writes its outputs as a `datasets.Dataset` in `output_dir`.

    Args:
        teacher (`PreTrainedModel`): a `*ForCausalLM` with a linear output layer; its weights are not changed.
        dataset (`datasets.Dataset`, `IterableDataset` or iterable of samples): tokenized samples (`input_ids`,
            optionally `attention_mask` and `labels`), e.g. from [`load_text_datasets`]. Streamed: it may be larger
            than memory.
        output_dir (`str` or `os.PathLike`): the cache directory, written atomically. An existing cache of the same
            teacher, data and settings is returned as is (no teacher pass).
        mode (`str`, *optional*, defaults to `"hidden"`): `"hidden"` (exact), `"topk"` or `"sampled"` (see the module
            docstring).
        top_k (`int`, *optional*): tokens per position of `mode="topk"` (the vocabulary size gives the exact loss).
        num_samples (`int`, *optional*): tokens drawn per position by `mode="sampled"` (1 to 255).
        dtype (`str`, *optional*, defaults to `"float32"`): storage dtype of the hidden states (`"float32"` or
            `"bfloat16"`), of the top-k log-probabilities or of the sampled mode's entropies (also `"float16"`).
        temperature (`float`, *optional*, defaults to `1.0`): `mode="topk"` stores `log_softmax(logits /
            temperature)`, `mode="sampled"` draws from `softmax(logits / temperature)`; distil with the same
            `kd_temperature`.
        tokenizer (*optional*): recorded in the fingerprint, so that a student with another tokenizer is refused.
        batch_size (`int`, *optional*, defaults to `8`): samples per teacher forward.
        shard_size (`int`, *optional*, defaults to `256`): samples per Arrow shard (the unit of resumption).
        vocab_size (`int`, *optional*): the student's vocabulary size when the teacher's output layer is padded
            beyond it (`mode="topk"` normalises over these tokens, as the trainer does with a live teacher).
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing cache made with other settings.
        show_progress (`bool`, *optional*, defaults to `True`): a progress bar (samples).
        seed (`int`, *optional*, defaults to `0`): seed of the draws of `mode="sampled"`: the same seed, teacher and
            data give the same cache (on any device, in any number of processes).
        compress (`bool`, *optional*, defaults to `False`): `mode="topk"` only: log-probabilities quantised to
            `dtype="uint8"` or `"uint16"` (see [`quantize_log_probs`] for the error bound), ids and codes compressed
            losslessly (zstd, see [`encode_topk`]).

    Returns:
        `datasets.Dataset`: the cache, as [`load_teacher_cache`] returns it.

    Holds the output lock of every folder it writes (one writer per folder, see `output_lock.py`).
    """
    with output_locks(output_dir):
        _check_arguments(
            mode, top_k, num_samples, seed, compress, dtype, temperature, batch_size, shard_size, vocab_size, teacher
        )
        first, dataset = _first_row(dataset)
        if first is None:
            raise ValueError("cache_teacher got an empty dataset: pass at least one tokenized sample.")
        with_labels = isinstance(first, dict) and first.get("labels") is not None
        settings = _settings(
            teacher, mode, top_k, num_samples, seed, compress, dtype, temperature, tokenizer, vocab_size, shard_size,
            with_labels,
        )  # fmt: skip
        return write_teacher_cache(teacher, dataset, first, settings, output_dir, batch_size, overwrite, show_progress)
