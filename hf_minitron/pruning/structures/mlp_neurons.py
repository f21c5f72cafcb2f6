"""MLP neurons of a dense feed-forward block: scores, selection, slicing, counting.

* Score (paper 1 §2.2): the input of `down_proj` (the neuron activations), reduced over the tokens of each sample and
  over samples.
* Selection: the top neurons of each layer, each layer its own indices, every layer the same count; or, for a family
  whose stock modelling reads one width per layer (Gemma 3n, `ArchitectureSpec.mlp_width_per_layer`), a width per
  layer: given (`intermediate_size_per_layer`), or chosen by importance under the uniform target's budget
  (`mlp_width_allocation="global"`, `allocate_widths`).
* Slicing: rows of `gate_proj` / `up_proj` (or of both halves of a fused `gate_up_proj`), columns of `down_proj`.

Per-layer widths in a shape: `intermediate_size` is the widest layer's, and `intermediate_size_per_layer` lists every
layer's when they differ (`shape`); `count_parameters` counts each layer with its own (`count_sizes_per_layer`).

The same functions serve any gated or plain MLP at another path (the shared expert of Qwen2-MoE reuses them, see
`shared_expert_neurons.py`).
"""

import torch

from ...architectures import ARCHITECTURES, get_decoder_layers
from .fields import ConfigField, target_names
from .search_axis import SearchAxis
from .slicing import slice_linear, topk_sorted
from .statistics import PER_SAMPLE, add_per_sample, reduce_per_sample, static_scores


KEY = "neurons"
SCORE_KEYS = (KEY,)
PER_LAYER = "intermediate_size_per_layer"
ALLOCATIONS = ("uniform", "global")
CONFIG_FIELDS = (
    ConfigField(
        "intermediate_size",
        doc="""Target number of MLP neurons per layer (of the dense layers' MLP: Llama 4's `intermediate_size_mlp`). With
`mlp_width_allocation="global"`, the average: the budget of neurons that importance shares out.""",
        help="Target MLP intermediate size.",
    ),
    ConfigField(
        PER_LAYER,
        doc="""A target MLP width for each layer, one entry per layer (instead of `intermediate_size`), for the
families whose stock modelling reads one width per layer (Gemma 3n's list-valued `intermediate_size`); refused
for the others, whose pruned model would not reload.""",
        help="Target MLP width of each layer (families with per-layer widths: Gemma 3n).",
        type=list[int] | None,
        target=False,
        sets_shape=True,
    ),
    ConfigField(
        "mlp_width_allocation",
        doc="""How `intermediate_size` is met: `"uniform"` (the papers: every layer keeps that many neurons) or
`"global"` (beyond the papers: every layer's neurons are ranked together, each layer's scores divided by
their mean, and the top `intermediate_size x layers` are kept, each layer's width a multiple of
`mlp_width_multiple` and at least `mlp_width_floor x intermediate_size`: the same parameter budget, widths
chosen by importance). `"global"` only for the families whose modelling reads per-layer widths.""",
        help="MLP widths: 'uniform' (every layer alike) or 'global' (importance chooses each layer's, same budget).",
        type=str,
        default="uniform",
        choices=ALLOCATIONS,
        target=False,
    ),
    ConfigField(
        "mlp_width_multiple",
        doc='`mlp_width_allocation="global"`: each layer\'s width is a multiple of it (kernels favour round widths).',
        help="Global MLP width allocation: each layer's width is a multiple of this.",
        type=int,
        default=8,
        target=False,
    ),
    ConfigField(
        "mlp_width_floor",
        doc='`mlp_width_allocation="global"`: no layer keeps fewer than this fraction of `intermediate_size`.',
        help="Global MLP width allocation: the smallest width, as a fraction of intermediate_size.",
        type=float,
        default=0.25,
        target=False,
    ),
)
FIELDS = target_names(CONFIG_FIELDS)
BLOCK = "mlp"
AXES = (SearchAxis("intermediate_size", "mlp", "MLP", multiple_default=64, cap=True),)
CARD_ROWS = {"intermediate_size": "MLP intermediate size"}
SUMMARY = (*FIELDS, PER_LAYER)  # the per-layer widths where they differ (see `shape`)
RECORD = ("neurons",)
_FIELD = FIELDS[0]


def present(spec) -> bool:
    return spec.mlp is not None


def _width_field(spec) -> str:
    """The family's config field of the dense MLP's width (a spec passed in describes a usual dense family)."""
    return "intermediate_size" if spec is None else spec.mlp_width_field


