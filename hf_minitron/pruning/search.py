"""Architecture search under a parameter budget ([paper 1](https://arxiv.org/abs/2407.14679) §3, Table 9).

1. Enumerate every shape (layers, hidden size, MLP neurons, attention heads, optionally KV groups) whose exact size
   (total or non-embedding parameters, or weight memory) is within ±`tolerance` of the budget, on configurable
   multiples, within caps on how much each axis may lose, and loadable by stock transformers.
2. Estimate importance ONCE and prune every candidate from a deep copy of the teacher (never the teacher itself).
3. Retrain each candidate lightly with knowledge distillation (paper 1: ~400 steps) and evaluate it every
   `eval_interval` steps by held-out LM loss or any `scorer(model) -> float`. `retrain_steps=0` ranks the pruned
   candidates as they are, as NVIDIA ModelOpt's Minitron search does; `retrain_top_k` retrains only the best of them.
4. Rank the candidates at every evaluated step and report the step after which the order of the top candidates no
   longer changes (paper 1 finds the ranking settles after ~300 steps).

Results go to `search_results.{json,md,png}`; with an `output_dir`, every finished candidate is saved atomically and
a rerun skips it.
"""

import copy
import gc
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from itertools import product
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from ..architectures import get_architecture
from ..data import iter_samples
from ..io import atomic_directory, atomic_write_text
from ..runtime import release_freed_memory
from .config import _MAMBA_FIELDS, _MOE_FIELDS, _TARGET_FIELDS, PrunedConfig
from .importance import ImportanceScores, model_shape
from .parameter_count import COUNT_KINDS, count_parameters, dtype_size, parameter_counter
from .search_results import AXES, LAYER_TYPE_AXES, MAMBA_AXES, MOE_AXES, CandidateResult, SearchResult, axes_of
from .structures.depth import layer_counts_by_type


logger = logging.getLogger(__name__)

__all__ = [
    "Candidate",
    "CandidateResult",
    "SearchConfig",
    "SearchResult",
    "count_parameters",
    "enumerate_candidates",
    "search_architectures",
]

SETTINGS_NAME = "search_settings.json"


