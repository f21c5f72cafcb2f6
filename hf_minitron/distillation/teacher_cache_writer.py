"""Writing a teacher cache: the teacher's pass over the data, shard by shard, and the cache moved into place.

Writing is streamed shard by shard (`shard_size` samples each, a file written aside and renamed) into a hidden
`.{name}.partial` sibling that survives a kill: rerunning the same call computes only the missing shards. The
finished cache is moved into place atomically ([`atomic_directory`]). Under `torch.distributed` (e.g. `accelerate
launch`), process r writes shards r, r + N, r + 2N, ... with its own full copy of the teacher: the result is the
one-process cache.
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

from ..io import (
    atomic_directory,
    atomic_write_json,
    check_free_space,
    check_not_overlapping,
    check_output_dir,
    format_bytes,
    resolve_output_path,
)
from .losses import CHUNK_BYTES, LOG_PROB_FLOOR, chunk_rows
from .teacher_cache_format import (
    CACHE_INFO_NAME,
    ENTROPY,
    HIDDEN,
    LM_HEAD_NAME,
    SAMPLE_COUNTS,
    SAMPLE_IDS,
    SETTINGS_NAME,
    TEACHER_COLUMNS,
    TOPK_IDS,
    TOPK_LOGPROBS,
    TOPK_PACKED,
    TOPK_REST,
    _batched,
    _data_fingerprint,
    _features,
    _shard_hash,
    _shards,
    check_cache_files,
    content_hash,
    encode_topk,
    high_id_width,
    load_teacher_cache,
    metadata_hash,
    quantize_log_probs,
    read_cache_info,
)


# The public module's logger: what users configure to see (or silence) the cache's progress.
logger = logging.getLogger("hf_minitron.distillation.teacher_cache")


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


def _list_array(parts: list):
    import pyarrow as pa

    if parts and isinstance(parts[0], bytes):  # a compressed stream per sample
        return pa.array(parts, type=pa.binary())
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
                    rests = np.split(rest.cpu().numpy().astype(np.float32), splits)
                    if settings["compress"]:
                        codes = np.split(quantize_log_probs(log_probs, dtype), splits)
                        columns[TOPK_PACKED] = [
                            encode_topk(part, part_codes, part_rest, settings["vocab_size"])
                            for part, part_codes, part_rest in zip(ids.split(lengths), codes, rests, strict=True)
                        ]
                    else:
                        columns[TOPK_IDS] = np.split(ids.cpu().numpy().astype(settings["id_dtype"]), splits)
                        columns[TOPK_LOGPROBS] = np.split(_to_storage(log_probs, dtype), splits)
                        columns[TOPK_REST] = rests
                teacher_bytes += sum(
                    len(part) if isinstance(part, bytes) else part.nbytes
                    for name in TEACHER_COLUMNS
                    for part in columns.get(name, ())
                )
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
        # At most the streams' raw size (zstd adds little more than its frame); 60-65% less on a real teacher.
        per_token = settings["top_k"] * (1 + high_id_width(settings["vocab_size"]) + value_bytes) + 4
        head = 0
    else:
        per_token = settings["top_k"] * (id_bytes + value_bytes) + value_bytes  # ids, log-probs, the rest's mass
        head = 0
    per_token += 4 * (2 if settings["with_labels"] else 1)  # input ids, labels
    return int(samples * seq_length * per_token) + head


def _finished(sidecar: Path, path: Path, data_hash: str) -> bool:
    """Whether a shard of the work folder was written for these samples and is whole (a rerun reuses it): its sidecar
    reads, names this data, and the shard has the size it was written with. Anything else is computed again."""
    try:
        stored = json.loads(sidecar.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(stored, dict) or stored.get("data_hash") != data_hash or not path.is_file():
        return False
    return path.stat().st_size == stored.get("bytes")


def write_teacher_cache(
    teacher, dataset, first: dict, settings: dict, output_dir, batch_size: int, overwrite: bool, show_progress: bool
):
    """[`cache_teacher`] once its arguments are checked and `settings` made (`first` is the dataset's first sample):
    reuses the cache in `output_dir` when it matches, else writes it and returns it loaded."""
    from tqdm.auto import tqdm

    target = resolve_output_path(output_dir)  # `~` and links, as every other writer resolves its output
    # A cache written into (or over) the teacher's own folder would replace the teacher, `overwrite` or not.
    check_not_overlapping(output_dir, getattr(teacher.config, "name_or_path", None) or None, "the teacher")
    partial = target.with_name(f".{target.name}.partial")
    rank, world = _distributed()
    existing = None
    if (target / CACHE_INFO_NAME).is_file():
        try:
            existing = read_cache_info(target)
            check_cache_files(target, existing)
        except ValueError:  # damaged, or another format version: rewritten with overwrite
            if not overwrite:
                raise
            existing = None
    if existing is not None:
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
    elif not (target / CACHE_INFO_NAME).is_file():
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
        for index, (rows, entry) in enumerate(_shards(dataset, settings["shard_size"])):
            shards.append(entry)
            if index % world == rank:
                sidecar, path = partial / f"shard-{index:05d}.json", partial / f"shard-{index:05d}.arrow"
                if not _finished(sidecar, path, entry["data_hash"]):
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
        entry["content_hash"] = content_hash(partial / entry["file"])  # checked on every load (`check_cache_files`)
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
            info["lm_head"] = {
                "bytes": (tmp / LM_HEAD_NAME).stat().st_size,
                "content_hash": content_hash(tmp / LM_HEAD_NAME),
            }
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
        info["metadata_hash"] = metadata_hash(json.loads(json.dumps(info)))  # of the content as it is read back
        (tmp / CACHE_INFO_NAME).write_text(json.dumps(info, indent=1), encoding="utf-8")
    shutil.rmtree(partial, ignore_errors=True)
    logger.info(
        "Teacher cache written to %s: %d samples, %d tokens, %s (%.1f bytes per token, %s of them the teacher's).",
        target, info["samples"], tokens, format_bytes(info["bytes"]), info["bytes_per_token"],
        "?" if info["teacher_bytes_per_token"] is None else f"{info['teacher_bytes_per_token']:.1f}",
    )  # fmt: skip
