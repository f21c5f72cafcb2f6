"""`DistillationConfig`: the training arguments of Minitron knowledge distillation."""

import json
import math
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from ..hub import keep_token_out_of_pickles
from ..validation import check_numbers
from .losses import INTERMEDIATE_LOSSES, KD_LOSSES


@dataclass
class DistillationConfig(TrainingArguments):
    r"""Configuration of [`DistillationTrainer`]: every [`~transformers.TrainingArguments`] field, plus the
    distillation loss.

    The defaults follow the Minitron papers ([paper 1](https://arxiv.org/abs/2407.14679) §2.4 and Table 8,
    [paper 2](https://arxiv.org/abs/2408.11796) §2): logit-only forward KL divergence at temperature 1, no
    cross-entropy term and no intermediate-state loss.

    Args:
        kd_loss (`str`, *optional*, defaults to `"forward_kl"`):
            Divergence between teacher and student next-token distributions: `"forward_kl"` (KL(teacher || student)),
            `"reverse_kl"`, `"jsd"` (generalised Jensen-Shannon with `jsd_beta`) or `"tvd"` (total variation).
        kd_temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature of both distributions; the divergence is multiplied by `kd_temperature**2`.
        jsd_beta (`float`, *optional*, defaults to `0.5`):
            Mixture weight of the JSD, strictly between 0 and 1 (0.5 is the symmetric JSD).
        kd_top_k (`int`, *optional*):
            Compare the distributions on the teacher's top-k tokens only (renormalised). `None` uses the whole vocab.
        kd_loss_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the logit KD loss.
        ce_loss_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the student's cross-entropy on the ground-truth tokens (paper 1 finds logit-only KD best).
        intermediate_layer_mapping (`dict[int, int]`, `list[tuple[int, int]]` or `str`, *optional*):
            Student -> teacher decoder-layer pairs (0-based) whose outputs are matched by the intermediate-state loss
            (paper 1 §2.4), e.g. `{1: 3, 3: 7}` or `[[1, 3], [3, 7]]`; on the command line a JSON string or
            `"1:3,3:7"`; `"emb"` maps the embedding outputs (`"emb:emb,3:7"`: paper 1's L_emb + L_o). `None` disables
            the loss. States are compared after the norm that consumes them (paper 1 uses post-LayerNorm states):
            the next layer's input norm, the final norm for the last layer (and for post-norm families).
        intermediate_loss (`str`, *optional*, defaults to `"cosine"`):
            Distance of the intermediate-state loss: `"cosine"` (`1 - cos`) or `"mse"`. When the hidden sizes differ,
            one learned linear projection (shared by all layer pairs) maps student states to the teacher width.
        intermediate_loss_weight (`float` or `str`, *optional*, defaults to `"dynamic"`):
            Weight `alpha` of the intermediate-state loss: a number, or `"dynamic"` for
            `alpha = L_logits / L_is` recomputed (detached) at every step (paper 1 §2.4).
        teacher_model_name_or_path (`str`, *optional*):
            Teacher checkpoint, used when the trainer is not given a `teacher_model` object.
        teacher_model_init_kwargs (`dict` or `str`, *optional*):
            Keyword arguments of `AutoModelForCausalLM.from_pretrained` for the teacher (a JSON string on the command
            line), e.g. `{"dtype": "bfloat16"}`. `trust_remote_code` is only used when given here.
        use_fused_kd_loss (`bool`, *optional*, defaults to `True`):
            Compute KD (and CE) chunk by chunk from the final hidden states and the `lm_head` weights
            ([`fused_kd_loss`]), so the `[tokens, vocab]` logits never exist for the whole batch.
        kd_chunk_size (`int`, *optional*):
            Tokens per chunk of the fused loss; by default as many as fit `hf_minitron.distillation.losses.CHUNK_BYTES` of fp32
            logits. Smaller chunks use less memory.
        router_aux_loss_coef (`float`, *optional*):
            MoE students: adds the model's router load-balancing loss (`output_router_logits=True`, the
            Switch-Transformer loss transformers computes) with this weight. Off unless set: distillation already
            teaches the student the teacher's outputs, and a pruned MoE inherits its teacher's routing, which the
            balancing term pulls towards uniform; set it (e.g. the model's own `router_aux_loss_coef`, 0.001 for
            Mixtral) when routing collapses onto few experts during long retraining.
    """

    kd_loss: str = field(
        default="forward_kl",
        metadata={"help": "Divergence of the logit loss.", "choices": list(KD_LOSSES)},
    )
    kd_temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature of the KD loss (scaled by T^2)."}
    )
    jsd_beta: float = field(default=0.5, metadata={"help": "Mixture weight of the JSD loss, in (0, 1)."})
    kd_top_k: int | None = field(
        default=None, metadata={"help": "Restrict the KD loss to the teacher's top-k tokens (None: full vocab)."}
    )
    kd_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the logit KD loss."})
    ce_loss_weight: float = field(default=0.0, metadata={"help": "Weight of the student's cross-entropy loss."})
    intermediate_layer_mapping: dict | str | None = field(
        default=None,
        metadata={"help": "Student->teacher layer pairs for the intermediate-state loss, e.g. '1:3,3:7' or JSON."},
    )
    intermediate_loss: str = field(
        default="cosine",
        metadata={"help": "Intermediate-state distance.", "choices": list(INTERMEDIATE_LOSSES)},
    )
    intermediate_loss_weight: str = field(
        default="dynamic",
        metadata={"help": "Weight of the intermediate-state loss: a number, or 'dynamic' (L_logits / L_is)."},
    )
    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Teacher checkpoint, when no teacher model object is passed."}
    )
    teacher_model_init_kwargs: dict | str | None = field(
        default=None, metadata={"help": "from_pretrained kwargs of the teacher (JSON string on the command line)."}
    )
    use_fused_kd_loss: bool = field(
        default=True, metadata={"help": "Chunked KD loss from hidden states: the full logits are never materialised."}
    )
    router_aux_loss_coef: float | None = field(
        default=None, metadata={"help": "MoE students: weight of the router load-balancing loss (off unless set)."}
    )
    kd_chunk_size: int | None = field(
        default=None, metadata={"help": "Tokens per chunk of the fused KD loss (default: from a memory budget)."}
    )

    def __post_init__(self):
        super().__post_init__()
        # Every float field (loss weights, temperature, learning rate, ...): NaN passes any range check below.
        check_numbers(self)  # finite floats, then steps, batch sizes, learning rate, temperature in range
        keep_token_out_of_pickles(self)  # checkpoints pickle these arguments (training_args.bin)
        if self.kd_loss not in KD_LOSSES:
            raise ValueError(
                f"DistillationConfig.kd_loss={self.kd_loss!r} is not supported: choose one of {list(KD_LOSSES)}."
            )
        if not self.kd_temperature > 0:
            raise ValueError(
                f"DistillationConfig.kd_temperature={self.kd_temperature!r} is invalid: use a positive number "
                "(1.0 is the Minitron default)."
            )
        if not 0 < self.jsd_beta < 1:
            raise ValueError(
                f"DistillationConfig.jsd_beta={self.jsd_beta!r} is invalid: use a value strictly between 0 and 1 "
                "(0.5 is the symmetric JSD; use kd_loss='forward_kl' or 'reverse_kl' for the limits)."
            )
        if self.kd_top_k is not None and (isinstance(self.kd_top_k, bool) or int(self.kd_top_k) <= 0):
            raise ValueError(
                f"DistillationConfig.kd_top_k={self.kd_top_k!r} is invalid: use a positive integer, or None for the "
                "whole vocabulary."
            )
        if self.router_aux_loss_coef is not None and not self.router_aux_loss_coef >= 0:
            raise ValueError(
                f"DistillationConfig.router_aux_loss_coef={self.router_aux_loss_coef!r} is invalid: use a weight >= 0 "
                "(e.g. 0.001), or None to leave the router loss off."
            )
        for name in ("kd_loss_weight", "ce_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"DistillationConfig.{name}={getattr(self, name)!r} is invalid: use a weight >= 0.")
        if self.intermediate_loss not in INTERMEDIATE_LOSSES:
            raise ValueError(
                f"DistillationConfig.intermediate_loss={self.intermediate_loss!r} is not supported: choose one of "
                f"{list(INTERMEDIATE_LOSSES)}."
            )
        self.intermediate_layer_mapping = _parse_layer_mapping(self.intermediate_layer_mapping)
        self.intermediate_loss_weight = _parse_loss_weight(self.intermediate_loss_weight)
        if self.kd_loss_weight == 0 and self.ce_loss_weight == 0 and not self.intermediate_layer_mapping:
            raise ValueError(
                "DistillationConfig has no loss term: kd_loss_weight=0 and ce_loss_weight=0 with no "
                "intermediate_layer_mapping. Set kd_loss_weight > 0 (the Minitron default is 1.0)."
            )
        if self.intermediate_loss_weight == "dynamic" and self.intermediate_layer_mapping and self.kd_loss_weight == 0:
            raise ValueError(
                "DistillationConfig.intermediate_loss_weight='dynamic' scales L_is to the logit loss, but "
                "kd_loss_weight=0: set kd_loss_weight > 0 or give intermediate_loss_weight a number."
            )
        if self.kd_chunk_size is not None and (
            isinstance(self.kd_chunk_size, bool) or not isinstance(self.kd_chunk_size, int) or self.kd_chunk_size <= 0
        ):
            raise ValueError(
                f"DistillationConfig.kd_chunk_size={self.kd_chunk_size!r} is invalid: use a positive number of tokens "
                "(e.g. 1024; smaller uses less memory), or leave it unset to size chunks from a memory budget."
            )
        if isinstance(self.teacher_model_init_kwargs, str):
            try:
                self.teacher_model_init_kwargs = json.loads(self.teacher_model_init_kwargs)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"DistillationConfig.teacher_model_init_kwargs={self.teacher_model_init_kwargs!r} is not valid "
                    'JSON: pass a mapping such as \'{"dtype": "bfloat16"}\'.'
                ) from error
        if self.teacher_model_init_kwargs is not None and not isinstance(self.teacher_model_init_kwargs, dict):
            raise ValueError(
                f"DistillationConfig.teacher_model_init_kwargs={self.teacher_model_init_kwargs!r} is invalid: pass a "
                "dict of from_pretrained keyword arguments."
            )