@dataclass
class SearchConfig:
    """The budget, the search space, and how candidates are retrained and ranked.

    Args:
        target_params (`int`, *optional*):
            The budget, in the unit of `count` (parameters, or bytes for `count="memory"`). Set it or `target_ratio`.
        target_ratio (`float`, *optional*):
            The budget as a fraction of the teacher's `count`, in (0, 1) (e.g. `0.5`).
        count (`str`, *optional*, defaults to `"total"`):
            What the budget counts: `"total"` parameters, `"non_embedding"` parameters, or `"memory"` (bytes of the
            weights at `memory_dtype`).
        memory_dtype (`str`, *optional*, defaults to `"bfloat16"`):
            Element type of the `"memory"` count.
        tolerance (`float`, *optional*, defaults to `0.05`):
            Candidates are within `target * (1 ± tolerance)`.
        max_depth_pruning (`float`, *optional*, defaults to `0.2`):
            Largest fraction of the layers a candidate may remove.
        max_width_pruning (`float`, *optional*, defaults to `0.4`):
            Largest fraction of each width axis (hidden, MLP, heads, KV heads) a candidate may remove. The defaults
            (20% depth, 40% width) are those of NVIDIA ModelOpt's Minitron search.
        max_hidden_size_pruning, max_intermediate_size_pruning, max_num_attention_heads_pruning (`float`, *optional*):
            Per-axis caps that replace `max_width_pruning` for that axis.
        num_hidden_layers_multiple, hidden_size_multiple, intermediate_size_multiple, num_attention_heads_multiple
        (`int`, *optional*, defaults to `1`, `64`, `64`, `1`):
            Generated sizes are multiples of these (the teacher's own size is always a candidate value). Heads are
            also multiples of the KV heads, and a KV group never gains heads. Shapes stock transformers refuses are
            skipped (Llama configs want the hidden size divisible by the head count): with 9 heads (SmolLM2), hidden
            multiples of 64 leave only 384 and 576 within the default cap; 48 gives more.
        num_experts_multiple, moe_intermediate_size_multiple, shared_expert_intermediate_size_multiple (`int`,
        *optional*, defaults to `1`, `64`, `64`):
            MoE axes: routed experts per layer, each expert's width, the shared expert's width (MoE families only;
            capped by `max_width_pruning` or `max_num_experts_pruning` / `max_moe_intermediate_size_pruning`; the
            expert count never drops below `num_experts_per_tok`). With `count="active"` the budget counts the
            parameters one token runs through.
        mamba_num_heads_multiple, mamba_head_dim_multiple (`int`, *optional*, defaults to `1`, `8`):
            Hybrids (Minitron-SSM, https://arxiv.org/abs/2504.11409): Mamba heads per Mamba layer (always multiples
            of the B/C groups `n_groups` too, so that every group keeps as many heads) and channels per Mamba head
            (capped by `max_width_pruning` or `max_mamba_num_heads_pruning` / `max_mamba_head_dim_pruning`). A
            hybrid's depth is searched per block type: `num_mamba_layers`, `num_attention_layers`, `num_mlp_layers`,
            `num_moe_layers` (each type loses at most `max_depth_pruning` of its layers, and one attention layer
            stays), the candidates' `PrunedConfig.num_layers_by_type`. With the default `depth_method="contiguous"`
            only the counts that a block of consecutive layers holds are candidates: set
            `pruning={"depth_method": "block_influence"}` (or `"lm_loss"`) to search every count.
        search_kv_heads (`bool`, *optional*, defaults to `False`):
            Also try removing whole KV groups (divisors of the teacher's KV heads). By default they are kept.
        num_hidden_layers_grid, hidden_size_grid, intermediate_size_grid, num_attention_heads_grid,
        num_key_value_heads_grid, num_experts_grid, moe_intermediate_size_grid, shared_expert_intermediate_size_grid,
        mamba_num_heads_grid, mamba_head_dim_grid, num_mamba_layers_grid, num_attention_layers_grid,
        num_mlp_layers_grid, num_moe_layers_grid (`list[int]`, *optional*):
            Explicit values of an axis; they replace the generated ones (multiples and caps do not apply).
        max_candidates (`int`, *optional*):
            Keep at most this many candidates, the closest to the target.
        pruning (`dict` or `str`, *optional*):
            `PrunedConfig` options shared by every candidate (importance and depth selection, e.g.
            `{"depth_method": "block_influence", "calibration_samples": 256}`); no target-shape fields.
        retrain_steps (`int`, *optional*, defaults to `400`):
            Knowledge-distillation steps per candidate (paper 1: ~400). `0` ranks the pruned candidates without
            retraining.
        eval_interval (`int`, *optional*, defaults to `50`):
            Candidates are evaluated at step 0, every `eval_interval` steps, and at `retrain_steps`.
        retrain_top_k (`int`, *optional*):
            Retrain only the `k` best candidates at step 0; the others keep their step-0 result.
        eval_batch_size (`int`, *optional*, defaults to `8`):
            Batch size of the held-out loss.
        stability_top_k (`int`, *optional*, defaults to `3`):
            How many of the best candidates must keep their order for the ranking to count as stable.
    """

    target_params: int | None = field(default=None, metadata={"help": "Budget in units of `count` (or target_ratio)."})
    target_ratio: float | None = field(
        default=None, metadata={"help": "Budget as a fraction of the teacher, in (0, 1)."}
    )
    count: str = field(default="total", metadata={"help": "What is counted.", "choices": list(COUNT_KINDS)})
    memory_dtype: str = field(default="bfloat16", metadata={"help": "Element type of the 'memory' count."})
    tolerance: float = field(default=0.05, metadata={"help": "Relative tolerance around the target."})
    max_depth_pruning: float = field(default=0.2, metadata={"help": "Largest fraction of layers removed."})
    max_width_pruning: float = field(default=0.4, metadata={"help": "Largest fraction removed per width axis."})
    max_hidden_size_pruning: float | None = field(default=None, metadata={"help": "Cap for the hidden size."})
    max_intermediate_size_pruning: float | None = field(default=None, metadata={"help": "Cap for MLP neurons."})
    max_num_attention_heads_pruning: float | None = field(default=None, metadata={"help": "Cap for heads."})
    max_num_experts_pruning: float | None = field(default=None, metadata={"help": "MoE: cap for routed experts."})
    max_moe_intermediate_size_pruning: float | None = field(
        default=None, metadata={"help": "MoE: cap for expert width."}
    )
    max_mamba_num_heads_pruning: float | None = field(default=None, metadata={"help": "Hybrids: cap for Mamba heads."})
    max_mamba_head_dim_pruning: float | None = field(
        default=None, metadata={"help": "Hybrids: cap for channels per Mamba head."}
    )
    num_hidden_layers_multiple: int = field(default=1, metadata={"help": "Layer counts are multiples of this."})
    hidden_size_multiple: int = field(default=64, metadata={"help": "Hidden sizes are multiples of this."})
    intermediate_size_multiple: int = field(default=64, metadata={"help": "MLP sizes are multiples of this."})
    num_attention_heads_multiple: int = field(default=1, metadata={"help": "Head counts are multiples of this."})
    num_experts_multiple: int = field(default=1, metadata={"help": "MoE: expert counts are multiples of this."})
    moe_intermediate_size_multiple: int = field(
        default=64, metadata={"help": "MoE: expert widths are multiples of this."}
    )
    shared_expert_intermediate_size_multiple: int = field(
        default=64, metadata={"help": "MoE: shared-expert widths are multiples of this."}
    )
    mamba_num_heads_multiple: int = field(
        default=1, metadata={"help": "Hybrids: Mamba head counts are multiples of this (and of n_groups)."}
    )
    mamba_head_dim_multiple: int = field(
        default=8, metadata={"help": "Hybrids: channels per Mamba head are multiples of this."}
    )
    search_kv_heads: bool = field(default=False, metadata={"help": "Also try removing whole KV groups."})
    num_hidden_layers_grid: list[int] | None = field(default=None, metadata={"help": "Explicit layer counts."})
    hidden_size_grid: list[int] | None = field(default=None, metadata={"help": "Explicit hidden sizes."})
    intermediate_size_grid: list[int] | None = field(default=None, metadata={"help": "Explicit MLP sizes."})
    num_attention_heads_grid: list[int] | None = field(default=None, metadata={"help": "Explicit head counts."})
    num_key_value_heads_grid: list[int] | None = field(default=None, metadata={"help": "Explicit KV head counts."})
    num_experts_grid: list[int] | None = field(default=None, metadata={"help": "MoE: explicit expert counts."})
    moe_intermediate_size_grid: list[int] | None = field(
        default=None, metadata={"help": "MoE: explicit expert widths."}
    )
    shared_expert_intermediate_size_grid: list[int] | None = field(
        default=None, metadata={"help": "MoE: explicit shared-expert widths."}
    )
    mamba_num_heads_grid: list[int] | None = field(
        default=None, metadata={"help": "Hybrids: explicit Mamba head counts."}
    )
    mamba_head_dim_grid: list[int] | None = field(
        default=None, metadata={"help": "Hybrids: explicit channels per Mamba head."}
    )
    num_mamba_layers_grid: list[int] | None = field(default=None, metadata={"help": "Hybrids: Mamba layer counts."})
    num_attention_layers_grid: list[int] | None = field(
        default=None, metadata={"help": "Hybrids: attention layer counts."}
    )
    num_mlp_layers_grid: list[int] | None = field(default=None, metadata={"help": "Hybrids: MLP layer counts."})
    num_moe_layers_grid: list[int] | None = field(default=None, metadata={"help": "Hybrids: MoE layer counts."})
    max_candidates: int | None = field(default=None, metadata={"help": "Keep the N candidates closest to target."})
    pruning: dict | str | None = field(
        default=None, metadata={"help": "PrunedConfig options of every candidate (JSON on the command line)."}
    )
    retrain_steps: int = field(default=400, metadata={"help": "KD steps per candidate (0: rank without retraining)."})
    eval_interval: int = field(default=50, metadata={"help": "Evaluate every this many steps."})
    retrain_top_k: int | None = field(default=None, metadata={"help": "Retrain only the k best at step 0."})
    eval_batch_size: int = field(default=8, metadata={"help": "Batch size of the held-out loss."})
    stability_top_k: int = field(default=3, metadata={"help": "Top candidates whose order defines stability."})

    def __post_init__(self):
        if (self.target_params is None) == (self.target_ratio is None):
            raise ValueError(
                "SearchConfig needs exactly one budget: target_params (e.g. 80_000_000) or target_ratio (a fraction "
                f"of the teacher, e.g. 0.5); got target_params={self.target_params!r}, "
                f"target_ratio={self.target_ratio!r}."
            )
        if self.target_params is not None and (not _is_int(self.target_params) or self.target_params <= 0):
            raise ValueError(
                f"SearchConfig.target_params={self.target_params!r} is invalid: expected a positive integer."
            )
        if self.target_ratio is not None and not 0 < self.target_ratio < 1:
            raise ValueError(
                f"SearchConfig.target_ratio={self.target_ratio!r} is invalid: expected a fraction of the teacher "
                "strictly between 0 and 1 (e.g. 0.5)."
            )
        if self.count not in COUNT_KINDS:
            raise ValueError(f"SearchConfig.count={self.count!r} is not supported: choose one of {list(COUNT_KINDS)}.")
        try:
            dtype_size(self.memory_dtype)
        except ValueError as error:
            raise ValueError(f"SearchConfig.memory_dtype: {error}") from None
        if not 0 < self.tolerance < 1:
            raise ValueError(
                f"SearchConfig.tolerance={self.tolerance!r} is invalid: expected a relative tolerance strictly between "
                "0 and 1 (e.g. 0.05 for ±5%)."
            )
        for name in (
            "max_depth_pruning",
            "max_width_pruning",
            "max_hidden_size_pruning",
            "max_intermediate_size_pruning",
            "max_num_attention_heads_pruning",
            "max_num_experts_pruning",
            "max_moe_intermediate_size_pruning",
            "max_mamba_num_heads_pruning",
            "max_mamba_head_dim_pruning",
        ):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(
                    f"SearchConfig.{name}={value!r} is invalid: expected the largest fraction removed, in [0, 1)."
                )
        for name in (
            "num_hidden_layers_multiple",
            "hidden_size_multiple",
            "intermediate_size_multiple",
            "num_attention_heads_multiple",
            "num_experts_multiple",
            "moe_intermediate_size_multiple",
            "shared_expert_intermediate_size_multiple",
            "mamba_num_heads_multiple",
            "mamba_head_dim_multiple",
            "eval_interval",
            "eval_batch_size",
            "stability_top_k",
        ):
            if not _is_int(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(
                    f"SearchConfig.{name}={getattr(self, name)!r} is invalid: expected a positive integer."
                )
        for name in ("max_candidates", "retrain_top_k"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value <= 0):
                raise ValueError(f"SearchConfig.{name}={value!r} is invalid: expected a positive integer or None.")
        if not _is_int(self.retrain_steps) or self.retrain_steps < 0:
            raise ValueError(
                f"SearchConfig.retrain_steps={self.retrain_steps!r} is invalid: expected an integer >= 0 (0 ranks "
                "the pruned candidates without retraining)."
            )
        for name, _ in AXES + MOE_AXES + MAMBA_AXES + LAYER_TYPE_AXES:
            grid = getattr(self, f"{name}_grid")
            if grid is not None:
                if not grid or any(not _is_int(v) or v <= 0 for v in grid):
                    raise ValueError(
                        f"SearchConfig.{name}_grid={grid!r} is invalid: expected a non-empty list of positive integers."
                    )
                setattr(self, f"{name}_grid", sorted(set(grid)))
        if isinstance(self.pruning, str):
            try:
                self.pruning = json.loads(self.pruning) if self.pruning.strip() else None
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"SearchConfig.pruning={self.pruning!r} is not valid JSON: pass a mapping of PrunedConfig options, "
                    'e.g. \'{"depth_method": "block_influence"}\'.'
                ) from error
        if self.pruning is not None:
            if not isinstance(self.pruning, dict):
                raise ValueError(
                    f"SearchConfig.pruning={self.pruning!r} is invalid: pass a mapping of PrunedConfig options."
                )
            shape_keys = sorted(
                set(self.pruning)
                & {*_TARGET_FIELDS, *_MOE_FIELDS, *_MAMBA_FIELDS, "layers_to_drop", "num_layers_by_type"}
            )
            if shape_keys:
                raise ValueError(
                    f"SearchConfig.pruning sets {shape_keys}: the search chooses the shape. Use the *_grid fields to "
                    "restrict an axis, and keep only importance/depth options in `pruning`."
                )
            self.base_pruned_config()  # PrunedConfig validates names and values

    @property
    def eval_steps(self) -> list[int]:
        """The steps at which candidates are evaluated: 0, every `eval_interval`, and `retrain_steps`."""
        return sorted({0, *range(self.eval_interval, self.retrain_steps, self.eval_interval), self.retrain_steps})

    def base_pruned_config(self) -> PrunedConfig:
        """The `PrunedConfig` of `pruning` (no target shape): the importance and depth options of every candidate."""
        try:
            return PrunedConfig.from_dict(dict(self.pruning or {}))
        except ValueError as error:
            raise ValueError(f"SearchConfig.pruning: {error}") from None

    def width_cap(self, name: str) -> float:
        override = getattr(self, f"max_{name}_pruning", None)
        return self.max_width_pruning if override is None else override

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SearchConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown SearchConfig field(s) {unknown}. Valid fields: {sorted(known)}.")
        return cls(**data)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------- candidates
