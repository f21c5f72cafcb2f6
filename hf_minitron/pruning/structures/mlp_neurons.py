"""MLP neurons of a dense feed-forward block: scores, selection, slicing, counting.

* Score (paper 1 §2.2): the input of `down_proj` (the neuron activations), reduced over the tokens of each sample and
  over samples.
* Selection: the top neurons of each layer, each layer its own indices, every layer the same count.
* Slicing: rows of `gate_proj` / `up_proj` (or of both halves of a fused `gate_up_proj`), columns of `down_proj`.

The same functions serve any gated or plain MLP at another path (the shared expert of Qwen2-MoE reuses them, see
`shared_expert_neurons.py`).
"""

import torch

from .fields import ConfigField, target_names
from .search_axis import SearchAxis
from .slicing import slice_linear, topk_sorted
from .statistics import PER_SAMPLE, add_per_sample, reduce_per_sample, static_scores


KEY = "neurons"
SCORE_KEYS = (KEY,)
CONFIG_FIELDS = (
    ConfigField(
        "intermediate_size",
        doc="Target number of MLP neurons per layer (of the dense layers' MLP: Llama 4's `intermediate_size_mlp`).",
        help="Target MLP intermediate size.",
    ),
)
FIELDS = target_names(CONFIG_FIELDS)
BLOCK = "mlp"
AXES = (SearchAxis("intermediate_size", "mlp", "MLP", multiple_default=64, cap=True),)
CARD_ROWS = {"intermediate_size": "MLP intermediate size"}
SUMMARY = FIELDS
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
    return {_FIELD: built_width(model_config, spec)}


def built_width(model_config, spec) -> int:
    """The MLP width the modeling code builds: `intermediate_size`, or LFM2's rescaling of it when the config's
    `mlp_auto_adjust_field` flag is on (see `ArchitectureSpec`)."""
    width = getattr(model_config, _width_field(spec))
    if spec is None or spec.mlp_auto_adjust_field is None or not getattr(model_config, spec.mlp_auto_adjust_field):
        return width
    width = int(2 * width / 3)
    multiplier, multiple = model_config.block_ffn_dim_multiplier, model_config.block_multiple_of
    if multiplier is not None:
        width = multiple * ((int(multiplier * width) + multiple - 1) // multiple)
    return width


def check_applies(config, model_config, shape: dict, spec) -> None:
    """Refuses an MLP width for a model whose feed-forward blocks are all mixtures of experts."""
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
    """Any width up to the source's (checked by `PrunedConfig.validate_for` for every target)."""


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
    if target[_FIELD] < source[_FIELD]:
        neuron_scores = scores(importance, config.batch_aggregation)
        record.neurons.update(
            prune_mlps(layers, spec.mlp, spec, neuron_scores, source[_FIELD], target[_FIELD], kept_layers)
        )


def update_config(model_config, spec, source: dict, target: dict) -> None:
    setattr(model_config, _width_field(spec), target[_FIELD])
    if spec.mlp_auto_adjust_field is not None:  # the saved width is the built one (see `built_width`)
        setattr(model_config, spec.mlp_auto_adjust_field, False)


def sync_modules(model, model_config, spec) -> None:
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
