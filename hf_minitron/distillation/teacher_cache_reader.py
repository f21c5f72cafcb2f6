"""Reading a teacher cache while training: the batch's teacher columns, and the `CachedTeacher` the trainer holds
instead of a teacher model.
"""

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .losses import (
    fused_sampled_kd_loss_with_options,
    fused_topk_kd_loss_with_options,
    kd_loss,
    sampled_kd_loss,
    topk_kd_loss,
)
from .teacher_cache_format import (
    ENTROPY,
    HIDDEN,
    LM_HEAD_NAME,
    SAMPLE_COUNTS,
    SAMPLE_IDS,
    TEACHER_COLUMNS,
    TOPK_IDS,
    TOPK_LOGPROBS,
    TOPK_PACKED,
    TOPK_QUANTIZED,
    TOPK_REST,
    cache_directory,
    check_cache_files,
    check_teacher_cache,
    read_cache_info,
    read_topk_batch,
    steps_to_log_probs,
    unpack_samples,
)
from .teachers import Teacher, TeacherOutput


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


def _collate_compressed_topk(features: list[dict], length: int) -> dict[str, torch.Tensor]:
    """`teacher_topk_ids` (int32), `teacher_topk_quantized_logprobs` (the codes' rank differences, see
    [`read_topk_batch`]) `[batch, length, k]` and `teacher_topk_rest` `[batch, length]` of a compressed top-k cache's
    `features`, decompressed here (in the data loader's workers when it has some); the teacher turns the differences
    into log-probabilities on the training device ([`CachedTeacher`])."""
    ids, steps, rest = read_topk_batch([(f[TOPK_PACKED], len(f["input_ids"])) for f in features], length)
    return {TOPK_IDS: ids, TOPK_QUANTIZED: steps, TOPK_REST: rest}


def collate_teacher_columns(features: list[dict], length: int) -> dict[str, torch.Tensor]:
    """The teacher columns of `features`, right-padded to `length` positions (with zeros; the padding's labels are
    -100): `teacher_hidden` `[batch, length, hidden]` (stored dtype), `teacher_topk_ids` `[batch, length, k]` (int64),
    `teacher_topk_logprobs` `[batch, length, k]` (fp32), `teacher_topk_rest` `[batch, length]` (fp32),
    `teacher_sample_ids` and `teacher_sample_counts` `[batch, length, w]` (int64, see [`unpack_samples`]) and
    `teacher_entropy` `[batch, length]` (fp32)."""
    batch = {}
    if SAMPLE_IDS in features[0]:
        batch.update(_collate_samples(features, length))
    if TOPK_PACKED in features[0]:
        batch.update(_collate_compressed_topk(features, length))
    skip = (SAMPLE_IDS, SAMPLE_COUNTS, TOPK_PACKED)
    names = [name for name in TEACHER_COLUMNS if name in features[0] and name not in skip]
    for name in names:
        rows = []
        for f in features:
            tokens = len(f["input_ids"])
            value = _as_array(f[name], bf16_bits=name in (HIDDEN, TOPK_LOGPROBS, ENTROPY))
            rows.append(value.reshape(tokens) if name in (TOPK_REST, ENTROPY) else value.reshape(tokens, -1))
        if name == TOPK_IDS:
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
        check_cache_files(self.directory, self.info)  # before training, not at its first step
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
        ids = columns[TOPK_IDS].long()  # a compressed cache's arrive as int32
        if TOPK_QUANTIZED in columns:  # a compressed cache's: the collator left the running sum to this device
            log_probs = steps_to_log_probs(columns[TOPK_QUANTIZED], np.iinfo(self.info["dtype"]).max)
        else:
            log_probs = columns[TOPK_LOGPROBS]
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