def shape(model_config, spec) -> dict:
    # A family whose feed-forward blocks are all experts may have no dense width (Qwen3.5-MoE's config).
    if getattr(model_config, _width_field(spec), None) is None:
        return {}
    width = built_width(model_config, spec)
    if isinstance(width, (list, tuple)):  # one width per layer (Gemma 3n)
        widths = [int(w) for w in width]
        return {_FIELD: max(widths)} | ({PER_LAYER: widths} if len(set(widths)) > 1 else {})
    return {_FIELD: width}


def built_width(model_config, spec) -> int | list[int]:
    """The MLP width the modeling code builds: `intermediate_size` (a list, one per layer, for Gemma 3n), or LFM2's
    rescaling of it when the config's `mlp_auto_adjust_field` flag is on (see `ArchitectureSpec`)."""
    width = getattr(model_config, _width_field(spec))
    if spec is None or spec.mlp_auto_adjust_field is None or not getattr(model_config, spec.mlp_auto_adjust_field):
        return width
    width = int(2 * width / 3)
    multiplier, multiple = model_config.block_ffn_dim_multiplier, model_config.block_multiple_of
    if multiplier is not None:
        width = multiple * ((int(multiplier * width) + multiple - 1) // multiple)
    return width


def check_applies(config, model_config, shape: dict, spec) -> None:
    """Refuses an MLP width for a model whose feed-forward blocks are all mixtures of experts, per-layer widths for a
    family whose modelling builds every layer alike, and pruning a model whose widths already differ by layer."""
    per_layer = getattr(config, PER_LAYER) is not None or config.mlp_width_allocation == "global"
    if per_layer and (spec is None or not spec.mlp_width_per_layer):
        field = PER_LAYER if getattr(config, PER_LAYER) is not None else "mlp_width_allocation"
        families = sorted(k for k, v in ARCHITECTURES.items() if v.mlp_width_per_layer)
        raise ValueError(
            f"PrunedConfig.{field}={getattr(config, field)!r} does not apply to model_type="
            f"{model_config.model_type!r}: its modelling builds every layer's MLP from one {_width_field(spec)}, so a "
            f"model with different widths per layer would not reload with from_pretrained. Use intermediate_size with "
            f'mlp_width_allocation="uniform" (per-layer widths: {", ".join(families)}).'
        )
    if PER_LAYER in shape:
        raise ValueError(
            f"This model_type={model_config.model_type!r} model's MLP widths already differ by layer "
            f"({shape[PER_LAYER]}): pruning it again is not supported (its neuron scores are one row per layer of one "
            "width). count_parameters(model.config) counts it; prune the source model to the final widths instead."
        )
    width = getattr(config, _FIELD)
    if width is None or spec is None or spec.moe is None:
        return
    all_moe = spec.mlp is None
    if spec.moe_layers_field is not None:  # Llama 4: dense MLPs in the layers moe_layers does not list
        all_moe = set(range(model_config.num_hidden_layers)) <= set(getattr(model_config, spec.moe_layers_field))
    if all_moe:
        raise ValueError(
            f"PrunedConfig.{_FIELD}={width} does not apply: every feed-forward block of this "
            f"model_type={model_config.model_type!r} model is a mixture of experts, with no dense MLP. Use "
            "moe_intermediate_size for each expert's width (and shared_expert_intermediate_size for a shared "
            "expert)."
        )


def check_target(config, model_config=None, shape: dict | None = None) -> None:
    """Any width up to the source's (checked by `PrunedConfig.validate_for` for every target); per-layer widths, one
    positive entry per layer, each up to that layer's; the options of the global allocation."""
    widths = getattr(config, PER_LAYER)
    if shape is None:  # the config alone, when it is built
        if widths is not None:
            if (
                not isinstance(widths, (list, tuple))
                or not widths
                or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths)
            ):
                raise ValueError(
                    f"PrunedConfig.{PER_LAYER}={widths!r} is invalid: expected a list of positive integers, one MLP "
                    "width per layer, e.g. [8192, 6144, 8192], or None."
                )
            if config.intermediate_size is not None:
                raise ValueError(
                    f"PrunedConfig.{PER_LAYER} gives every layer's MLP width, and intermediate_size="
                    f"{config.intermediate_size} one for all: set only one (leave intermediate_size None)."
                )
            if config.mlp_width_allocation == "global":
                raise ValueError(
                    f"PrunedConfig.{PER_LAYER} gives every layer's MLP width, which mlp_width_allocation='global' "
                    "would choose: set only one (leave mlp_width_allocation 'uniform')."
                )
        if config.mlp_width_allocation == "global" and config.intermediate_size is None:
            raise ValueError(
                'PrunedConfig.mlp_width_allocation="global" shares out intermediate_size x layers neurons by '
                "importance: set intermediate_size (the average width), e.g. half the source's."
            )
        multiple = config.mlp_width_multiple
        if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple <= 0:
            raise ValueError(f"PrunedConfig.mlp_width_multiple={multiple!r} is invalid: expected a positive integer.")
        floor = config.mlp_width_floor
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor <= 1:
            raise ValueError(
                f"PrunedConfig.mlp_width_floor={floor!r} is invalid: expected a fraction of intermediate_size between "
                "0 and 1, e.g. 0.25."
            )
        return
    if widths is None or _FIELD not in shape:
        return
    num_layers = model_config.num_hidden_layers
    source = shape.get(PER_LAYER) or [shape[_FIELD]] * num_layers
    if len(widths) != num_layers:
        raise ValueError(
            f"PrunedConfig.{PER_LAYER} has {len(widths)} entries, but the model has {num_layers} layers: give one "
            f"width per layer, e.g. {[min(widths[0], w) for w in source]}."
        )
    for index, (width, limit) in enumerate(zip(widths, source)):
        if width > limit:
            raise ValueError(
                f"PrunedConfig.{PER_LAYER}[{index}]={width} is larger than layer {index}'s MLP width {limit}: pruning "
                f"only removes neurons. Use a value <= {limit}."
            )


