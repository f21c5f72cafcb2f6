"""Neurons of a shared expert (the always-active MLP inside the MoE block of Qwen2-MoE and Nemotron-H): the
MLP-neuron structure of `mlp_neurons.py` at another path, with its own config field
(`shared_expert_intermediate_size`; Nemotron-H's `moe_shared_expert_intermediate_size`).

DeepSeek-V3's shared expert is one MLP of `n_shared_experts x moe_intermediate_size` (`shared_expert_count_field`),
with no width field of its own: its pruned width must be a multiple of the pruned expert width, and `n_shared_experts`
is rewritten to their ratio (exactly what the modeling code multiplies back at load).

Qwen2-MoE's shared expert has a gate (`shared_expert_gate`, `Linear(hidden, 1)`), which reads the hidden size only:
hidden pruning slices its columns. Nemotron-H's has none (`shared_expert_gate=None`). Granite 4's sits beside the MoE block, in the decoder layer
(`shared_expert_in_layer`).
"""

import torch

from .fields import ConfigField, target_names
from .mlp_neurons import mlp_count_roles, mlp_hidden_weights, mlp_hooks, mlp_magnitude, prune_mlps, slice_mlp_hidden
from .routed_experts import check_moe_target
from .search_axis import SearchAxis
from .slicing import slice_linear
from .statistics import PER_SAMPLE, reduce_per_sample, static_scores


KEY = "shared_neurons"
SCORE_KEYS = (KEY,)
CONFIG_FIELDS = (
    ConfigField(
        "shared_expert_intermediate_size",
        doc="MoE: target width of the shared expert (Qwen2-MoE; DeepSeek-V3 and GLM-4.5: a multiple of the expert "
        "width, which sets n_shared_experts).",
        help="MoE: target width of the shared expert.",
    ),
)
FIELDS = target_names(CONFIG_FIELDS)
BLOCK = "moe"
AXES = (SearchAxis("shared_expert_intermediate_size", "sharedmlp", "shared MLP", multiple_default=64),)
CARD_ROWS = {"shared_expert_intermediate_size": "Shared-expert width"}
SUMMARY = FIELDS
RECORD = ("shared_neurons",)
_FIELD = FIELDS[0]


def present(spec) -> bool:
    return spec.moe is not None and spec.shared_expert is not None


def width(model_config, spec) -> int:
    """The shared expert's width in `model_config`: its own field, or the expert width times the shared count."""
    if spec.shared_expert_count_field is not None:
        return getattr(model_config, spec.shared_expert_count_field) * getattr(model_config, spec.expert_width_field)
    return getattr(model_config, spec.shared_expert_width_field)


def shape(model_config, spec) -> dict:
    if spec is None or spec.moe is None or spec.shared_expert is None:
        return {}
    return {"shared_expert_intermediate_size": width(model_config, spec)}


