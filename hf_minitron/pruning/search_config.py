"""`SearchConfig`: the options of the architecture search ([paper 1](https://arxiv.org/abs/2407.14679) §3): the
parameter budget and what counts towards it, the axes and their steps, the retraining and how candidates are scored."""

import json
import textwrap
from dataclasses import asdict, field, fields, make_dataclass

from .config import PrunedConfig, shape_fields
from .parameter_count import COUNT_KINDS, dtype_size


_DOC = """The budget, the search space, and how candidates are retrained and ranked.

    The search space's fields come from the structures' search axes (`AXES`, `structures/search_axis.py`): for every
    axis `<name>_grid`, for an axis of multiples `<name>_multiple`, for an axis with its own cap `max_<name>_pruning`.

    Args:
        target_params (`int`, *optional*):
            The budget, in the unit of `count` (parameters, or bytes for `count="memory"`). Set it or `target_ratio`.
        target_ratio (`float`, *optional*):
            The budget as a fraction of the teacher's `count`, in (0, 1) (e.g. `0.5`).
        count (`str`, *optional*, defaults to `"total"`):
            What the budget counts: `"total"` parameters, `"non_embedding"` parameters, `"active"` parameters (those
            one token runs through, for MoE) or `"memory"` (bytes of the weights at `memory_dtype`).
        memory_dtype (`str`, *optional*, defaults to `"bfloat16"`):
            Element type of the `"memory"` count.
        tolerance (`float`, *optional*, defaults to `0.05`):
            Candidates are within `target * (1 ± tolerance)`.
        max_depth_pruning (`float`, *optional*, defaults to `0.2`):
            Largest fraction of the layers a candidate may remove (of each block type's layers in a hybrid, where one
            attention layer always stays).
        max_width_pruning (`float`, *optional*, defaults to `0.4`):
            Largest fraction of each width axis a candidate may remove. The defaults (20% depth, 40% width) are those
            of NVIDIA ModelOpt's Minitron search.
        max_<axis>_pruning (`float`, *optional*):
            Per-axis caps that replace `max_width_pruning` for that axis ({caps}).
        <axis>_multiple (`int`, *optional*):
            Generated sizes are multiples of these ({multiples}); the teacher's own size is always a candidate value.
            Heads are also multiples of the KV heads, a KV group never gains heads, and Mamba heads are multiples of
            the B/C groups. Shapes stock transformers refuses are skipped (Llama configs want the hidden size divisible
            by the head count): with 9 heads (SmolLM2), hidden multiples of 64 leave only 384 and 576 within the
            default cap; 48 gives more. The expert count never drops below `num_experts_per_tok`.
{switches}
        <axis>_grid (`list[int]`, *optional*):
            Explicit values of an axis ({grids}); they replace the generated ones (multiples and caps do not apply). A
            hybrid's depth is searched per block type (`num_mamba_layers`, ...: the candidates'
            `PrunedConfig.num_layers_by_type`); with the default `depth_method="contiguous"` only the counts that a
            block of consecutive layers holds are candidates: set `pruning={{"depth_method": "block_influence"}}` (or
            `"lm_loss"`) to search every count.
        max_candidates (`int`, *optional*):
            Keep at most this many candidates, the closest to the target.
        pruning (`dict` or `str`, *optional*):
            `PrunedConfig` options shared by every candidate (importance and depth selection, e.g.
            `{{"depth_method": "block_influence", "calibration_samples": 256}}`); no target-shape fields.
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


def _field(default, help: str, **metadata):
    return field(default=default, metadata={"help": help, **metadata})


_BUDGET_FIELDS = [
    ("target_params", int | None, _field(None, "Budget in units of `count` (or target_ratio).")),
    ("target_ratio", float | None, _field(None, "Budget as a fraction of the teacher, in (0, 1).")),
    ("count", str, _field("total", "What is counted.", choices=list(COUNT_KINDS))),
    ("memory_dtype", str, _field("bfloat16", "Element type of the 'memory' count.")),
    ("tolerance", float, _field(0.05, "Relative tolerance around the target.")),
    ("max_depth_pruning", float, _field(0.2, "Largest fraction of layers removed.")),
    ("max_width_pruning", float, _field(0.4, "Largest fraction removed per width axis.")),
]
_RETRAINING_FIELDS = [
    ("max_candidates", int | None, _field(None, "Keep the N candidates closest to target.")),
    (
        "pruning",
        dict | str | None,
        _field(None, "PrunedConfig options of every candidate (JSON on the command line)."),
    ),
    ("retrain_steps", int, _field(400, "KD steps per candidate (0: rank without retraining).")),
    ("eval_interval", int, _field(50, "Evaluate every this many steps.")),
    ("retrain_top_k", int | None, _field(None, "Retrain only the k best at step 0.")),
    ("eval_batch_size", int, _field(8, "Batch size of the held-out loss.")),
    ("stability_top_k", int, _field(3, "Top candidates whose order defines stability.")),
]


def _axis_fields(axes) -> tuple[list, list, list, list]:
    """The search-space fields of `axes`: caps, multiples, switches, grids (in that order in the dataclass)."""
    caps = [(f"max_{a.name}_pruning", float | None, _field(None, f"Cap for {a.column}.")) for a in axes if a.cap]
    multiples = [
        (f"{a.name}_multiple", int, _field(a.multiple_default, f"Generated {a.column} values are multiples of this."))
        for a in axes
        if a.multiple and a.values is None
    ]
    switches = [(a.switch[0], bool, _field(False, a.switch[1])) for a in axes if a.switch]
    grids = [(f"{a.name}_grid", list[int] | None, _field(None, f"Explicit {a.column} values.")) for a in axes]
    return caps, multiples, switches, grids


def _assembled_doc(caps, multiples, switches, grids) -> str:
    def names(entries):
        return ", ".join(f"`{name}`" for name, _, _ in entries)

    switch_doc = "\n".join(
        f"        {name} (`bool`, *optional*, defaults to `False`):\n            {f.metadata['help']}"
        for name, _, f in switches
    )
    defaults = ", ".join(f"`{name}`={f.default}" for name, _, f in multiples)
    doc = _DOC.format(caps=names(caps), multiples=defaults, switches=switch_doc, grids=names(grids))
    # The listed names make long lines: rewrap each paragraph of an entry at the docstring's width.
    return "\n".join(
        textwrap.fill(line, 119, subsequent_indent="            ", break_on_hyphens=False) for line in doc.split("\n")
    )


class _SearchConfigMethods:
    """What `SearchConfig` does with its fields; the search space's fields come from the structures' axes."""

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
            shape_keys = sorted(set(self.pruning) & set(shape_fields()))
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


def _build_search_config():
    from .search_results import search_axes  # the structures import torch: built once, on first import of this module

    caps, multiples, switches, grids = _axis_fields(search_axes())
    return make_dataclass(
        "SearchConfig",
        [*_BUDGET_FIELDS, *caps, *multiples, *switches, *grids, *_RETRAINING_FIELDS],
        bases=(_SearchConfigMethods,),
        namespace={"__doc__": _assembled_doc(caps, multiples, switches, grids), "__module__": __name__},
    )


# A dataclass like any other (`HfArgumentParser`, `asdict`, the signature IDEs complete), assembled so that a new
# structure's axes need no edit here.
SearchConfig = _build_search_config()
