"""`SearchAxis`: how the architecture search (`candidates.py`) varies one target of a structure.

Each structure module lists its axes in `AXES`; the search, its report and `SearchConfig`'s checks read them from there.
"""

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class SearchAxis:
    """One searched size.

    Args:
        name (`str`): the `PrunedConfig` field (and `model_shape` key) the axis sets.
        short (`str`): its prefix in a candidate's name, e.g. `"hidden"` in `layers24-hidden512-...`.
        column (`str`): its column in the search report.
        depth (`bool`, *optional*, defaults to `False`): capped by `SearchConfig.max_depth_pruning` (layers); otherwise
            by `max_<name>_pruning` where `SearchConfig` has one, else by `max_width_pruning`.
        multiple (`bool`, *optional*, defaults to `True`): generated values are multiples of
            `SearchConfig.<name>_multiple` (which `SearchConfig` then has); otherwise every count is tried.
        multiple_default (`int`, *optional*, defaults to `1`): the default of `SearchConfig.<name>_multiple`.
        cap (`bool`, *optional*, defaults to `False`): `SearchConfig` has its own `max_<name>_pruning`, replacing
            `max_width_pruning` for this axis when set.
        switch (`tuple[str, str]`, *optional*): `(name, help)` of a `SearchConfig` boolean, off by default, that the
            axis's own `values` read (KV heads are searched on request only).
        floor (`str`, *optional*): the `model_shape` key of the smallest value (e.g. `num_experts_per_tok`).
        step (`str`, *optional*): a `model_shape` key the values are always multiples of, grids included.
        step_reason (`str`, *optional*): why, in the error that refuses a grid off `step`.
        values (`Callable[[SearchConfig, int], list[int]]`, *optional*): the generated values, given the config and the
            teacher's size, for an axis searched its own way (KV heads: divisors, on request only).
        fits (`Callable[[dict, dict], bool]`, *optional*): whether a candidate shape's value of this axis suits the rest
            of the shape, given the teacher's (KV heads: every group keeps as many query heads); checked before the
            shape is counted, and a shape that does not fit is no candidate.
    """

    name: str
    short: str
    column: str
    depth: bool = False
    multiple: bool = True
    multiple_default: int = 1
    cap: bool = False
    switch: tuple[str, str] | None = None
    floor: str | None = None
    step: str | None = None
    step_reason: str = ""
    values: Callable | None = None
    fits: Callable | None = None