def complete_target(config, model_config, target: dict) -> None:
    """Adds per-layer widths to a resolved `target`: `intermediate_size` is then the widest layer's."""
    widths = getattr(config, PER_LAYER)
    if widths is not None:
        target[PER_LAYER] = list(widths)
        target[_FIELD] = max(widths)


def allocate_widths(
    scores: list[torch.Tensor],
    total: int,
    source: list[int],
    multiple: int = 8,
    floor: int = 0,
    normalise: bool = True,
) -> list[int]:
    """Each layer's MLP width when `total` neurons are shared out by importance (`mlp_width_allocation="global"`).

    Each layer's scores are divided by their mean first. Activation magnitudes are not comparable across layers (the
    residual stream grows with depth, and each layer's pre-MLP norm has its own scale), so raw scores would hand the
    budget to the layers with the largest activations, not to the neurons that matter most. Divided by its layer's
    mean, a score says how much a neuron stands out in its own layer: every layer's scores then sum to its width,
    and it is the *shape* of a layer's distribution that decides its width (a layer whose importance sits in a few
    neurons gives up the rest; a layer whose neurons all matter keeps more). Equal distributions give equal widths.

    Every layer first keeps its top `floor` neurons (at most its source width); the rest of the budget goes in blocks
    of `multiple` consecutive neurons of a layer's ranking, the blocks of highest mean normalised score first (within a
    layer they come in ranking order, so this keeps the highest total normalised score). The widths sum to `total`
    when it and the floors are multiples of `multiple`, otherwise to less by under `multiple`.

    Args:
        scores (`list[torch.Tensor]`): `[width]` neuron scores of each layer (non-negative).
        total (`int`): neurons to keep in all the layers together (the uniform target x the number of layers).
        source (`list[int]`): each layer's width (its most).
        multiple (`int`, *optional*, defaults to `8`): each width is a multiple of it (or the source width).
        floor (`int`, *optional*, defaults to `0`): the fewest neurons a layer keeps.
        normalise (`bool`, *optional*, defaults to `True`): divide each layer's scores by their mean; `False` ranks
            the raw scores (the ablation of `benchmarks/per_layer_widths.py`).

    Returns:
        `list[int]`: each layer's width.
    """
    tiny = torch.finfo(torch.float32).tiny
    normalised = [s.float() / (s.float().mean().clamp_min(tiny) if normalise else 1) for s in scores]
    ranked = [torch.sort(s, descending=True).values for s in normalised]
    widths = [min(floor, width) for width in source]
    blocks = []  # (mean normalised score, layer, size), in ranking order within a layer
    for layer, (values, start, width) in enumerate(zip(ranked, widths, source)):
        for begin in range(start, width, multiple):
            end = min(begin + multiple, width)
            blocks.append((values[begin:end].mean().item(), layer, end - begin))
    budget = total - sum(widths)
    # Stable: ties go to the earlier layer, and a layer's blocks keep their order (their means never increase).
    for _, layer, size in sorted(blocks, key=lambda block: -block[0]):
        if size <= budget:
            widths[layer] += size
            budget -= size
    return widths


