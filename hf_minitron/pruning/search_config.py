"""`SearchConfig`: the options of the architecture search ([paper 1](https://arxiv.org/abs/2407.14679) §3): the
parameter budget and what counts towards it, the axes and their steps, the retraining and how candidates are scored."""

import json
from dataclasses import asdict, dataclass, field, fields

from .config import PrunedConfig, target_fields
from .parameter_count import COUNT_KINDS, dtype_size


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
        # The search space's fields, one per axis (`SearchAxis`) where it has one: `max_<axis>_pruning`,
        # `<axis>_multiple`, `<axis>_grid`.
        names = [f.name for f in fields(self)]
        for name in (name for name in names if name.startswith("max_") and name.endswith("_pruning")):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(
                    f"SearchConfig.{name}={value!r} is invalid: expected the largest fraction removed, in [0, 1)."
                )
        multiples = [name for name in names if name.endswith("_multiple")]
        for name in (*multiples, "eval_interval", "eval_batch_size", "stability_top_k"):
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
        for name in (name for name in names if name.endswith("_grid")):
            grid = getattr(self, name)
            if grid is not None:
                if not grid or any(not _is_int(v) or v <= 0 for v in grid):
                    raise ValueError(
                        f"SearchConfig.{name}={grid!r} is invalid: expected a non-empty list of positive integers."
                    )
                setattr(self, name, sorted(set(grid)))
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
            shape_keys = sorted(set(self.pruning) & {*target_fields(), "layers_to_drop", "num_layers_by_type"})
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