@dataclass
class Candidate:
    """One architecture of the search space.

    Attributes:
        name (`str`): e.g. `"layers24-hidden512-mlp1280-heads8-kv4"`.
        pruned_config (`PrunedConfig`): every target field set, plus the search's importance options.
        shape (`dict`): the five target sizes.
        num_parameters (`int`): total parameters of the pruned model (exact).
        num_non_embedding_parameters (`int`): without input embeddings and an untied output projection.
        memory_bytes (`int`): bytes of the weights at `SearchConfig.memory_dtype`.
        budget_value (`int`): the quantity the budget counts (one of the three above).
    """

    name: str
    pruned_config: PrunedConfig
    shape: dict
    num_parameters: int
    num_non_embedding_parameters: int
    memory_bytes: int
    budget_value: int

    @property
    def parameters(self) -> dict:
        return {
            "total": self.num_parameters,
            "non_embedding": self.num_non_embedding_parameters,
            "memory": self.memory_bytes,
        }


def candidate_name(shape: dict) -> str:
    return "-".join(f"{short}{shape[name]}" for name, short in axes_of(shape))


def search_shape(model_config) -> dict:
    """The teacher's sizes under the searched axes' names: `model_shape`, where a hybrid's depth is its layers of each
    block type (`num_mamba_layers`, ...) instead of `num_hidden_layers`."""
    shape = model_shape(model_config)
    counts = layer_counts_by_type(model_config)
    if counts is not None:
        del shape["num_hidden_layers"]
        shape |= {f"num_{block}_layers": count for block, count in counts.items()}
    return shape


