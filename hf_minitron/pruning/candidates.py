"""The candidate shapes of the architecture search: every shape within the parameter budget, on the configured
multiples and caps, that stock transformers can load (paper 1 §3 step 1)."""

import logging
import math
from dataclasses import dataclass
from itertools import product

from ..architectures import get_architecture
from .config import PrunedConfig
from .importance import model_shape
from .parameter_count import counts_layer_by_layer, dtype_size, parameter_counter
from .search_config import SearchConfig
from .search_results import axes_of
from .structures import depth, structures_of
from .structures.depth import layer_counts_by_type
from .structures.search_axis import SearchAxis


logger = logging.getLogger(__name__)


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
    return "-".join(f"{axis.short}{shape[axis.name]}" for axis in axes_of(shape))


def search_shape(model_config) -> dict:
    """The teacher's sizes under the searched axes' names: `model_shape`, where a hybrid's depth is its layers of each
    block type (`num_mamba_layers`, ...) instead of `num_hidden_layers`."""
    shape = model_shape(model_config)
    counts = layer_counts_by_type(model_config)
    if counts is not None:
        del shape["num_hidden_layers"]
        shape |= {f"num_{block}_layers": count for block, count in counts.items()}
    return shape


def searched_axes(model_config) -> tuple[SearchAxis, ...]:
    """The axes of `model_config`'s family: those of depth and of its structures (`AXES`). A hybrid has those of the
    block types its layers hold (a Nemotron-H without MoE layers: no expert axes) and of the blocks in every layer,
    and its depth per block type."""
    blocks = layer_counts_by_type(model_config)
    spec = get_architecture(model_config)
    # A block no block type names is in every layer (Llama 4's or DeepSeek-V3's attention).
    typed = dict(spec.block_types) | ({"mlp": "mlp", "moe": "moe"} if spec.dense_layers_field else {})
    structures = [s for s in structures_of(spec) if blocks is None or s.BLOCK not in typed or s.BLOCK in blocks]
    names = {axis.name for structure in (depth, *structures) for axis in structure.AXES}
    names |= {axis.name for axis in depth.BLOCK_TYPE_AXES}
    if counts_layer_by_layer(model_config):  # a candidate's size would depend on which layers go: not searched
        names -= {"num_hidden_layers", *(axis.name for axis in depth.BLOCK_TYPE_AXES)}
    return tuple(axis for axis in axes_of(search_shape(model_config)) if axis.name in names)


_LAYER_TYPE_NAMES = {axis.name: axis.name[len("num_") : -len("_layers")] for axis in depth.BLOCK_TYPE_AXES}


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


def _axis_values(config: SearchConfig, axis: SearchAxis, source: dict) -> list[int]:
    """The values of `axis` a candidate takes: its grid, or its own values (`axis.values`), or the multiples within its
    cap, from its floor (`axis.floor`), always with the teacher's size."""
    name = axis.name
    grid = getattr(config, f"{name}_grid")
    if grid is not None:
        too_large = [v for v in grid if v > source[name]]
        if too_large:
            raise ValueError(
                f"SearchConfig.{name}_grid holds {too_large}, larger than the teacher's {name}={source[name]}: pruning "
                f"only removes structure. Use values <= {source[name]}."
            )
        return grid
    if axis.values is not None:
        return axis.values(config, source[name])
    cap = config.max_depth_pruning if axis.depth else config.width_cap(name)
    multiple = getattr(config, f"{name}_multiple") if axis.multiple else 1
    multiple = math.lcm(multiple, source[axis.step] if axis.step else 1)
    low = max(source[axis.floor] if axis.floor else 1, math.ceil(source[name] * (1 - cap)))
    return sorted({v for v in range(multiple, source[name] + 1, multiple) if v >= low} | {source[name]})


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
    axes = {axis.name: _axis_values(config, axis, source) for axis in searched}
    for axis in searched:
        step = source[axis.step] if axis.step else 1
        if any(v % step for v in axes[axis.name]):  # only a grid can be off the step
            raise ValueError(
                f"SearchConfig.{axis.name}_grid={getattr(config, f'{axis.name}_grid')} holds counts that are not "
                f"multiples of the teacher's {axis.step}={step}: {axis.step_reason}. Use multiples of {step}."
            )
    fits = [axis.fits for axis in searched if axis.fits is not None]
    low, high = target * (1 - config.tolerance), target * (1 + config.tolerance)
    in_budget, reachable, rejected, refused = [], [], [], []
    for values in product(*axes.values()):
        shape = dict(zip(axes, values))
        if not all(fit(shape, source) for fit in fits):
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