def mlp_hooks(collector, index: int, mlp, spec, key: str) -> list:
    store = collector.store(key, index)

    def neurons_hook(module, args):
        x = args[0]
        if x.dim() == 2:  # inside an MoE block (a shared expert) the tokens arrive flattened: [B * S, width]
            x = x.view(*collector.mask.shape, -1)
        add_per_sample(store, x, collector.sample_mask, collector.how)

    return [getattr(mlp, spec.down_proj).register_forward_pre_hook(neurons_hook)]


def mlp_magnitude(mlp, spec, width: int) -> torch.Tensor:
    """`[width]`: L2 norm of each neuron's input rows and output column."""
    down = getattr(mlp, spec.down_proj).weight.float()
    if spec.gate_up_proj:
        gate_up = getattr(mlp, spec.gate_up_proj).weight.float().pow(2)
        ins = gate_up[:width].sum(1) + gate_up[width:].sum(1)
    else:
        ins = getattr(mlp, spec.up_proj).weight.float().pow(2).sum(1)
        if spec.gate_proj:
            ins = ins + getattr(mlp, spec.gate_proj).weight.float().pow(2).sum(1)
    return (ins + down.pow(2).sum(0)).sqrt()


def mlp_hidden_weights(mlp, spec) -> tuple[list, list]:
    reads = [getattr(mlp, n).weight for n in (spec.gate_proj, spec.up_proj, spec.gate_up_proj) if n]
    return reads, [getattr(mlp, spec.down_proj).weight]


def slice_mlp_hidden(mlp, spec, kept: torch.Tensor) -> None:
    for name in (spec.gate_proj, spec.up_proj, spec.gate_up_proj):
        if name:
            slice_linear(getattr(mlp, name), in_index=kept)
    slice_linear(getattr(mlp, spec.down_proj), out_index=kept)


def slice_mlp(mlp, spec, width: int, kept: torch.Tensor) -> None:
    if spec.gate_up_proj:
        slice_linear(getattr(mlp, spec.gate_up_proj), out_index=torch.cat([kept, kept + width]))
    else:
        slice_linear(getattr(mlp, spec.up_proj), out_index=kept)
        if spec.gate_proj:
            slice_linear(getattr(mlp, spec.gate_proj), out_index=kept)
    slice_linear(getattr(mlp, spec.down_proj), in_index=kept)


def prune_mlps(
    layers, mlp_path: str, spec, neuron_scores, source_width: int, target_width: int, kept_layers, block: str = BLOCK
):
    """Slices the MLP at `mlp_path` of every kept layer that holds `block`; returns `{new layer index: kept
    neurons}`."""
    kept_per_layer = {}
    if target_width >= source_width:
        return kept_per_layer
    for new_idx, src_idx in enumerate(kept_layers):
        if not spec.has(layers[new_idx], block):
            continue
        kept = topk_sorted(neuron_scores[src_idx], target_width)
        slice_mlp(layers[new_idx].get_submodule(mlp_path), spec, source_width, kept)
        kept_per_layer[new_idx] = kept.tolist()
    return kept_per_layer


def mlp_count_roles(path: str, spec, symbol: str) -> dict[str, tuple]:
    roles = {}
    fused = f"2{symbol}"
    for name, rows in ((spec.gate_proj, symbol), (spec.up_proj, symbol), (spec.gate_up_proj, fused)):
        if name:
            roles[f"{path}.{name}"] = (rows, "h")
    roles[f"{path}.{spec.down_proj}"] = ("h", symbol)
    return roles


# ---------------------------------------------------------------------------------------------- the dense MLP
def hooks(collector, index: int, layer) -> list:
    return mlp_hooks(collector, index, getattr(layer, collector.spec.mlp), collector.spec, KEY)


def sites(spec) -> list[tuple[int, str, int, str]]:
    return [(3, KEY, 0, f"input of {spec.mlp}.{spec.down_proj}")]


def score_shapes(shape: dict) -> dict[str, tuple]:
    """`{score key: per-layer dims}` that every statistic of the key starts with."""
    return {KEY: (shape[_FIELD],)}


def collect(collector, shape: dict, device) -> dict[str, dict]:
    """`{score key: statistics}` of the importance pass, summed over processes."""
    return {KEY: collector.stacked(KEY, shape[_FIELD], 1, PER_SAMPLE, device)}


def random_scores(key: str, shape: dict, draw) -> dict:
    """The random baseline's scores (`draw(*dims)` draws `[num_layers, *dims]`)."""
    return {"score": draw(shape[_FIELD])}


def magnitude_scores(model, layers, spec, shape: dict) -> dict[str, dict]:
    """`{score key: {"score": ...}}` of the weight-magnitude baseline."""
    return {KEY: static_scores([magnitude(layer, spec, shape) for layer in layers])}