def searched_axes(model_config) -> tuple[tuple[str, str], ...]:
    """The axes of `model_config`'s family: the dense ones (no dense MLP axis for an all-MoE family), the MoE ones, a
    hybrid's Mamba axes and its layers of each block type."""
    spec = get_architecture(model_config)
    blocks = layer_counts_by_type(model_config)
    # A hybrid has the axes of the block types its layers hold (a Nemotron-H without MoE layers: no expert axes).
    absent = set() if blocks is None else {block for block in ("mlp", "moe", "mamba") if block not in blocks}
    skipped = {name for name, _ in MOE_AXES} if "moe" in absent else set()
    skipped |= {name for name, _ in MAMBA_AXES} if "mamba" in absent else set()
    if spec.mlp is None or "mlp" in absent:
        skipped.add("intermediate_size")
    return tuple((name, short) for name, short in axes_of(search_shape(model_config)) if name not in skipped)


_LAYER_TYPE_NAMES = {name: name[len("num_") : -len("_layers")] for name, _ in LAYER_TYPE_AXES}


def target_fields(shape: dict) -> dict:
    """The `PrunedConfig` fields of a candidate shape: a hybrid's per-type layer axes become `num_layers_by_type`."""
    fields = {name: value for name, value in shape.items() if name not in _LAYER_TYPE_NAMES}
    by_type = {_LAYER_TYPE_NAMES[name]: value for name, value in shape.items() if name in _LAYER_TYPE_NAMES}
    if by_type:
        fields["num_layers_by_type"] = by_type
    return fields


def _counted_shape(shape: dict) -> dict:
    """A candidate shape as `parameter_counter` reads it: a hybrid's depth as its total and its count per type."""
    fields = target_fields(shape)
    if "num_layers_by_type" in fields:
        fields["num_hidden_layers"] = sum(fields["num_layers_by_type"].values())
    return fields


def _axis_values(config: SearchConfig, name: str, source: int, floor: int = 1, step: int = 1) -> list[int]:
    grid = getattr(config, f"{name}_grid")
    if grid is not None:
        too_large = [v for v in grid if v > source]
        if too_large:
            raise ValueError(
                f"SearchConfig.{name}_grid holds {too_large}, larger than the teacher's {name}={source}: pruning only "
                f"removes structure. Use values <= {source}."
            )
        return grid
    if name == "num_key_value_heads":
        if not config.search_kv_heads:
            return [source]
        low = math.ceil(source * (1 - config.max_width_pruning))
        return [v for v in range(1, source + 1) if source % v == 0 and v >= low]
    if name == "num_hidden_layers":
        cap, multiple = config.max_depth_pruning, config.num_hidden_layers_multiple
    elif name in _LAYER_TYPE_NAMES:
        cap, multiple = config.max_depth_pruning, 1
    else:
        cap, multiple = config.width_cap(name), getattr(config, f"{name}_multiple")
    multiple = math.lcm(multiple, step)
    low = max(floor, math.ceil(source * (1 - cap)))
    return sorted({v for v in range(multiple, source + 1, multiple) if v >= low} | {source})


def _budget(config: SearchConfig, counts: dict) -> int:
    if config.count == "memory":
        return counts["total"] * dtype_size(config.memory_dtype)
    return counts[config.count]


def teacher_budget(model_config, config: SearchConfig) -> tuple[int, int]:
    """`(teacher's value, absolute target)` in the unit of `config.count`."""
    counts = parameter_counter(model_config)(model_shape(model_config))
    teacher = _budget(config, counts)
    target = config.target_params if config.target_params is not None else round(config.target_ratio * teacher)
    return teacher, target


