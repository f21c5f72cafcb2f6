"""The on-disk format of a teacher cache, and the checks run on a cache before anything is read from it.

A cache directory holds Arrow shards (`shard-00000.arrow`, ...: a `datasets.Dataset`, see `state.json` and
`dataset_info.json`), for `mode="hidden"` the teacher's output layer (`teacher_lm_head.safetensors`), and
`teacher_cache.json`: the settings, every shard's file, size and data hash, and a fingerprint of the teacher's weights
(a sample of every tensor), the tokenizer's vocabulary, the data (every sample's ids) and the sequence length. A cache
is refused for another teacher (teacher correction changes the teacher), tokenizer or data, with an error naming what
differs; and for files that are not those it wrote (truncated, deleted, replaced, edited: [`check_cache_files`]),
naming the file, before a `datasets` or `safetensors` error would.

Values are encoded here too (bf16 as uint16 bit patterns, quantised log-probabilities, compressed top-k streams, sampled
counts), so that the writer and the reader share one definition of each.
"""

import functools
import hashlib
import itertools
import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

from ..fingerprints import weights_fingerprint


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
# A compressed top-k cache's one column (see `encode_topk`), and the batch column its collator makes of the codes.
TOPK_PACKED = "teacher_topk_packed"
TOPK_QUANTIZED = "teacher_topk_quantized_logprobs"
TEACHER_COLUMNS = (
    HIDDEN, TOPK_IDS, TOPK_LOGPROBS, TOPK_REST, TOPK_PACKED, TOPK_QUANTIZED, SAMPLE_IDS, SAMPLE_COUNTS, ENTROPY
)  # fmt: skip
QUANTIZED_DTYPES = ("uint8", "uint16")
# The `compress` setting of a compressed top-k cache: its blobs' format (see `encode_topk`). Earlier ones: `true`
# (bit-packed ids, uncompressed) and "zstd" (the ids and the codes in two columns, the whole ids through zstd).
COMPRESS_CODEC = "zstd-blob"
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


def _shards(dataset, shard_size: int):
    """`(rows, entry)` of every shard of `dataset`: its samples (see `_rows`) and what `teacher_cache.json` records of
    them (`samples`, `tokens`, `seq_length`, `data_hash`). The writer and the data check both go through here, so
    that a cache and the data it is checked against are cut into the same shards and hashed the same way."""
    for rows in _batched(_rows(dataset), shard_size):
        lengths = [r["input_ids"].numel() for r in rows]
        entry = {
            "samples": len(rows),
            "tokens": sum(lengths),
            "seq_length": max(lengths),
            "data_hash": _shard_hash(rows),
        }
        yield rows, entry