def scores(importance, batch_aggregation: str) -> torch.Tensor:
    """`[num_layers, intermediate_size]` MLP-neuron importance."""
    return reduce_per_sample(importance.neurons, batch_aggregation, importance.num_samples)


def magnitude(layer, spec, shape) -> torch.Tensor:
    if not spec.has(layer, BLOCK):  # a hybrid's layer without an MLP: a zero row, never used
        return torch.zeros(shape[_FIELD])
    return mlp_magnitude(getattr(layer, spec.mlp), spec, shape[_FIELD])


def hidden_weights(layer, spec) -> tuple[list, list]:
    return mlp_hidden_weights(getattr(layer, spec.mlp), spec)


def slice_hidden(layer, spec, kept: torch.Tensor) -> None:
    slice_mlp_hidden(getattr(layer, spec.mlp), spec, kept)


def prune(model, layers, spec, importance, source: dict, target: dict, kept_layers, record, config) -> None:
    given = target.get(PER_LAYER)
    if (target[_FIELD] if given is None else min(given)) >= source[_FIELD]:
        return  # every layer keeps its width
    if given is None and config.mlp_width_allocation == "uniform":
        neuron_scores = scores(importance, config.batch_aggregation)
        record.neurons.update(
            prune_mlps(layers, spec.mlp, spec, neuron_scores, source[_FIELD], target[_FIELD], kept_layers)
        )
        return
    # One width per layer (a family whose modelling reads them, see `check_applies`; its depth is not pruned).
    neuron_scores = scores(importance, config.batch_aggregation)
    mlp_layers = [i for i in range(len(kept_layers)) if spec.has(layers[i], BLOCK)]
    if given is not None:
        widths = list(given)
    else:
        width = target[_FIELD]
        multiple = config.mlp_width_multiple
        chosen = allocate_widths(
            [neuron_scores[kept_layers[i]] for i in mlp_layers],
            width * len(mlp_layers),
            [source[_FIELD]] * len(mlp_layers),
            multiple,
            max(multiple, int(config.mlp_width_floor * width) // multiple * multiple),
        )
        widths = [source[_FIELD]] * len(kept_layers)
        for i, w in zip(mlp_layers, chosen):
            widths[i] = w
        # The widths chosen are the target's: the config and the record say them.
        target[PER_LAYER] = widths
        target[_FIELD] = max(widths)
        record.target_shape.update({PER_LAYER: widths, _FIELD: max(widths)})
    for i in mlp_layers:
        if widths[i] < source[_FIELD]:
            kept = topk_sorted(neuron_scores[kept_layers[i]], widths[i])
            slice_mlp(layers[i].get_submodule(spec.mlp), spec, source[_FIELD], kept)
            record.neurons[i] = kept.tolist()


def update_config(model_config, spec, source: dict, target: dict) -> None:
    width = target[_FIELD]
    if spec.mlp_width_per_layer:  # Gemma 3n reads config.intermediate_size[layer_idx]
        width = list(target.get(PER_LAYER) or [width] * model_config.num_hidden_layers)
    setattr(model_config, _width_field(spec), width)
    if spec.mlp_auto_adjust_field is not None:  # the saved width is the built one (see `built_width`)
        setattr(model_config, spec.mlp_auto_adjust_field, False)


def sync_modules(model, model_config, spec) -> None:
    if spec.mlp_width_per_layer:
        for layer, width in zip(get_decoder_layers(model), getattr(model_config, _width_field(spec))):
            getattr(layer, spec.mlp).intermediate_size = width
        return
    if _width_field(spec) != "intermediate_size":
        return  # Llama 4's dense MLP caches no width; its experts' `intermediate_size` is theirs (expert_neurons)
    for module in model.modules():
        if isinstance(getattr(module, _FIELD, None), int) and not isinstance(module, torch.nn.Linear):
            module.intermediate_size = model_config.intermediate_size


def count_roles(spec, layer) -> dict[str, tuple]:
    """`f` the neurons, `2f` a fused gate/up projection, `h` the hidden size."""
    return mlp_count_roles(spec.mlp, spec, "f")


def count_sizes(shape: dict) -> dict[str, int]:
    return {"f": shape[_FIELD], "2f": 2 * shape[_FIELD]}


def count_sizes_per_layer(shape: dict) -> list[dict[str, int]] | None:
    """Each layer's `count_sizes` when the widths differ by layer (`None` when they are alike)."""
    widths = shape.get(PER_LAYER)
    return None if widths is None else [{"f": w, "2f": 2 * w} for w in widths]