def enumerate_candidates(model_config, config: SearchConfig) -> list[Candidate]:
    """Every architecture within `config`'s budget and search space, closest to the target first.

    Only shapes that `prune_model` accepts and stock transformers loads are kept (`PrunedConfig.validate_for` and
    `check_target_loads`). Raises `ValueError` naming the field to change when the budget cannot be met.
    """
    from .prune import check_target_loads

    get_architecture(model_config)
    source = search_shape(model_config)
    teacher, target = teacher_budget(model_config, config)
    unit = "bytes" if config.count == "memory" else f"{config.count} parameters"
    if target > teacher:
        field_name = "target_params" if config.target_params is not None else "target_ratio"
        raise ValueError(
            f"SearchConfig.{field_name} asks for {target:,} {unit}, more than the teacher's {teacher:,}: pruning only "
            f"removes parameters. Use a target below {teacher:,} (or target_ratio < 1)."
        )
    counter = parameter_counter(model_config)
    searched = searched_axes(model_config)
    # A token is routed to num_experts_per_tok experts: never fewer experts than that. Every B/C group of a Mamba
    # mixer keeps as many heads: Mamba head counts are multiples of n_groups.
    groups = source.get("n_groups", 1)
    floors = {"num_experts": source.get("num_experts_per_tok", 1), "mamba_num_heads": groups}
    steps = {"mamba_num_heads": groups}
    axes = {
        name: _axis_values(config, name, source[name], floors.get(name, 1), steps.get(name, 1)) for name, _ in searched
    }
    if "mamba_num_heads" in axes and any(v % groups for v in axes["mamba_num_heads"]):
        raise ValueError(
            f"SearchConfig.mamba_num_heads_grid={config.mamba_num_heads_grid} holds counts that are not multiples of "
            f"the teacher's n_groups={groups}: every B/C group keeps the same number of heads. Use multiples of "
            f"{groups}."
        )
    per_group = source["num_attention_heads"] // source["num_key_value_heads"]
    low, high = target * (1 - config.tolerance), target * (1 + config.tolerance)
    in_budget, reachable, rejected, refused = [], [], [], []
    for values in product(*(axes[name] for name, _ in searched)):
        shape = dict(zip((name for name, _ in searched), values))
        heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
        # Grouped-query structure: whole groups are removed, and a group keeps the same number of heads.
        if heads % kv or heads // kv > per_group:
            continue
        counts = counter(_counted_shape(shape))
        value = _budget(config, counts)
        reachable.append(value)
        if low <= value <= high:
            in_budget.append((abs(value - target), candidate_name(shape), shape, counts, value))
    base = config.base_pruned_config().to_dict()
    candidates, loads = [], {}
    for _, name, shape, counts, value in sorted(in_budget, key=lambda item: item[:2]):
        if config.max_candidates is not None and len(candidates) == config.max_candidates:
            logger.info("%d shapes in the budget; kept the %d closest to it.", len(in_budget), len(candidates))
            break
        pruned = PrunedConfig.from_dict({**base, **target_fields(shape)})
        try:
            target_shape = pruned.resolve(model_config)
        except ValueError as error:  # e.g. per-type layer counts that no contiguous block of layers holds
            refused.append(f"{name}: {error}")
            continue
        # Config classes validate the attention shape (hidden vs heads), not the MLP width: building one config per
        # attention shape instead of per candidate keeps large spaces (thousands of shapes) fast.
        key = tuple(v for k, v in sorted(target_shape.items()) if k != "intermediate_size")
        if key not in loads:
            try:
                check_target_loads(model_config, target_shape)
                loads[key] = None
            except ValueError as error:
                loads[key] = str(error)
        if loads[key] is not None:
            rejected.append(f"{name}: {loads[key]}")
            continue
        candidates.append(
            Candidate(
                name=name,
                pruned_config=pruned,
                shape=shape,
                num_parameters=counts["total"],
                num_non_embedding_parameters=counts["non_embedding"],
                memory_bytes=counts["total"] * dtype_size(config.memory_dtype),
                budget_value=value,
            )
        )
    if rejected and candidates:
        # e.g. SmolLM2's 9 heads: hidden sizes on multiples of 64 load only at 192, 384 and 576.
        logger.info(
            "%d shapes in the budget skipped because stock transformers would not load them (e.g. %s). Smaller "
            "or head-count-friendly *_multiple values widen the space.",
            len(rejected),
            rejected[0],
        )
    if refused and candidates:
        logger.info(
            "%d shapes in the budget skipped because prune_model refuses them (e.g. %s).", len(refused), refused[0]
        )
    if not candidates:
        reach = f"[{min(reachable):,}, {max(reachable):,}]" if reachable else "empty"
        detail = f" {len(rejected)} shape(s) in the budget would not load with stock transformers." if rejected else ""
        if refused:
            detail += f" {len(refused)} shape(s) in the budget are refused by PrunedConfig, e.g. {refused[0]}"
        raise ValueError(
            f"No candidate architecture within ±{config.tolerance:.0%} of {target:,} {unit} (teacher: {teacher:,}); "
            f"the search space reaches {reach}.{detail} Fix SearchConfig: raise `tolerance`, move `target_params` / "
            "`target_ratio` into that range, loosen `max_depth_pruning` / `max_width_pruning`, use smaller "
            "`*_multiple` values, or give explicit `*_grid` values."
        )
    return candidates


# ---------------------------------------------------------------------------------------------- the search
class _EvaluateAtSteps(TrainerCallback):
    """Evaluates the student at the chosen global steps of its retraining (the points of the loss-vs-steps curve)."""

    def __init__(self, steps, evaluate, record):
        self.steps, self.evaluate, self.record = steps, evaluate, record

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps and model is not None:
            self.record(state.global_step, self.evaluate(model))