def data_fingerprint(dataset, shard_size: int) -> dict:
    """`{"samples", "tokens", "hash", "seq_length"}` of a tokenized dataset, as [`cache_teacher`] records it."""
    shards = [entry for _, entry in _shards(dataset, shard_size)]
    return {**_data_fingerprint(shards), "seq_length": max((s["seq_length"] for s in shards), default=0)}


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
    info = _read_json(directory, CACHE_INFO_NAME)
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"The teacher cache {str(directory)!r} has format version {info.get('format_version')!r}, this "
            f"hf-minitron reads version {FORMAT_VERSION}: rewrite the cache with this version (cache_teacher)."
        )
    # Absent from caches written before it was recorded: those are checked by their files alone.
    if "metadata_hash" in info and info["metadata_hash"] != metadata_hash(info):
        raise _damaged(
            directory, CACHE_INFO_NAME, "was edited by hand (its content no longer matches the hash written with it)"
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
    """Refuses a teacher cache whose files are damaged ([`check_cache_files`]), or made from another teacher,
    tokenizer, data or sequence length than those given.

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
    check_cache_files(directory, info)
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


# ---------------------------------------------------------------------------------------------- damaged files
DAMAGED_FIX = (
    "rewrite the cache: rerun `hf-minitron cache-teacher` with the same arguments and --overwrite (or "
    "cache_teacher(..., overwrite=True))"
)
# Bytes read per file by `content_hash`: 8 blocks of 4 KiB spread over the file, so that checking a cache of thousands
# of shards on every load stays far cheaper than reading it.
_HASH_BLOCK, _HASH_BLOCKS = 4096, 8


def _damaged(directory, name: str, problem: str) -> ValueError:
    return ValueError(
        f"The teacher cache {str(directory)!r} is damaged: {str(Path(directory) / name)!r} {problem}. It is not as "
        f"cache_teacher wrote it; {DAMAGED_FIX}."
    )


def _read_json(directory, name: str) -> dict:
    try:
        value = json.loads((Path(directory) / name).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _damaged(directory, name, "is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _damaged(directory, name, f"is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise _damaged(directory, name, f"holds a JSON {type(value).__name__}, not an object")
    return value


def metadata_hash(info: dict) -> str:
    """A hash of `teacher_cache.json`'s content (less this hash): an edit by hand (e.g. of the temperature, which
    would make the trainer accept a loss the stored values were not computed for) is refused when it is read."""
    content = {k: v for k, v in info.items() if k != "metadata_hash"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def content_hash(path: Path) -> str:
    """A hash of a file's size and of a few blocks spread over it: tells a file from another of the same size (a
    shard of another cache of the same shape) at the cost of a few reads."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(_HASH_BLOCKS):
            f.seek(max(size - _HASH_BLOCK, 0) * i // (_HASH_BLOCKS - 1))
            digest.update(f.read(_HASH_BLOCK))
    return digest.hexdigest()[:16]


def _check_size(directory, name: str, expected: int) -> None:
    path = Path(directory) / name
    if not path.is_file():
        raise _damaged(directory, name, "is missing")
    size = path.stat().st_size
    if size == 0:
        raise _damaged(directory, name, f"is empty (0 bytes, {expected} were written)")
    if size != expected:
        what = "truncated, or replaced by another file" if size < expected else "replaced by another file"
        raise _damaged(directory, name, f"holds {size} bytes, not the {expected} written: {what}")


def _check_shard_schema(directory, name: str, expected: list) -> None:
    import pyarrow as pa

    try:
        with pa.OSFile(str(Path(directory) / name)) as source:
            schema = pa.ipc.open_stream(source).schema  # the header only
    except (pa.ArrowInvalid, OSError) as error:
        raise _damaged(directory, name, f"is not an Arrow file ({error})") from None
    found = [(f.name, f.type) for f in schema]
    if found != expected:
        columns = ", ".join(f"{n}: {t}" for n, t in found)
        raise _damaged(directory, name, f"holds the columns of another cache ({columns})")


def _check_lm_head(directory, info: dict) -> None:
    """The output layer's safetensors header: float32 `weight` `[rows >= vocab_size, hidden_size]`, a `bias` `[rows]`
    when the teacher has one, and the bytes the header promises."""
    path = Path(directory) / LM_HEAD_NAME
    if not path.is_file():
        raise _damaged(directory, LM_HEAD_NAME, "is missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        start = f.read(8)
        length = int.from_bytes(start, "little") if len(start) == 8 else size
        try:
            header = json.loads(f.read(length)) if 8 + length <= size else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict):
        raise _damaged(directory, LM_HEAD_NAME, f"has no readable safetensors header ({size} bytes): it was truncated")
    expected = {"weight": [None, info["hidden_size"]]} | ({"bias": [None]} if info["teacher_bias"] else {})
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    rows = tensors.get("weight", {}).get("shape", [0])[0]
    for key, shape in expected.items():
        shape = [rows if s is None else s for s in shape]
        if (
            sorted(tensors) != sorted(expected)
            or tensors[key].get("dtype") != "F32"
            or tensors[key].get("shape") != shape
        ):
            found = ", ".join(f"{k}: {v.get('dtype')} {v.get('shape')}" for k, v in tensors.items())
            raise _damaged(
                directory, LM_HEAD_NAME, f"holds {found}, not the float32 output layer [rows, {info['hidden_size']}]"
            )
    if rows < info["vocab_size"]:
        raise _damaged(directory, LM_HEAD_NAME, f"has {rows} rows, fewer than the cache's {info['vocab_size']} tokens")
    end = max(v.get("data_offsets", [0, 0])[1] for v in tensors.values())
    if 8 + length + end != size:
        raise _damaged(directory, LM_HEAD_NAME, f"holds {size} bytes, not the {8 + length + end} of its header")


def check_cache_files(directory: str | os.PathLike, info: dict | None = None) -> None:
    """Refuses a cache whose files are not those [`cache_teacher`] wrote: a shard missing, truncated, emptied, or of
    another cache (its columns; its content hash, for a cache that recorded it); `state.json` or `dataset_info.json`
    unreadable or listing other shards or columns; the output layer of `mode="hidden"` of another shape, dtype or
    size. Reads the files' sizes, headers and a few blocks of each, not their data.

    Raises:
        `ValueError`: naming the file and the fix (rewrite the cache with `--overwrite`).
    """
    from datasets import Features

    info = read_cache_info(directory) if info is None else info
    if info.get("compress") not in (None, COMPRESS_CODEC):
        # Earlier versions stored the ids otherwise under the same column names (see COMPRESS_CODEC).
        raise ValueError(
            f"The teacher cache {str(directory)!r} is a compressed top-k cache in an earlier format (compress="
            f"{info['compress']!r}; this version reads {COMPRESS_CODEC!r}): {DAMAGED_FIX}."
        )
    features = _features(
        info["mode"], info["dtype"], info["id_dtype"], info["with_labels"], info.get("compress") or False
    )
    columns = [(f.name, f.type) for f in features.arrow_schema]
    for entry in info["shards"]:
        _check_size(directory, entry["file"], entry["bytes"])
        _check_shard_schema(directory, entry["file"], columns)
        if "content_hash" in entry and content_hash(Path(directory) / entry["file"]) != entry["content_hash"]:
            raise _damaged(directory, entry["file"], "holds other data than was written (a shard of another cache?)")
    listed = [f.get("filename") for f in _read_json(directory, "state.json").get("_data_files", [])]
    if listed != [entry["file"] for entry in info["shards"]]:
        raise _damaged(directory, "state.json", f"lists the shards {listed}, not the {len(info['shards'])} written")
    described = _read_json(directory, "dataset_info.json").get("features") or {}
    try:
        stored = Features.from_dict(described)
    except (TypeError, ValueError, KeyError):
        stored = None
    if stored != features:
        raise _damaged(directory, "dataset_info.json", "describes other columns than the cache holds")
    if info["mode"] == "hidden":
        _check_lm_head(directory, info)
        recorded = info.get("lm_head")
        if recorded is not None:
            _check_size(directory, LM_HEAD_NAME, recorded["bytes"])
            if content_hash(Path(directory) / LM_HEAD_NAME) != recorded["content_hash"]:
                raise _damaged(directory, LM_HEAD_NAME, "holds other weights than were written")


# ---------------------------------------------------------------------------------------------- encodings
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


def id_bits(vocab_size: int) -> int:
    """Bits of a token id: `ceil(log2(vocab_size))` (16 for SmolLM2's 49152 tokens, 7 for 96, 17 for 128k)."""
    return max(1, (vocab_size - 1).bit_length())


# zstd through pyarrow (which `datasets` already needs): it decodes 4-6x faster than zlib at the same size on top-k
# ids (measured on the embedded SmolLM2); level 9 is within 1% of level 19's size and writes several times faster.
ZSTD_LEVEL = 9
# A blob's header: the bytes of an id's high part and of a code, the sample's tokens, top_k, the ids' frame's bytes.
_HEADER = struct.Struct("<BBIII")
# Ends every blob: `datasets`' numpy formatting returns a binary value as `numpy.bytes_`, which drops trailing NUL
# bytes, and a zstd frame may end in one.
_END = b"\x01"
_DAMAGED = f"the cache is damaged: {DAMAGED_FIX}"


def high_id_width(vocab_size: int) -> int:
    """Bytes of an id's high part, `id >> 8`, as [`encode_topk`] stores it: 1 up to 16-bit ids, 2 up to 24, else 4."""
    bits = id_bits(vocab_size) - 8
    return 1 if bits <= 8 else 2 if bits <= 16 else 4


@functools.cache
def _zstd():
    import pyarrow as pa

    return pa.Codec("zstd", compression_level=ZSTD_LEVEL)


def encode_topk(ids: torch.Tensor, codes: np.ndarray, rest: np.ndarray, vocab_size: int) -> bytes:
    """One sample's top-k `ids` `[tokens, k]`, quantised log-probabilities `codes` `[tokens, k]` (in rank order, as
    [`quantize_log_probs`] gives them) and log-mass of the rest `rest` `[tokens]` as one blob, lossless:

    - the ids split in two: their low byte stored as is, and their high part (`id >> 8`, [`high_id_width`] bytes)
      zstd-compressed. The high part is what zstd can shrink (a teacher's top-k are mostly frequent tokens, which BPE
      numbers early); the low byte is close to uniform, and zstd would spend decoding time to copy it back;
    - the codes as differences to the previous rank's code, modulo `2**bits`, zstd-compressed: a top-k list is sorted
      by probability, so the differences are small and non-negative (the first rank keeps its code);
    - the rest as fp32, as is.

    Measured on the embedded SmolLM2 (k = 64, stdlib text): 64 bytes per token for the low bytes, 46 for the high
    parts (the whole 16-bit ids through zstd: 111 for both, decoding 1.5-2x slower), 19 for the codes (raw: 64).

    Layout: a header (`_HEADER`), the low bytes, the rest, the ids' zstd frame, the codes' zstd frame, a terminator
    byte. One blob, not a column each: `datasets` formats a batch column by column, at a cost per column that is a
    tenth of a small batch's read."""
    codes = np.asarray(codes)
    steps = codes.copy()
    steps[:, 1:] = codes[:, :-1] - codes[:, 1:]  # unsigned: wraps modulo 2**bits where a list is out of order
    tokens, k = steps.shape
    ids = ids.cpu().numpy().reshape(-1).astype(np.int64)
    width = high_id_width(vocab_size)
    high = _zstd().compress(np.ascontiguousarray(ids >> 8, dtype=f"<u{width}").tobytes(), asbytes=True)
    return b"".join((
        _HEADER.pack(width, codes.dtype.itemsize, tokens, k, len(high)),
        (ids & 0xFF).astype(np.uint8).tobytes(),
        np.ascontiguousarray(rest, dtype="<f4").reshape(tokens).tobytes(),
        high,
        _zstd().compress(np.ascontiguousarray(steps, dtype=f"<u{codes.dtype.itemsize}").tobytes(), asbytes=True),
        _END,
    ))  # fmt: skip


def _split_blob(blob, tokens: int) -> tuple[tuple[int, int, int], list[memoryview]]:
    """[`encode_topk`]'s blob of a sample of `tokens` tokens: `(high width, code width, k)` and views of its low bytes,
    rest, ids' frame and codes' frame."""
    blob = blob if isinstance(blob, bytes) else bytes(blob)  # numpy.bytes_ is bytes: no copy
    if len(blob) <= _HEADER.size + len(_END) or not blob.endswith(_END):
        raise ValueError(f"A compressed top-k blob is cut short: {_DAMAGED}.")
    width, code_width, stored_tokens, k, high_bytes = _HEADER.unpack_from(blob)
    if stored_tokens != tokens or width not in (1, 2, 4) or code_width not in (1, 2):
        raise ValueError(
            f"A compressed top-k blob holds {stored_tokens} tokens (ids of {width} bytes, codes of {code_width}) for "
            f"a sample of {tokens}: {_DAMAGED}."
        )
    # Plain ints: numpy's cumsum of four numbers costs more than the rest of this function.
    low = _HEADER.size + tokens * k
    rest = low + 4 * tokens
    high = rest + high_bytes
    if len(blob) <= high + len(_END):
        raise ValueError(f"A compressed top-k blob is cut short: {_DAMAGED}.")
    view = memoryview(blob)
    return (width, code_width, k), [view[_HEADER.size : low], view[low:rest], view[rest:high], view[high : -len(_END)]]


def read_topk_batch(samples: list[tuple], length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[`encode_topk`]'s blobs of a batch of samples, `(blob, tokens)` each, as `(ids [batch, length, k] int32, steps
    [batch, length, k], rest [batch, length] fp32)`, right-padded with zeros: the ids, the codes still as the
    differences between consecutive ranks (uint8, or int32 for uint16 codes), which [`steps_to_log_probs`] turns into
    log-probabilities, and the rest. The collator stops here: the trainer finishes the decoding on its device, where
    the running sum and the ids' widening to int64 cost nothing next to the step, and the batch it moves there holds
    one byte per uint8 value and four per id, not four and eight.

    The batch's frames are decompressed in one zstd call (a stream of concatenated frames decodes to the
    concatenation of their contents): per-sample calls would cost more than the decoding itself."""
    import pyarrow as pa

    split = [_split_blob(blob, tokens) for blob, tokens in samples]
    shapes = {shape for shape, _ in split}
    if len(shapes) != 1:
        raise ValueError(f"A compressed top-k batch mixes samples of different top_k or widths: {_DAMAGED}.")
    (width, code_width, k), tokens = shapes.pop(), [t for _, t in samples]
    if any(t == 0 or t > length for t in tokens):
        raise ValueError(f"A compressed top-k batch holds samples of {tokens} tokens for {length} positions.")
    entries = k * sum(tokens)
    try:  # the ids' frames, then the codes' frames: the high parts and the differences each end up contiguous
        values = _zstd().decompress(
            pa.py_buffer(b"".join([parts[2] for _, parts in split] + [parts[3] for _, parts in split])),
            entries * (width + code_width),
        )
    except (OSError, ValueError) as error:
        raise ValueError(f"A compressed top-k blob does not decode ({error}): {_DAMAGED}.") from error
    all_ids = np.frombuffer(values, f"<u{width}", count=entries).astype(np.int32)
    all_ids <<= 8
    all_ids |= np.frombuffer(b"".join(parts[0] for _, parts in split), np.uint8)
    all_steps = np.frombuffer(values, f"<u{code_width}", count=entries, offset=entries * width)
    all_rest = np.frombuffer(b"".join(parts[1] for _, parts in split), "<f4")
    if all(t == length for t in tokens):  # packed samples, the usual case: no padding to make
        ids = all_ids.reshape(len(samples), length, k)
        steps = all_steps.reshape(len(samples), length, k)
        rest = all_rest.reshape(len(samples), length).copy()  # a view of the joined bytes, which are read-only
    else:
        ids = np.zeros((len(samples), length, k), dtype=np.int32)
        steps = np.zeros((len(samples), length, k), dtype=all_steps.dtype)
        rest = np.zeros((len(samples), length), dtype=np.float32)
        start = 0
        for i, t in enumerate(tokens):
            ids[i, :t] = all_ids[start * k : (start + t) * k].reshape(t, k)
            steps[i, :t] = all_steps[start * k : (start + t) * k].reshape(t, k)
            rest[i, :t] = all_rest[start : start + t]
            start += t
    # torch has no arithmetic for uint16: wider codes travel as int32.
    steps = steps if steps.dtype == np.uint8 else steps.astype(np.int32)
    return torch.from_numpy(ids), torch.from_numpy(np.ascontiguousarray(steps)), torch.from_numpy(rest)


def steps_to_log_probs(steps: torch.Tensor, levels: int) -> torch.Tensor:
    """[`read_topk_batch`]'s rank differences `[..., k]` back to the fp32 log-probabilities, on their device: the first
    rank's code less the running sum of the differences after it, modulo `levels + 1` as they were taken (int32 sums;
    should they wrap, they wrap modulo 2**32, a multiple of it), then [`dequantize_log_probs`]."""
    sums = torch.cumsum(steps.to(torch.int32), dim=-1)
    codes = (2 * sums[..., :1] - sums) & levels
    return dequantize_log_probs(codes, "uint8" if levels == 255 else "uint16")


def decode_topk_batch(samples: list[tuple], length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[`encode_topk`]'s blobs of a batch of samples, `(blob, tokens)` each, back to `(ids [batch, length, k] int64,
    log_probs [batch, length, k] fp32, rest [batch, length] fp32)`, right-padded with zeros: [`read_topk_batch`], then
    [`steps_to_log_probs`]."""
    ids, steps, rest = read_topk_batch(samples, length)
    levels = np.iinfo(np.uint8 if steps.dtype == torch.uint8 else np.uint16).max
    return ids.long(), steps_to_log_probs(steps, levels), rest


def decode_topk(blob, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sample's [`encode_topk`] blob back to `(ids [tokens, k] int64, log_probs [tokens, k] fp32, rest [tokens]
    fp32)`, the log-probabilities dequantised (see [`dequantize_log_probs`])."""
    ids, log_probs, rest = decode_topk_batch([(blob, tokens)], tokens)
    return ids[0], log_probs[0], rest[0]


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
        columns[TOPK_PACKED] = Value("binary")
    elif mode == "sampled":
        columns.update({SAMPLE_IDS: List(Value(id_dtype)), SAMPLE_COUNTS: List(Value("uint8")), ENTROPY: List(Value(stored))})  # fmt: skip
    else:
        columns.update({TOPK_IDS: List(Value(id_dtype)), TOPK_LOGPROBS: List(Value(stored)), TOPK_REST: List(Value("float32"))})  # fmt: skip
    return Features(columns)