# The embedding output in an intermediate_layer_mapping ("emb" in configs).
EMBEDDING_STATE = -1


def _parse_layer_mapping(value: Any) -> list[tuple[int, int]] | None:
    """Normalises a student -> teacher layer mapping to a sorted list of `(student, teacher)` index pairs."""
    if value is None or value == "" or value == {} or value == []:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("{", "[")):
            value = json.loads(text)
        else:
            value = [item.split(":") for item in text.split(",") if item.strip()]
    pairs = value.items() if isinstance(value, dict) else value

    def index(item) -> int:
        # "emb": the embedding output (the input of layer 0), paper 1's L_emb.
        if isinstance(item, str) and item.strip().lower() in ("emb", "embedding"):
            return EMBEDDING_STATE
        number = int(item)
        if number < 0:
            raise ValueError("negative")
        return number

    try:
        parsed = [(index(s), index(t)) for s, t in pairs]
    except ValueError as error:
        if str(error) == "negative":
            raise ValueError(
                f"DistillationConfig.intermediate_layer_mapping={value!r} has negative indices: use 0-based layer "
                "indices, or 'emb' for the embedding output (e.g. 'emb:emb,3:7')."
            ) from None
        raise ValueError(
            f"DistillationConfig.intermediate_layer_mapping={value!r} is invalid: pass student->teacher layer index "
            "pairs, e.g. {1: 3, 3: 7}, [[1, 3], [3, 7]] or '1:3,3:7' ('emb:emb' maps the embedding outputs)."
        ) from error
    except TypeError as error:
        raise ValueError(
            f"DistillationConfig.intermediate_layer_mapping={value!r} is invalid: pass student->teacher layer index "
            "pairs, e.g. {1: 3, 3: 7}, [[1, 3], [3, 7]] or '1:3,3:7'."
        ) from error
    if any((s == EMBEDDING_STATE) != (t == EMBEDDING_STATE) for s, t in parsed):
        raise ValueError(
            f"DistillationConfig.intermediate_layer_mapping={value!r} maps an embedding output to a layer output: map "
            "'emb' to 'emb' (the student's embedding output to the teacher's)."
        )
    if len({s for s, _ in parsed}) != len(parsed):
        raise ValueError(
            f"DistillationConfig.intermediate_layer_mapping={parsed} maps a student layer twice: give each student "
            "layer one teacher layer."
        )
    return sorted(parsed)


def _parse_loss_weight(value: Any) -> float | str:
    if value == "dynamic":
        return value
    try:
        weight = float(value)
    except (TypeError, ValueError):
        weight = -1.0
    if not 0 <= weight < math.inf:
        raise ValueError(
            f"DistillationConfig.intermediate_loss_weight={value!r} is invalid: use a finite number >= 0 or 'dynamic' "
            "(alpha = L_logits / L_is, paper 1 §2.4)."
        )
    return weight