def default_retraining_config(output_dir: str):
    """The `DistillationConfig` of the lightweight retraining when none is given: the Minitron KD loss (logit-only
    forward KL) at a constant learning rate, so the result at step k is that of k steps of training whatever
    `retrain_steps` is."""
    from ..distillation.config import DistillationConfig

    return DistillationConfig(
        output_dir=output_dir, lr_scheduler_type="constant", report_to="none", save_strategy="no"
    )


def _retraining_args(template, output_dir: str, config: SearchConfig, show_progress: bool):
    return replace(
        template,
        output_dir=output_dir,
        max_steps=config.retrain_steps,
        save_strategy="no",
        eval_strategy="no",
        load_best_model_at_end=False,
        report_to="none",
        logging_steps=config.eval_interval,
        disable_tqdm=template.disable_tqdm or not show_progress,
    )


def _settings(teacher, config: SearchConfig, template, metric: str, higher_is_better: bool, train, evaluation):
    """What a finished candidate's result depends on: a rerun reuses results only when these match."""
    ignored = {"output_dir", "logging_dir", "run_name", "disable_tqdm", "logging_steps", "report_to", "hub_token"}
    training = None
    if template is not None:
        training = {k: v for k, v in json.loads(template.to_json_string()).items() if k not in ignored}
    return {
        "teacher": model_shape(teacher.config),
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "teacher_fingerprint": _fingerprint(p.detach() for p in teacher.parameters()),
        "pruning": config.base_pruned_config().to_dict(),
        "retrain_steps": config.retrain_steps,
        "eval_steps": config.eval_steps,
        "eval_batch_size": config.eval_batch_size,
        "metric": metric,
        "higher_is_better": higher_is_better,
        "train_data": _data_fingerprint(train),
        "eval_data": _data_fingerprint(evaluation),
        "training": training,
    }


def _fingerprint(tensors, edge: int = 4096) -> str:
    """A hash of the first and last `edge` values of each tensor: tells two teachers (or datasets) apart without
    reading every weight of a large model."""
    digest = hashlib.sha256()
    for tensor in tensors:
        flat = tensor.reshape(-1)
        part = flat if flat.numel() <= 2 * edge else torch.cat([flat[:edge], flat[-edge:]])
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(part.to("cpu", torch.float64).numpy().tobytes())
    return digest.hexdigest()[:16]


def _data_fingerprint(dataset) -> dict | None:
    if dataset is None:
        return None
    samples = list(iter_samples(dataset))
    return {"samples": len(samples), "hash": _fingerprint(torch.as_tensor(s["input_ids"]) for s in samples)}


def _check_settings(output_dir: Path, settings: dict) -> None:
    path = output_dir / SETTINGS_NAME
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if changed:
            raise ValueError(
                f"{str(output_dir)!r} holds search results made with other settings ({', '.join(changed)} differ): "
                "finished candidates cannot be reused. Choose another output_dir, or delete this one to start over."
            )
    else:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(settings, indent=1, sort_keys=True))


