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
  log-probabilities with `dtype="float16"` / `"bfloat16"`). With `compress=True` the ids are bit-packed to
  `ceil(log2(vocab_size))` bits (`teacher_topk_packed_ids`) and the log-probabilities quantised to `dtype="uint8"` or
  `"uint16"` (`teacher_topk_quantized_logprobs`, within 0.049 or 1.9e-4 nats, see [`quantize_log_probs`]):
  `top_k * (bits / 8 + 1 or 2) + 4` bytes per token.
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

`teacher_cache.json` holds a fingerprint of the teacher's weights (a sample of every tensor), the tokenizer's
vocabulary, the data (every sample's ids) and the sequence length: a cache is refused for another teacher (teacher
correction changes the teacher), tokenizer or data, with an error naming what differs.

Writing is streamed shard by shard (`shard_size` samples each, a file written aside and renamed) into a hidden
`.{name}.partial` sibling that survives a kill: rerunning the same call computes only the missing shards. The
finished cache is moved into place atomically ([`atomic_directory`]). Under `torch.distributed` (e.g. `accelerate
launch`), process r writes shards r, r + N, r + 2N, ... with its own full copy of the teacher: the result is the
one-process cache.

One module, past 500 lines: writing a cache and reading it back (the `CachedTeacher`) share one on-disk format, its
fingerprints and its checks; split, a change to the format would have to be made in two places that tests could not
keep in step.
"""

import hashlib
import itertools
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..fingerprints import weights_fingerprint
from ..io import (
    atomic_directory,
    atomic_write_json,
    check_free_space,
    check_not_overlapping,
    check_output_dir,
    format_bytes,
    resolve_output_path,
)
from ..output_lock import output_locks
from .losses import (
    CHUNK_BYTES,
    LOG_PROB_FLOOR,
    chunk_rows,
    fused_sampled_kd_loss_with_options,
    fused_topk_kd_loss_with_options,
    kd_loss,
    sampled_kd_loss,
    topk_kd_loss,
)
from .teachers import Teacher, TeacherOutput


logger = logging.getLogger(__name__)

CACHE_INFO_NAME = "teacher_cache.json"
LM_HEAD_NAME = "teacher_lm_head.safetensors"
SETTINGS_NAME = "settings.json"
FORMAT_VERSION = 1
MODES = ("hidden", "topk", "sampled")
STORAGE_DTYPES = ("float32", "bfloat16", "float16")
HIDDEN = "teacher_hidden"
TOPK_IDS = "teacher_topk_ids"
TOPK_LOGPROBS = "teacher_topk_logprobs"
TOPK_REST = "teacher_topk_rest"
SAMPLE_IDS = "teacher_sample_ids"
SAMPLE_COUNTS = "teacher_sample_counts"
ENTROPY = "teacher_entropy"
TOPK_PACKED_IDS = "teacher_topk_packed_ids"
TOPK_QUANTIZED = "teacher_topk_quantized_logprobs"
TEACHER_COLUMNS = (
    HIDDEN, TOPK_IDS, TOPK_LOGPROBS, TOPK_REST, TOPK_PACKED_IDS, TOPK_QUANTIZED, SAMPLE_IDS, SAMPLE_COUNTS, ENTROPY
)  # fmt: skip
QUANTIZED_DTYPES = ("uint8", "uint16")
# Quantised log-probabilities cover [QUANTIZED_LOG_PROB_MIN, 0] in 2**bits - 1 equal steps (see `quantize_log_probs`).
QUANTIZED_LOG_PROB_MIN = -25.0
# Counts are stored as uint8.
MAX_NUM_SAMPLES = 255


# ---------------------------------------------------------------------------------------------- fingerprints
def teacher_fingerprint(teacher) -> str | None:
    """[`~hf_minitron.fingerprints.weights_fingerprint`] of the teacher: any training (teacher correction) changes it;
    loading the same weights in another dtype does not."""
    return weights_fingerprint(teacher)


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A hash of the tokenizer's vocabulary (token -> id), or `None` without a tokenizer."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
    if tokenizer is None:
        return None
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def _rows(dataset):
    """`{"input_ids", "attention_mask", "labels" (or None)}` 1-D tensors of every sample of `dataset`."""
    for item in dataset:
        if not isinstance(item, dict) or "input_ids" not in item:
            raise ValueError(
                "cache_teacher needs tokenized samples (mappings with 'input_ids', optionally 'attention_mask' and "
                f"'labels'), got {type(item).__name__}: tokenize the text first, e.g. with hf_minitron.data.pack_texts."
            )
        ids = torch.as_tensor(np.asarray(item["input_ids"]), dtype=torch.long).reshape(-1)
        mask = item.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(np.asarray(mask), dtype=torch.long)
        labels = item.get("labels")
        labels = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise ValueError("cache_teacher got a sample with no tokens: drop empty samples from the dataset.")
        yield {"input_ids": ids, "attention_mask": mask.reshape(-1), "labels": labels}


def _shard_hash(rows: list[dict]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        for key in ("input_ids", "attention_mask", "labels"):
            value = row[key]
            digest.update(b"-" if value is None else value.numpy().astype(np.int64).tobytes())
    return digest.hexdigest()[:16]


def _data_fingerprint(shards: list[dict]) -> dict:
    digest = hashlib.sha256("".join(s["data_hash"] for s in shards).encode())
    return {
        "samples": sum(s["samples"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "hash": digest.hexdigest()[:16],
    }


def data_fingerprint(dataset, shard_size: int) -> dict:
    """`{"samples", "tokens", "hash", "seq_length"}` of a tokenized dataset, as [`cache_teacher`] records it."""
    shards, seq_length = [], 0
    for rows in _batched(_rows(dataset), shard_size):
        seq_length = max(seq_length, *(r["input_ids"].numel() for r in rows))
        shards.append({"samples": len(rows), "tokens": sum(r["input_ids"].numel() for r in rows)})
        shards[-1]["data_hash"] = _shard_hash(rows)
    return {**_data_fingerprint(shards), "seq_length": seq_length}


def _batched(iterable, size: int):
    iterator = iter(iterable)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


# ---------------------------------------------------------------------------------------------- reading
def read_cache_info(directory: str | os.PathLike) -> dict:
    """The `teacher_cache.json` of a cache directory."""
    path = Path(directory) / CACHE_INFO_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(directory)!r} is not a teacher cache (no {CACHE_INFO_NAME}): write one with "
            "hf_minitron.cache_teacher(teacher, dataset, output_dir) or `hf-minitron cache-teacher`."
        )
    info = json.loads(path.read_text(encoding="utf-8"))
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"The teacher cache {str(directory)!r} has format version {info.get('format_version')!r}, this "
            f"hf-minitron reads version {FORMAT_VERSION}: rewrite the cache with this version (cache_teacher)."
        )
    return info


def is_teacher_cache(dataset) -> bool:
    """Whether `dataset` has the columns of a teacher cache."""
    columns = getattr(dataset, "column_names", None) or []
    return any(name in columns for name in TEACHER_COLUMNS)


def cache_directory(dataset) -> Path:
    """The directory of the teacher cache whose Arrow files back `dataset` (also after `select` or `shuffle`)."""
    for cache_file in getattr(dataset, "cache_files", None) or []:
        directory = Path(cache_file["filename"]).parent
        if (directory / CACHE_INFO_NAME).is_file():
            return directory
    raise ValueError(
        "This dataset has teacher-cache columns but is not backed by the files of a teacher cache (was it rebuilt "
        "with map() or from_dict()?), so the teacher's cache settings and output layer cannot be found: pass the "
        "dataset returned by load_teacher_cache(cache_dir) or cache_teacher(...)."
    )


def check_teacher_cache(cache, teacher=None, tokenizer=None, dataset=None, seq_length: int | None = None) -> dict:
    """Refuses a teacher cache made from another teacher, tokenizer, data or sequence length than those given.

    Args:
        cache (`str`, `os.PathLike` or `datasets.Dataset`): the cache directory, or the dataset loaded from it.
        teacher (`PreTrainedModel`, *optional*): the teacher the cache should come from.
        tokenizer (*optional*): the tokenizer the cache should have been made with.
        dataset (*optional*): the tokenized samples the cache should hold.
        seq_length (`int`, *optional*): the longest sample length the cache should hold.

    Returns:
        `dict`: the cache's `teacher_cache.json`.

    Raises:
        `ValueError`: naming what differs and how to fix it.
    """
    directory = cache_directory(cache) if hasattr(cache, "cache_files") else Path(cache)
    info = read_cache_info(directory)
    saved = info["fingerprint"]
    fix = (
        f"Rewrite the cache (cache_teacher(..., overwrite=True) or a new output_dir), or use the {{}} it was made "
        f"from. Cache: {str(directory)!r}."
    )
    if teacher is not None and teacher_fingerprint(teacher) != saved["teacher"]:
        raise ValueError(
            f"The teacher cache was written from another teacher (weights fingerprint {saved['teacher']}, this "
            f"teacher's is {teacher_fingerprint(teacher)}): training the teacher (teacher correction) changes its "
            "outputs. " + fix.format("teacher")
        )
    if (
        tokenizer is not None
        and saved["tokenizer"] is not None
        and tokenizer_fingerprint(tokenizer) != saved["tokenizer"]
    ):
        raise ValueError(
            f"The teacher cache was made with another tokenizer (vocabulary fingerprint {saved['tokenizer']}, this "
            f"one's is {tokenizer_fingerprint(tokenizer)}): logit distillation compares token ids. "
            + fix.format("tokenizer")
        )
    if seq_length is not None and seq_length != saved["seq_length"]:
        raise ValueError(
            f"The teacher cache holds samples of up to {saved['seq_length']} tokens, not seq_length={seq_length}. "
            + fix.format("sequence length")
        )
    if dataset is not None:
        given = data_fingerprint(dataset, info["shard_size"])
        if given != saved["data"] | {"seq_length": saved["seq_length"]}:
            raise ValueError(
                f"The teacher cache holds other data ({saved['data']['samples']} samples, {saved['data']['tokens']} "
                f"tokens, fingerprint {saved['data']['hash']}; the given data: {given['samples']} samples, "
                f"{given['tokens']} tokens, fingerprint {given['hash']}). " + fix.format("data")
            )
    return info


def load_teacher_cache(
    directory: str | os.PathLike, teacher=None, tokenizer=None, dataset=None, seq_length: int | None = None
):
    """The `datasets.Dataset` of a teacher cache (numpy-formatted), checked against what is given.

    Args:
        directory (`str` or `os.PathLike`): written by [`cache_teacher`].
        teacher, tokenizer, dataset, seq_length (*optional*): see [`check_teacher_cache`].

    Returns:
        `datasets.Dataset`: `input_ids`, `attention_mask` (and `labels` when the data had them) and the teacher
        columns; pass it as `train_dataset` to a [`DistillationTrainer`] without a teacher.
    """
    from datasets import load_from_disk

    check_teacher_cache(directory, teacher, tokenizer, dataset, seq_length)
    return load_from_disk(str(directory))


# ---------------------------------------------------------------------------------------------- the teacher's outputs
def _collate(rows: list[dict], device) -> dict:
    length = max(r["input_ids"].numel() for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : r["input_ids"].numel()] = r["input_ids"]
        mask[i, : r["input_ids"].numel()] = r["attention_mask"]
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


@torch.no_grad()
def _final_hidden(teacher, rows: list[dict]) -> torch.Tensor:
    """The teacher's post-norm final hidden states `[batch, length, hidden]` of right-padded `rows`; the lm_head is
    handed an empty slice (as the trainer's fused loss does), so no logits are computed."""
    captured = {}

    def hook(head, args):
        captured["hidden"] = args[0]
        return (args[0][:, :0],) + tuple(args[1:])

    handle = teacher.get_output_embeddings().register_forward_pre_hook(hook)
    try:
        teacher(**_collate(rows, next(teacher.parameters()).device), use_cache=False)
    finally:
        handle.remove()
    return captured["hidden"]


@torch.no_grad()
def _topk(hidden, head, softcap, vocab_size, top_k, temperature):
    """`(ids, log_probs, rest)` of the teacher's `top_k` tokens for `hidden` `[tokens, hidden]`, chunk by chunk."""
    results = []
    vocab = vocab_size or head.weight.shape[0]
    for chunk in hidden.split(chunk_rows(vocab)):
        logits = F.linear(chunk, head.weight[:vocab], None if head.bias is None else head.bias[:vocab]).float()
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        log_p = torch.log_softmax(logits / temperature, -1)
        values, ids = log_p.topk(min(top_k, vocab), -1)
        if top_k < vocab:
            rest = log_p.scatter_(-1, ids, float("-inf")).logsumexp(-1)
        else:
            rest = torch.full_like(values[:, 0], LOG_PROB_FLOOR)
        results.append((ids, values.clamp_min(LOG_PROB_FLOOR), rest.clamp_min(LOG_PROB_FLOOR)))
    return tuple(torch.cat(parts) for parts in zip(*results))


def draw_samples(log_probs: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`K` draws with replacement from each row's distribution, by inversion of its CDF, as distinct tokens and counts.

    Inversion (not `torch.multinomial`) with uniforms drawn by the caller makes a cache independent of the device
    and of the chunking; the CDF is summed in float64 so that tokens far below fp32's resolution of 1 keep their
    probability (a token of probability 0 is never drawn).

    Args:
        log_probs (`torch.Tensor` of shape `[rows, vocab]`): Log-probabilities.
        uniforms (`torch.Tensor` of shape `[rows, K]`): Independent uniforms in `[0, 1)` (float64).

    Returns:
        `tuple(torch.Tensor, torch.Tensor, torch.Tensor)`: `ids [n]` (int64) and `counts [n]` (int64) of the distinct
        tokens of every row, row after row and in increasing id within a row, and `distinct [rows]`, how many each
        row has (each row's counts sum to `K`).
    """
    rows, k = uniforms.shape
    cdf = log_probs.double().exp().cumsum(-1)
    x = uniforms.to(cdf.device, torch.float64) * cdf[:, -1:]
    ids = torch.searchsorted(cdf, x, right=True).clamp_max_(cdf.shape[-1] - 1).sort(-1).values.reshape(-1)
    first = torch.ones_like(ids, dtype=torch.bool)
    first.view(rows, k)[:, 1:] = ids.view(rows, k)[:, 1:] != ids.view(rows, k)[:, :-1]
    starts = first.nonzero().squeeze(-1)
    counts = torch.diff(starts, append=starts.new_tensor([ids.numel()]))
    return ids[starts], counts, first.view(rows, k).sum(-1)


def unpack_samples(ids, counts, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample's stored `(ids [n], counts [n])` (as [`draw_samples`] gives them, for its `tokens` positions) as
    `(ids [tokens, w], counts [tokens, w])` (int64), `w` the most distinct tokens of a position, padded with count 0.

    Every position's counts sum to `num_samples`, so the positions need no stored boundaries: the entries of position
    t are those whose running count lies in `(K t, K (t + 1)]`.
    """
    ids, counts = torch.as_tensor(np.asarray(ids)).long(), torch.as_tensor(np.asarray(counts)).long()
    total = int(counts.sum())
    tokens = total // num_samples
    if tokens * num_samples != total or bool((counts <= 0).any()):
        raise ValueError(
            f"A sampled teacher cache's counts sum to {total}, not a multiple of num_samples={num_samples} (or hold a "
            "zero): the cache is damaged, rewrite it (cache_teacher(..., overwrite=True))."
        )
    position = (counts.cumsum(0) - 1) // num_samples
    starts = torch.searchsorted(position, torch.arange(tokens))
    slot = torch.arange(ids.numel()) - starts[position]
    width = int(slot.max()) + 1 if ids.numel() else 1
    dense_ids, dense_counts = ids.new_zeros(tokens, width), counts.new_zeros(tokens, width)
    dense_ids[position, slot], dense_counts[position, slot] = ids, counts
    return dense_ids, dense_counts


@torch.no_grad()
def _sample(hidden, head, softcap, vocab_size, uniforms, temperature):
    """`draw_samples` of the teacher's distributions at `temperature` for `hidden` `[tokens, hidden]`, chunk by chunk,
    and their entropies `[tokens]` (nats)."""
    results = []
    vocab = vocab_size or head.weight.shape[0]
    rows = max(1, CHUNK_BYTES // (16 * vocab))  # fp32 logits and log-probabilities, the float64 CDF
    for start in range(0, hidden.shape[0], rows):
        chunk = hidden[start : start + rows]
        logits = F.linear(chunk, head.weight[:vocab], None if head.bias is None else head.bias[:vocab]).float()
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        log_p = torch.log_softmax(logits / temperature, -1)
        entropy = torch.special.entr(log_p.exp()).sum(-1)
        results.append((*draw_samples(log_p, uniforms[start : start + rows]), entropy))
    return tuple(torch.cat(parts) for parts in zip(*results))


def _sample_seed(seed: int, data_hash: str) -> int:
    """The generator seed of a shard: from the cache's `seed` and the shard's data, not its index or process, so that
    a resumed or distributed write draws what one uninterrupted process does."""
    return int(hashlib.sha256(f"{seed}-{data_hash}".encode()).hexdigest()[:15], 16)


def _to_storage(values: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return values.to("cpu", torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return values.to("cpu", getattr(torch, dtype)).numpy()


def id_bits(vocab_size: int) -> int:
    """Bits of a bit-packed token id: `ceil(log2(vocab_size))` (16 for SmolLM2's 49152 tokens, 7 for 96)."""
    return max(1, (vocab_size - 1).bit_length())


def pack_ids(ids: torch.Tensor, bits: int) -> np.ndarray:
    """`ids` (any shape, each `< 2**bits`) as a little-endian bit stream of `bits` bits per id, `ceil(n * bits / 8)`
    uint8 bytes."""
    flat = ids.reshape(-1).cpu().long()
    stream = (flat[:, None] >> torch.arange(bits)) & 1
    return np.packbits(stream.numpy().astype(np.uint8).reshape(-1), bitorder="little")


def unpack_ids(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first `count` ids `[..., count]` (int64) of bit streams `packed` `[..., bytes]` (uint8, zero-padded) written
    by [`pack_ids`]."""
    stream = (packed.long()[..., None] >> torch.arange(8, device=packed.device)) & 1
    stream = stream.flatten(-2)
    if stream.shape[-1] < count * bits:
        stream = F.pad(stream, (0, count * bits - stream.shape[-1]))
    stream = stream[..., : count * bits].unflatten(-1, (count, bits))
    return (stream << torch.arange(bits, device=packed.device)).sum(-1)


def quantize_log_probs(log_probs: torch.Tensor, dtype: str) -> np.ndarray:
    """Log-probabilities as `uint8` / `uint16` codes of `Q = 2**bits - 1` equal steps over `[m, 0]`, `m =
    QUANTIZED_LOG_PROB_MIN`, rounded to the nearest: [`dequantize_log_probs`] gives back `log p` within half a step,
    `|m| / (2 Q)` (0.049 nats for uint8, i.e. each probability within 5%, and 1.9e-4 for uint16) where `log p >= m`;
    below, `m` (`p < exp(m) = 1.4e-11`)."""
    levels = np.iinfo(dtype).max
    codes = ((log_probs.float().clamp(QUANTIZED_LOG_PROB_MIN, 0) / -QUANTIZED_LOG_PROB_MIN + 1) * levels).round()
    return codes.cpu().numpy().astype(dtype)


def dequantize_log_probs(codes: torch.Tensor, dtype: str) -> torch.Tensor:
    """The fp32 log-probabilities of [`quantize_log_probs`]'s `codes`."""
    return (codes.float() / np.iinfo(dtype).max - 1) * -QUANTIZED_LOG_PROB_MIN


def _features(mode: str, dtype: str, id_dtype: str, with_labels: bool, compress: bool = False):
    from datasets import Features, List, Value

    stored = "uint16" if dtype == "bfloat16" else dtype
    columns = {"input_ids": List(Value("int32")), "attention_mask": List(Value("int8"))}
    if with_labels:
        columns["labels"] = List(Value("int32"))
    if mode == "hidden":
        columns[HIDDEN] = List(Value(stored))
    elif compress:
        columns.update({TOPK_PACKED_IDS: List(Value("uint8")), TOPK_QUANTIZED: List(Value(dtype)), TOPK_REST: List(Value("float32"))})  # fmt: skip
    elif mode == "sampled":
        columns.update({SAMPLE_IDS: List(Value(id_dtype)), SAMPLE_COUNTS: List(Value("uint8")), ENTROPY: List(Value(stored))})  # fmt: skip
    else:
        columns.update({TOPK_IDS: List(Value(id_dtype)), TOPK_LOGPROBS: List(Value(stored)), TOPK_REST: List(Value("float32"))})  # fmt: skip
    return Features(columns)


def _list_array(parts: list[np.ndarray]):
    import pyarrow as pa

    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([p.size for p in parts], out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError("cache_teacher: one batch holds over 2**31 values per column; use a smaller batch_size.")
    values = np.concatenate([p.reshape(-1) for p in parts])
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def _write_shard(teacher, rows, path: Path, settings: dict, batch_size: int) -> dict:
    """Runs the teacher on one shard and writes it to `path` (through a temporary file): its sidecar entry."""
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    mode, dtype = settings["mode"], settings["dtype"]
    with_labels = settings["with_labels"]
    features = _features(mode, dtype, settings["id_dtype"], with_labels, settings.get("compress") or False)
    head = teacher.get_output_embeddings()
    if mode == "sampled":
        generator = torch.Generator().manual_seed(_sample_seed(settings["seed"], _shard_hash(rows)))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    teacher_bytes = 0
    try:
        with ArrowWriter(features=features, path=str(tmp)) as writer:
            for batch in _batched(rows, batch_size):
                hidden = _final_hidden(teacher, batch)
                lengths = [r["input_ids"].numel() for r in batch]
                columns = {
                    "input_ids": [r["input_ids"].numpy().astype(np.int32) for r in batch],
                    "attention_mask": [r["attention_mask"].numpy().astype(np.int8) for r in batch],
                }
                if with_labels:
                    columns["labels"] = [r["labels"].numpy().astype(np.int32) for r in batch]
                states = torch.cat([hidden[i, :n] for i, n in enumerate(lengths)])  # drop the padding
                if mode == "hidden":
                    columns[HIDDEN] = np.split(_to_storage(states, dtype), np.cumsum(lengths)[:-1])
                elif mode == "sampled":
                    # Sample by sample, so that the draws do not depend on batch_size.
                    k = settings["num_samples"]
                    uniforms = torch.cat([torch.rand(n, k, dtype=torch.float64, generator=generator) for n in lengths])
                    ids, counts, distinct, entropy = _sample(
                        states, head, settings["teacher_softcap"], settings["vocab_size"], uniforms,
                        settings["temperature"],
                    )  # fmt: skip
                    entries = np.cumsum([int(d.sum()) for d in distinct.split(lengths)])[:-1]
                    columns[SAMPLE_IDS] = np.split(ids.cpu().numpy().astype(settings["id_dtype"]), entries)
                    columns[SAMPLE_COUNTS] = np.split(counts.cpu().numpy().astype(np.uint8), entries)
                    columns[ENTROPY] = np.split(_to_storage(entropy, dtype), np.cumsum(lengths)[:-1])
                else:
                    ids, log_probs, rest = _topk(
                        states, head, settings["teacher_softcap"], settings["vocab_size"], settings["top_k"],
                        settings["temperature"],
                    )  # fmt: skip
                    splits = np.cumsum(lengths)[:-1]
                    if settings["compress"]:
                        bits = id_bits(settings["vocab_size"])
                        columns[TOPK_PACKED_IDS] = [pack_ids(part, bits) for part in ids.split(lengths)]
                        columns[TOPK_QUANTIZED] = np.split(quantize_log_probs(log_probs, dtype), splits)
                    else:
                        columns[TOPK_IDS] = np.split(ids.cpu().numpy().astype(settings["id_dtype"]), splits)
                        columns[TOPK_LOGPROBS] = np.split(_to_storage(log_probs, dtype), splits)
                    columns[TOPK_REST] = np.split(rest.cpu().numpy().astype(np.float32), splits)
                teacher_bytes += sum(part.nbytes for name in TEACHER_COLUMNS for part in columns.get(name, ()))
                arrays = [_list_array(columns[name]) for name in features]
                writer.write_table(pa.Table.from_arrays(arrays, names=list(features)))
            writer.finalize()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"file": path.name, "bytes": path.stat().st_size, "teacher_bytes": teacher_bytes}


# ---------------------------------------------------------------------------------------------- writing
def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _distributed()[1] > 1:
        torch.distributed.barrier()


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
        "compress": True if compress else None,
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


def estimated_cache_bytes(settings: dict, samples: int, seq_length: int) -> int:
    """Bytes a cache of `samples` rows of `seq_length` tokens will take with these settings (Arrow's per-row
    overhead aside): every position's stored values, the labels, and the teacher's output layer for `hidden` mode."""
    value_bytes = {"float32": 4, "bfloat16": 2, "float16": 2, "uint16": 2, "uint8": 1}[settings["dtype"]]
    id_bytes = 2 if settings["id_dtype"] == "uint16" else 4
    if settings["mode"] == "hidden":
        per_token = settings["hidden_size"] * value_bytes
        head = settings["vocab_size"] * settings["hidden_size"] * 4  # saved in float32
    elif settings["mode"] == "sampled":
        per_token = settings["num_samples"] * (id_bytes + 1) + value_bytes  # at most K distinct ids, the entropy
        head = 0
    elif settings.get("compress"):
        per_token = settings["top_k"] * (id_bits(settings["vocab_size"]) / 8 + value_bytes) + 4
        head = 0
    else:
        per_token = settings["top_k"] * (id_bytes + value_bytes) + value_bytes  # ids, log-probs, the rest's mass
        head = 0
    per_token += 4 * (2 if settings["with_labels"] else 1)  # input ids, labels
    return int(samples * seq_length * per_token) + head


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
        compress (`bool`, *optional*, defaults to `False`): `mode="topk"` only: ids bit-packed to
            `ceil(log2(vocab_size))` bits and log-probabilities quantised to `dtype="uint8"` or `"uint16"` (see
            [`quantize_log_probs`] for the error bound).

    Returns:
        `datasets.Dataset`: the cache, as [`load_teacher_cache`] returns it.

    Holds the output lock of every folder it writes (one writer per folder, see `output_lock.py`).
    """
    with output_locks(output_dir):
        return _cache_teacher(
            teacher,
            dataset,
            output_dir,
            mode,
            top_k,
            num_samples,
            dtype,
            temperature,
            tokenizer,
            batch_size,
            shard_size,
            vocab_size,
            overwrite,
            show_progress,
            seed,
            compress,
        )


def _cache_teacher(
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
    from tqdm.auto import tqdm

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
    target = resolve_output_path(output_dir)  # `~` and links, as every other writer resolves its output
    # A cache written into (or over) the teacher's own folder would replace the teacher, `overwrite` or not.
    check_not_overlapping(output_dir, getattr(teacher.config, "name_or_path", None) or None, "the teacher")
    partial = target.with_name(f".{target.name}.partial")
    rank, world = _distributed()
    if (target / CACHE_INFO_NAME).is_file():
        existing = read_cache_info(target)
        if {k: existing.get(k) for k in settings} == settings:
            # The data is checked too (cheap: token ids only); then the cache is reused without a teacher pass.
            try:
                return load_teacher_cache(target, dataset=dataset)
            except ValueError:
                if not overwrite:
                    raise
                if isinstance(dataset, itertools.chain):
                    raise ValueError(
                        "cache_teacher: the data differ from the existing cache's and were consumed checking them (a "
                        "one-pass iterator): pass a datasets.Dataset, an IterableDataset or a list to rewrite it."
                    ) from None
        elif not overwrite:
            changed = sorted(k for k in settings if existing.get(k) != settings[k])
            raise ValueError(
                f"{str(target)!r} holds a teacher cache made with other settings ({', '.join(changed)} differ: e.g. "
                "another teacher, or a corrected one): pass overwrite=True to replace it, or choose another "
                "output_dir."
            )
    else:
        check_output_dir(target, overwrite)  # a folder that is not a cache fails now, not after the teacher pass
    if hasattr(dataset, "__len__") and isinstance(first, dict):
        # What the shards and the output layer will take, counted before the teacher pass rather than found short
        # after it (the shards are written once into the work folder, then hard-linked into place).
        check_free_space(target, estimated_cache_bytes(settings, len(dataset), np.asarray(first["input_ids"]).size))
    # 1. The work directory: kept across kills; reused only when made with the same settings.
    if rank == 0:
        saved = partial / SETTINGS_NAME
        if partial.is_dir() and (not saved.is_file() or json.loads(saved.read_text()) != settings):
            logger.warning("Discarding %s: an unfinished cache write with other settings.", partial)
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        for leftover in partial.glob(".*.tmp-*"):  # shards a killed writer was in the middle of
            leftover.unlink(missing_ok=True)
        if not saved.is_file():
            atomic_write_json(saved, settings)
    _barrier()

    # 2. Shards: every process reads the whole stream (to hash it), and runs the teacher on its own shards.
    total = len(dataset) if hasattr(dataset, "__len__") else None
    progress = tqdm(total=total, desc="Caching the teacher", unit="sample", disable=not show_progress or rank != 0)
    was_training = teacher.training
    teacher.eval()
    shards, computed = [], 0
    try:
        for index, rows in enumerate(_batched(_rows(dataset), shard_size)):
            entry = {
                "samples": len(rows),
                "tokens": sum(r["input_ids"].numel() for r in rows),
                "seq_length": max(r["input_ids"].numel() for r in rows),
                "data_hash": _shard_hash(rows),
            }
            shards.append(entry)
            if index % world == rank:
                sidecar, path = partial / f"shard-{index:05d}.json", partial / f"shard-{index:05d}.arrow"
                done = sidecar.is_file() and json.loads(sidecar.read_text()).get("data_hash") == entry["data_hash"]
                if not (done and path.is_file()):
                    entry.update(_write_shard(teacher, rows, path, settings, batch_size))
                    atomic_write_json(sidecar, entry)
                    computed += 1
            progress.update(len(rows))
    finally:
        progress.close()
        teacher.train(was_training)
    _barrier()
    logger.info("Teacher cache: %d of %d shards computed by process %d, the rest reused.", computed, len(shards), rank)

    # 3. Rank 0 checks every shard is there and moves the cache into place.
    if rank == 0:
        _finish(teacher, target, partial, settings, shards, overwrite)
    _barrier()
    return load_teacher_cache(target)


def _finish(teacher, target: Path, partial: Path, settings: dict, shards: list[dict], overwrite: bool) -> None:
    from datasets import DatasetInfo
    from safetensors.torch import save_file

    for index, entry in enumerate(shards):
        sidecar = partial / f"shard-{index:05d}.json"
        stored = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        if stored.get("data_hash") != entry["data_hash"]:
            raise RuntimeError(
                f"Shard {index} of the teacher cache in {str(partial)!r} is missing or holds other data: did a "
                "process fail? Rerun the same command to compute it."
            )
        # A shard resumed from a write by an older version has no `teacher_bytes`: the total is then unknown.
        entry.update(file=stored["file"], bytes=stored["bytes"], teacher_bytes=stored.get("teacher_bytes"))
    tokens = sum(s["tokens"] for s in shards)
    info = {
        **settings,
        "fingerprint": {
            "teacher": settings["teacher"],
            "tokenizer": settings["tokenizer"],
            "data": _data_fingerprint(shards),
            "seq_length": max(s["seq_length"] for s in shards),
        },
        "teacher_name_or_path": getattr(teacher.config, "name_or_path", None),
        "samples": sum(s["samples"] for s in shards),
        "tokens": tokens,
        "bytes": sum(s["bytes"] for s in shards),
        "bytes_per_token": sum(s["bytes"] for s in shards) / max(tokens, 1),
        # The teacher's values alone (no token ids, no Arrow framing): what the mode and its settings cost.
        "teacher_bytes_per_token": None
        if any(s["teacher_bytes"] is None for s in shards)
        else sum(s["teacher_bytes"] for s in shards) / max(tokens, 1),
        "shards": shards,
    }
    features = _features(
        settings["mode"],
        settings["dtype"],
        settings["id_dtype"],
        settings["with_labels"],
        settings["compress"] or False,
    )
    with atomic_directory(target, overwrite=overwrite, expected_bytes=info["bytes"]) as tmp:
        for entry in shards:  # hard links: the work directory keeps its shards until the cache is in place
            os.link(partial / entry["file"], tmp / entry["file"])
        if settings["mode"] == "hidden":
            head = teacher.get_output_embeddings()
            tensors = {"weight": head.weight.detach().cpu().contiguous()}
            if head.bias is not None:
                tensors["bias"] = head.bias.detach().cpu().contiguous()
            save_file(tensors, tmp / LM_HEAD_NAME, metadata={"format": "pt"})
        DatasetInfo(features=features, description="hf-minitron teacher cache").write_to_directory(str(tmp))
        state = {
            "_data_files": [{"filename": entry["file"]} for entry in shards],
            "_fingerprint": f"teacher-cache-{info['fingerprint']['teacher']}-{info['fingerprint']['data']['hash']}",
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": "numpy",
            "_output_all_columns": False,
            "_split": None,
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
        (tmp / CACHE_INFO_NAME).write_text(json.dumps(info, indent=1), encoding="utf-8")
    shutil.rmtree(partial, ignore_errors=True)
    logger.info(
        "Teacher cache written to %s: %d samples, %d tokens, %s (%.1f bytes per token, %s of them the teacher's).",
        target, info["samples"], tokens, format_bytes(info["bytes"]), info["bytes_per_token"],
        "?" if info["teacher_bytes_per_token"] is None else f"{info['teacher_bytes_per_token']:.1f}",
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- training from a cache
def _as_array(value, bf16_bits: bool = False) -> torch.Tensor:
    array = np.asarray(value)
    if bf16_bits and array.dtype.kind in "ui":  # uint16 bit patterns of bf16 values
        return torch.from_numpy(array.astype(np.uint16).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(array))


def _collate_samples(features: list[dict], length: int) -> dict[str, torch.Tensor]:
    """`teacher_sample_ids` and `teacher_sample_counts` `[batch, length, w]` (int64) of a sampled cache's `features`,
    `w` the most distinct tokens of a position in the batch."""
    unpacked = []
    for f in features:
        # Each position's counts sum to K: the stored counts of a sample sum to K times its length.
        num_samples = int(np.asarray(f[SAMPLE_COUNTS]).sum()) // max(len(f["input_ids"]), 1)
        unpacked.append(unpack_samples(f[SAMPLE_IDS], f[SAMPLE_COUNTS], max(num_samples, 1)))
    width = max(ids.shape[1] for ids, _ in unpacked)
    ids = torch.zeros(len(features), length, width, dtype=torch.long)
    counts = torch.zeros_like(ids)
    for i, (row_ids, row_counts) in enumerate(unpacked):
        ids[i, : row_ids.shape[0], : row_ids.shape[1]] = row_ids
        counts[i, : row_counts.shape[0], : row_counts.shape[1]] = row_counts
    return {SAMPLE_IDS: ids, SAMPLE_COUNTS: counts}


def collate_teacher_columns(features: list[dict], length: int) -> dict[str, torch.Tensor]:
    """The teacher columns of `features`, right-padded to `length` positions (with zeros; the padding's labels are
    -100): `teacher_hidden` `[batch, length, hidden]` (stored dtype), `teacher_topk_ids` `[batch, length, k]` (int64),
    `teacher_topk_logprobs` `[batch, length, k]` (fp32), `teacher_topk_rest` `[batch, length]` (fp32),
    `teacher_sample_ids` and `teacher_sample_counts` `[batch, length, w]` (int64, see [`unpack_samples`]) and
    `teacher_entropy` `[batch, length]` (fp32)."""
    batch = {}
    if SAMPLE_IDS in features[0]:
        batch.update(_collate_samples(features, length))
    if TOPK_PACKED_IDS in features[0]:
        # Bit streams, one per sample: zero-padded to the longest; `CachedTeacher` unpacks them.
        rows = [torch.from_numpy(np.asarray(f[TOPK_PACKED_IDS]).astype(np.uint8)) for f in features]
        packed = torch.zeros(len(rows), max(r.numel() for r in rows), dtype=torch.uint8)
        for i, r in enumerate(rows):
            packed[i, : r.numel()] = r
        batch[TOPK_PACKED_IDS] = packed
    skip = (SAMPLE_IDS, SAMPLE_COUNTS, TOPK_PACKED_IDS)
    names = [name for name in TEACHER_COLUMNS if name in features[0] and name not in skip]
    for name in names:
        rows = []
        for f in features:
            tokens = len(f["input_ids"])
            value = _as_array(f[name], bf16_bits=name in (HIDDEN, TOPK_LOGPROBS, ENTROPY))
            rows.append(value.reshape(tokens) if name in (TOPK_REST, ENTROPY) else value.reshape(tokens, -1))
        if name in (TOPK_IDS, TOPK_QUANTIZED):
            rows = [r.long() for r in rows]
        elif name in (TOPK_LOGPROBS, TOPK_REST, ENTROPY):
            rows = [r.float() for r in rows]
        padded = rows[0].new_zeros((len(rows), length, *rows[0].shape[1:]))
        for i, r in enumerate(rows):
            padded[i, : r.shape[0]] = r
        batch[name] = padded
    return batch


class CachedTeacher(Teacher):
    """What [`DistillationTrainer`] holds instead of a teacher model when its `train_dataset` is a teacher cache: the
    cache settings and, for `mode="hidden"`, the teacher's output layer; the cached kind of
    [`~teachers.Teacher`], whose outputs are a batch's teacher columns.

    Args:
        directory (`str` or `os.PathLike`): the cache directory.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.info = read_cache_info(self.directory)
        self.mode = self.info["mode"]
        self.softcap = self.info["teacher_softcap"]
        self.weight = self.bias = None
        if self.mode == "hidden":
            from safetensors.torch import load_file

            tensors = load_file(self.directory / LM_HEAD_NAME)
            self.weight, self.bias = tensors["weight"], tensors.get("bias")

    @classmethod
    def from_dataset(cls, dataset) -> "CachedTeacher":
        return cls(cache_directory(dataset))

    def __repr__(self) -> str:
        k = {
            "topk": f", top_k={self.info['top_k']}{', compressed' if self.info.get('compress') else ''}",
            "sampled": f", num_samples={self.info.get('num_samples')}",
        }
        k = k.get(self.mode, "")
        return f"teacher cache {str(self.directory)!r} (mode={self.mode!r}{k}, dtype={self.info['dtype']})"

    def to(self, device) -> "CachedTeacher":
        if self.weight is not None:
            self.weight = self.weight.to(device)
            self.bias = None if self.bias is None else self.bias.to(device)
        return self

    def check(self, student_vocab: int, args, tokenizer=None) -> None:
        """Refuses training arguments, students and tokenizers this cache cannot serve."""
        info = self.info
        if args.intermediate_layer_mapping:
            raise ValueError(
                "DistillationConfig.intermediate_layer_mapping needs the teacher's intermediate states, which a "
                f"teacher cache does not hold: drop it, or distil from the live teacher ({self})."
            )
        if self.mode == "hidden" and student_vocab > info["vocab_size"]:
            raise ValueError(
                f"The student's vocabulary ({student_vocab} rows) is larger than the cached teacher's output layer "
                f"({info['vocab_size']} rows): logit distillation needs a shared tokenizer ({self})."
            )
        if self.mode in ("topk", "sampled"):
            what = {"topk": "top-k log-probabilities", "sampled": "distributions the tokens were sampled from"}
            if student_vocab != info["vocab_size"]:
                raise ValueError(
                    f"The student's vocabulary ({student_vocab} rows) differs from the {info['vocab_size']} tokens "
                    f"the {self.mode} teacher cache was normalised over: rewrite the cache with vocab_size="
                    f"{student_vocab} if the teacher's extra rows are padding ({self})."
                )
            if args.kd_temperature != info["temperature"]:
                raise ValueError(
                    f"DistillationConfig.kd_temperature={args.kd_temperature} differs from the temperature "
                    f"{info['temperature']} of the cached {what[self.mode]}: set kd_temperature="
                    f"{info['temperature']}, or rewrite the cache with temperature={args.kd_temperature} ({self})."
                )
        if self.mode == "sampled":
            # Only forward KL is linear in the teacher's probabilities, so only its gradient is unbiased from samples.
            if args.kd_loss != "forward_kl":
                raise ValueError(
                    f"DistillationConfig.kd_loss={args.kd_loss!r} cannot be estimated without bias from sampled "
                    "teacher tokens (its gradient is not linear in the teacher's probabilities): use kd_loss="
                    f"'forward_kl', or a hidden or top-k cache ({self})."
                )
            if args.kd_top_k is not None:
                raise ValueError(
                    f"DistillationConfig.kd_top_k={args.kd_top_k} needs the teacher's top-k tokens, which a sampled "
                    f"cache does not hold: drop kd_top_k, or use a top-k cache ({self})."
                )
        if self.mode == "topk":
            if args.kd_top_k is not None and args.kd_top_k > info["top_k"]:
                raise ValueError(
                    f"DistillationConfig.kd_top_k={args.kd_top_k} exceeds the {info['top_k']} tokens per position of "
                    f"the cache: use kd_top_k <= {info['top_k']} ({self})."
                )
        if hasattr(getattr(tokenizer, "tokenizer", tokenizer), "get_vocab"):
            check_teacher_cache(self.directory, tokenizer=tokenizer)

    @staticmethod
    def pop_columns(inputs: dict) -> dict:
        return {name: inputs.pop(name) for name in TEACHER_COLUMNS if name in inputs}

    def _hidden(self, columns: dict) -> torch.Tensor:
        hidden = columns[HIDDEN]
        # The live teacher's hidden states are in its weights' dtype: cast the stored ones the same way.
        return hidden.reshape(-1, hidden.shape[-1]).to(self.weight.dtype)

    def _topk(self, columns: dict) -> tuple:
        if self.info.get("compress"):
            codes = columns[TOPK_QUANTIZED]  # [batch, length, k]
            batch, length, k = codes.shape
            ids = unpack_ids(columns[TOPK_PACKED_IDS], id_bits(self.info["vocab_size"]), length * k)
            ids = ids.reshape(batch, length, k).clamp_max_(self.info["vocab_size"] - 1)  # padding decodes to junk
            log_probs = dequantize_log_probs(codes, self.info["dtype"])
        else:
            ids, log_probs = columns[TOPK_IDS], columns[TOPK_LOGPROBS]
        return (
            ids.reshape(-1, ids.shape[-1]),
            log_probs.reshape(-1, log_probs.shape[-1]),
            columns[TOPK_REST].reshape(-1),
        )

    def _sampled(self, columns: dict) -> tuple:
        ids, counts = columns[SAMPLE_IDS], columns[SAMPLE_COUNTS]
        return (
            ids.reshape(-1, ids.shape[-1]),
            counts.reshape(-1, counts.shape[-1]),
            self.info["num_samples"],
            columns[ENTROPY].reshape(-1),
        )

    def forward(self, inputs, columns, layers, fused):
        if not columns:
            return None
        if self.mode == "hidden":
            return TeacherOutput(hidden=self._hidden(columns), weight=self.weight, bias=self.bias)
        if self.mode == "sampled":
            return TeacherOutput(sampled=self._sampled(columns))
        return TeacherOutput(topk=self._topk(columns))

    def fused_loss(self, output, hidden, head, targets, options):
        if self.mode == "hidden":
            return super().fused_loss(output, hidden, head, targets, options)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        if self.mode == "sampled":
            return fused_sampled_kd_loss_with_options(
                hidden, head.weight, *output.sampled, targets, options, head.bias
            )
        return fused_topk_kd_loss_with_options(hidden, head.weight, *output.topk, targets, options, head.bias)

    def kd_loss(self, output, logits, targets, options):
        if self.mode == "hidden":
            teacher_logits = F.linear(output.hidden, output.weight, output.bias)[:, : logits.shape[-1]]
            if self.softcap is not None:
                teacher_logits = self.softcap * torch.tanh(teacher_logits / self.softcap)
            return kd_loss(logits, teacher_logits, targets, **options.divergence)
        if self.mode == "sampled":
            return sampled_kd_loss(logits, *output.sampled, targets, temperature=options.temperature)
        return topk_kd_loss(logits, *output.topk, targets, **options.divergence)