def check_applies(config, model_config, shape: dict, spec) -> None:
    """Refuses a shared expert on a model without one, a shared width other than the experts' where one config field
    sizes both (Llama 4), and a shared width that is no multiple of the expert width where the config ties them
    (`shared_expert_count_field`, DeepSeek-V3)."""
    check_moe_target(config, _FIELD, "a shared expert", model_config, shape, spec)
    if spec is not None and spec.shared_expert_width_field == spec.expert_width_field and _FIELD in shape:
        # One config field sizes both (Llama 4's intermediate_size): the reload builds them alike.
        shared, routed = getattr(config, _FIELD), config.moe_intermediate_size
        shared_width = shared if shared is not None else shape[_FIELD]
        routed_width = routed if routed is not None else shape["moe_intermediate_size"]
        if shared_width != routed_width:
            set_field, other = (
                ("moe_intermediate_size", _FIELD) if routed is not None else (_FIELD, "moe_intermediate_size")
            )
            value = routed_width if routed is not None else shared_width
            raise ValueError(
                f"PrunedConfig.{set_field}={value} without {other}={value}: model_type={model_config.model_type!r} "
                f"sizes its shared expert and its routed experts with one config field ({spec.expert_width_field}), so "
                f"both are pruned to one width. Set {other}={value} too (or leave both None)."
            )
    if spec is None or spec.shared_expert_count_field is None or _FIELD not in shape:
        return
    shared = getattr(config, _FIELD) or shape[_FIELD]
    expert = config.moe_intermediate_size or shape["moe_intermediate_size"]
    if shared % expert:
        count = getattr(model_config, spec.shared_expert_count_field)
        valid = [expert * k for k in range(1, shape[_FIELD] // expert + 1)]
        raise ValueError(
            f"PrunedConfig.{_FIELD}={shared} is not a multiple of the expert width moe_intermediate_size={expert}: "
            f"model_type={model_config.model_type!r} builds its shared expert {spec.shared_expert_count_field} x "
            f"moe_intermediate_size wide. Set {_FIELD} to one of {valid} (e.g. {expert * count}, keeping "
            f"{spec.shared_expert_count_field}={count})."
        )


def check_target(config, model_config=None, shape: dict | None = None) -> None:
    """Any width up to the source's (checked by `PrunedConfig.validate_for` for every target)."""


def _path(spec) -> str:
    return spec.shared_expert if spec.shared_expert_in_layer else f"{spec.moe}.{spec.shared_expert}"


def hooks(collector, index: int, layer) -> list:
    spec = collector.spec
    return mlp_hooks(collector, index, layer.get_submodule(_path(spec)), spec, KEY)


def sites(spec) -> list[tuple[int, str, int, str]]:
    return [(3, KEY, 0, f"input of {_path(spec)}.{spec.down_proj}")]


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
    """`[num_layers, shared_expert_intermediate_size]` shared-expert neuron importance."""
    return reduce_per_sample(importance.shared_neurons, batch_aggregation, importance.num_samples)


def magnitude(layer, spec, shape) -> torch.Tensor:
    if not spec.has(layer, BLOCK):  # a hybrid's layer without an MoE block: a zero row, never used
        return torch.zeros(shape[_FIELD])
    return mlp_magnitude(layer.get_submodule(_path(spec)), spec, shape[_FIELD])


def hidden_weights(layer, spec) -> tuple[list, list]:
    reads, writes = mlp_hidden_weights(layer.get_submodule(_path(spec)), spec)
    if spec.shared_expert_gate is not None:
        reads.append(layer.get_submodule(f"{spec.moe}.{spec.shared_expert_gate}").weight)
    return reads, writes


def slice_hidden(layer, spec, kept: torch.Tensor) -> None:
    slice_mlp_hidden(layer.get_submodule(_path(spec)), spec, kept)
    if spec.shared_expert_gate is not None:
        slice_linear(layer.get_submodule(f"{spec.moe}.{spec.shared_expert_gate}"), in_index=kept)


def prune(model, layers, spec, importance, source: dict, target: dict, kept_layers, record, config) -> None:
    if target[_FIELD] < source[_FIELD]:
        neuron_scores = scores(importance, config.batch_aggregation)
        record.shared_neurons.update(
            prune_mlps(layers, _path(spec), spec, neuron_scores, source[_FIELD], target[_FIELD], kept_layers, BLOCK)
        )


def update_config(model_config, spec, source: dict, target: dict) -> None:
    if spec.shared_expert_count_field is not None:
        # `check_applies` keeps the shared width a multiple of the expert width.
        setattr(model_config, spec.shared_expert_count_field, target[_FIELD] // target["moe_intermediate_size"])
    else:
        setattr(model_config, spec.shared_expert_width_field, target[_FIELD])


def sync_modules(model, model_config, spec) -> None:
    from ...architectures import get_decoder_layers

    shared = width(model_config, spec)
    for layer in get_decoder_layers(model):
        if spec.has(layer, BLOCK):
            layer.get_submodule(_path(spec)).intermediate_size = shared


def count_roles(spec, layer) -> dict[str, tuple]:
    roles = mlp_count_roles(_path(spec), spec, "fs")
    if spec.shared_expert_gate is not None:
        roles[f"{spec.moe}.{spec.shared_expert_gate}"] = (1, "h")
    return roles


def count_sizes(shape: dict) -> dict[str, int]:
    return {"fs": shape[_FIELD], "2fs": 2 * shape[_FIELD]}