def search_architectures(
    teacher,
    config: SearchConfig,
    train_dataset=None,
    eval_dataset=None,
    *,
    scores: ImportanceScores | None = None,
    calibration_data=None,
    output_dir: str | os.PathLike | None = None,
    scorer=None,
    higher_is_better: bool | None = None,
    distillation_config=None,
    processing_class=None,
    teacher_cache=None,
    show_progress: bool = True,
) -> SearchResult:
    """Searches the architectures within `config`'s budget: one importance pass, every candidate pruned from a copy
    of `teacher`, lightly retrained by distillation, evaluated along the way, and ranked.

    Args:
        teacher (`PreTrainedModel`): a supported `*ForCausalLM`. Its weights are never modified.
        config ([`SearchConfig`]): budget, search space, retraining steps and evaluation interval.
        train_dataset (*optional*): tokenized samples (`input_ids`, optional `attention_mask`) for the KD retraining;
            required when `config.retrain_steps > 0`.
        eval_dataset (*optional*): tokenized held-out samples for the held-out LM loss; required without `scorer`.
        scores ([`ImportanceScores`], *optional*): importance of `teacher`, to skip the importance pass.
        calibration_data (*optional*): samples for importance estimation and LM-loss depth selection; defaults to
            `train_dataset`.
        output_dir (`str`, *optional*): where the importance scores, one result per finished candidate and
            `search_results.{json,md,png}` are written. A rerun with the same settings skips finished candidates.
        scorer (`Callable[[PreTrainedModel], float]`, *optional*): ranks by this instead of the held-out loss, e.g.
            `make_lm_eval_scorer(tokenizer)` or `make_perplexity_scorer(dataset)`.
        higher_is_better (`bool`, *optional*): the direction of `scorer`; required with a scorer (both scorers of
            `hf_minitron.evaluation` are higher-is-better). The held-out loss is lower-is-better.
        distillation_config ([`DistillationConfig`], *optional*): the retraining hyperparameters (learning rate,
            batch size, KD loss, seed, ...). `max_steps` is `config.retrain_steps`, and checkpointing, Trainer
            evaluation and reporting are turned off. Defaults to [`default_retraining_config`].
        processing_class (*optional*): the tokenizer, passed to the trainer.
        teacher_cache (`str` or `datasets.Dataset`, *optional*): run the teacher once for all candidates instead of
            once per candidate (issue 15): `"hidden"` writes an exact cache of `train_dataset` ([`cache_teacher`]) to
            `output_dir/teacher_cache` (reused by a rerun; a temporary directory without `output_dir`), or pass a
            cache written from `teacher` (any mode; it is the training data when `train_dataset` is None). The
            candidates are then retrained from it without the teacher.
        show_progress (`bool`, *optional*, defaults to `True`): progress bars.

    Returns:
        [`SearchResult`]: every candidate's metric per step, ranks per step, the best candidate and when the ranking
        stabilised.
    """
    from .prune import compute_scores, prune_model

    # 1. Everything that can fail, before any forward pass.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "search_architectures runs in one process (each candidate is a short single-process training run): "
            "launch it without several processes, e.g. `accelerate launch --num_processes 1` or plain `python`."
        )
    candidates = enumerate_candidates(teacher.config, config)
    if scorer is None:
        if eval_dataset is None:
            raise ValueError(
                "search_architectures ranks by held-out loss without a scorer: pass eval_dataset (tokenized held-out "
                "samples), or a scorer with higher_is_better."
            )
        if higher_is_better is not None:
            raise ValueError("higher_is_better describes a scorer: drop it, or pass scorer= as well.")
        metric, higher_is_better = "heldout_loss", False
    else:
        if not callable(scorer):
            raise ValueError(f"scorer must be a callable model -> float, got {type(scorer).__name__}.")
        if not isinstance(higher_is_better, bool):
            raise ValueError(
                "A scorer needs an explicit direction: pass higher_is_better=True (e.g. accuracy, or the scorers of "
                "hf_minitron.evaluation) or higher_is_better=False (e.g. a loss)."
            )
        metric = "score"
    if isinstance(teacher_cache, str) and teacher_cache != "hidden":
        raise ValueError(
            f"teacher_cache={teacher_cache!r} is not supported: pass 'hidden' (an exact cache written here), or a "
            "teacher cache dataset written with hf_minitron.cache_teacher (e.g. mode='topk')."
        )
    if teacher_cache is not None and not isinstance(teacher_cache, str) and train_dataset is None:
        train_dataset = teacher_cache  # a cache holds its training samples
    if config.retrain_steps > 0 and train_dataset is None:
        raise ValueError(
            f"SearchConfig.retrain_steps={config.retrain_steps} needs train_dataset for the KD retraining: pass it, "
            "or set retrain_steps=0 to rank the pruned candidates without retraining."
        )
    for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
        if dataset is not None and hasattr(dataset, "__len__") and len(dataset) == 0:
            raise ValueError(f"search_architectures got an empty {name}: pass tokenized samples (input_ids).")
    base_config = config.base_pruned_config()
    calibration_data = calibration_data if calibration_data is not None else train_dataset
    if scores is None and base_config.importance == "activation" and calibration_data is None:
        raise ValueError(
            "Minitron importance needs calibration_data (or train_dataset): pass tokenized samples, precomputed "
            "scores=..., or set SearchConfig.pruning={'importance': 'magnitude'}."
        )
    if scores is not None:
        scores.check_compatible(teacher.config, teacher)
    template = distillation_config
    if template is None and config.retrain_steps > 0:
        template = default_retraining_config(tempfile.gettempdir())
    elif template is not None:
        from ..distillation.config import DistillationConfig

        if not isinstance(template, DistillationConfig):
            raise ValueError(f"distillation_config must be a DistillationConfig, got {type(template).__name__}.")
    root = Path(output_dir) if output_dir is not None else None
    if root is not None:
        if root.exists() and not root.is_dir():
            raise FileExistsError(f"output_dir {str(root)!r} is a file: choose a directory.")
        settings = _settings(teacher, config, template, metric, higher_is_better, train_dataset, eval_dataset)
        if teacher_cache is not None:  # a top-k cache changes the retraining
            settings["teacher_cache"] = teacher_cache if isinstance(teacher_cache, str) else _cache_mode(teacher_cache)
        _check_settings(root, settings)

    teacher_counts = {
        "total": count_parameters(teacher.config),
        "non_embedding": count_parameters(teacher.config, count="non_embedding"),
        "memory": count_parameters(teacher.config, count="memory", dtype=config.memory_dtype),
    }
    _, target = teacher_budget(teacher.config, config)
    was_training = teacher.training
    requires_grad = [p.requires_grad for p in teacher.parameters()]
    records = {c.name: _load_record(root, c.name) for c in candidates}
    temporary = None
    try:
        # 2. One importance pass (reused from output_dir on a rerun).
        if scores is None and root is not None and (root / "importance" / "importance.json").is_file():
            scores = ImportanceScores.load(root / "importance")
            scores.check_compatible(teacher.config, teacher)
        if scores is None:
            scores = compute_scores(teacher, base_config, calibration_data, show_progress)
            if root is not None:
                scores.save(root / "importance")

        evaluate = partial(_evaluate, eval_dataset=eval_dataset, batch_size=config.eval_batch_size, scorer=scorer)
        # 3. One teacher pass for every candidate's retraining (issue 15) when asked, instead of one per candidate.
        cache = None
        if teacher_cache is not None and config.retrain_steps > 0:
            cache, temporary = _teacher_cache(teacher, teacher_cache, train_dataset, root, processing_class,
                                              show_progress)  # fmt: skip

        def run(candidate: Candidate, retrain: bool) -> CandidateResult:
            record = records.get(candidate.name) or _new_record(candidate)
            start = time.perf_counter()
            student = copy.deepcopy(teacher)
            prune_model(student, candidate.pruned_config, calibration_data, scores=scores, show_progress=False)
            # The teacher may be frozen (the trainer freezes it): the copy must train.
            student.requires_grad_(True)

            def store(step: int, values: dict) -> None:
                record.metric[step] = values["metric"]
                if values["heldout_loss"] is not None:
                    record.heldout_loss[step] = values["heldout_loss"]

            if 0 not in record.metric:
                store(0, evaluate(student))
            if retrain:
                _retrain(student, teacher if cache is None else None, candidate, record, template, config, store,
                         evaluate, train_dataset if cache is None else cache, processing_class,
                         show_progress)  # fmt: skip
            record.retrained = retrain
            record.seconds += time.perf_counter() - start
            del student
            gc.collect()  # the trainer and the student reference each other: free them before the next candidate
            release_freed_memory()
            _save_record(root, record)
            return record

        def finished(name: str, steps: list[int]) -> bool:
            record = records.get(name)
            return record is not None and all(step in record.metric for step in steps)

        full_steps = config.eval_steps
        retrain_all = config.retrain_steps > 0 and config.retrain_top_k is None
        progress = tqdm(total=len(candidates), desc="Architecture search", unit="candidate", disable=not show_progress)
        for candidate in candidates:
            progress.set_postfix_str(candidate.name)
            if not finished(candidate.name, full_steps if retrain_all else [0]):
                records[candidate.name] = run(candidate, retrain=retrain_all)
            progress.update()
        progress.close()
        if config.retrain_steps > 0 and config.retrain_top_k is not None:
            # ModelOpt-style pre-selection: rank the pruned candidates, retrain only the best k.
            pool = _partial_result(candidates, records, [0], metric, higher_is_better, config, target, teacher_counts)
            top = [c.name for c in pool.ranking(0)[: config.retrain_top_k]]
            for candidate in tqdm([c for c in candidates if c.name in top], desc="Retraining the top candidates",
                                  unit="candidate", disable=not show_progress):  # fmt: skip
                if not finished(candidate.name, full_steps):
                    records[candidate.name] = run(candidate, retrain=True)
        if root is not None:
            scores.save(root / "importance")  # keeps the depth-selection losses computed on the way
    finally:
        teacher.train(was_training)
        for param, flag in zip(teacher.parameters(), requires_grad):
            param.requires_grad_(flag)
        if temporary is not None:
            temporary.cleanup()

    steps = full_steps if config.retrain_steps > 0 else [0]
    result = _partial_result(candidates, records, steps, metric, higher_is_better, config, target, teacher_counts)
    result.teacher["shape"] = model_shape(teacher.config)
    logger.info("Best candidate: %s; top order stable from step %s.", result.best.name, result.stable_step())
    if root is not None:
        result.save(root)
    return result


def _evaluate(model, eval_dataset, batch_size: int, scorer) -> dict:
    """`{"metric", "heldout_loss"}` of `model`: the scorer's value when there is one, else the held-out loss."""
    from ..evaluation import heldout_perplexity

    was_training = model.training
    try:
        with torch.no_grad():
            loss = heldout_perplexity(model, eval_dataset, batch_size)["loss"] if eval_dataset is not None else None
            value = float(scorer(model)) if scorer is not None else loss
    finally:
        model.train(was_training)
    return {"metric": value, "heldout_loss": loss}


def _retrain(
    student, teacher, candidate, record, template, config, store, evaluate, train, processing_class, progress
):
    from ..distillation.trainer import DistillationTrainer

    steps = set(config.eval_steps) - {0}
    with tempfile.TemporaryDirectory(prefix="hf-minitron-search-") as tmp:
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=_retraining_args(template, tmp, config, progress),
            train_dataset=train,
            processing_class=processing_class,
            callbacks=[_EvaluateAtSteps(steps, evaluate, store)],
        )
        if not progress:
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)  # with the bars off, Trainer prints every log dict instead
        trainer.train()
        for entry in trainer.state.log_history:
            if "loss" in entry and entry.get("step") in steps:
                record.train_loss[entry["step"]] = entry["loss"]
        del trainer
    missing = steps - set(record.metric)
    if missing:
        raise RuntimeError(
            f"Candidate {candidate.name} stopped before steps {sorted(missing)}: the training data is too short for "
            f"{config.retrain_steps} steps at this batch size? Check train_dataset."
        )


def _cache_mode(cache) -> dict:
    from ..distillation.teacher_cache import cache_directory, read_cache_info

    info = read_cache_info(cache_directory(cache))
    return {key: info[key] for key in ("mode", "dtype", "top_k", "temperature")}


def _teacher_cache(teacher, teacher_cache, train, root, tokenizer, show_progress):
    """`(cache dataset, temporary directory or None)`: the given cache (checked against the teacher and the data), or
    an exact one of `train` written under `root` (or a temporary directory)."""
    from ..distillation.teacher_cache import cache_teacher, check_teacher_cache

    if not isinstance(teacher_cache, str):
        check_teacher_cache(teacher_cache, teacher=teacher, dataset=None if train is teacher_cache else train)
        return teacher_cache, None
    temporary = None
    if root is None:
        temporary = tempfile.TemporaryDirectory(prefix="hf-minitron-teacher-cache-")
    directory = (root if root is not None else Path(temporary.name)) / "teacher_cache"
    cache = cache_teacher(teacher, train, directory, mode="hidden", tokenizer=tokenizer, show_progress=show_progress)
    return cache, temporary


def _new_record(candidate: Candidate) -> CandidateResult:
    return CandidateResult(
        name=candidate.name,
        pruned_config=candidate.pruned_config,
        shape=candidate.shape,
        parameters=candidate.parameters,
        budget_value=candidate.budget_value,
    )


def _load_record(root: Path | None, name: str) -> CandidateResult | None:
    path = root / "candidates" / name / "result.json" if root is not None else None
    if path is None or not path.is_file():
        return None
    return CandidateResult.from_dict(json.loads(path.read_text(encoding="utf-8")))


def _save_record(root: Path | None, record: CandidateResult) -> None:
    if root is None:
        return
    with atomic_directory(root / "candidates" / record.name, overwrite=True) as tmp:
        (tmp / "result.json").write_text(json.dumps(record.to_dict(), indent=1), encoding="utf-8")


def _partial_result(candidates, records, steps, metric, higher_is_better, config, target, teacher_counts):
    results = []
    for candidate in candidates:
        record = copy.deepcopy(records[candidate.name])
        record.rank = {}
        results.append(record)
    return SearchResult(
        candidates=results,
        steps=list(steps),
        metric=metric,
        higher_is_better=higher_is_better,
        count=config.count,
        target=target,
        tolerance=config.tolerance,
        teacher={"parameters": teacher_counts},
        config=config.to_dict(),
    )
