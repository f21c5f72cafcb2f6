"""Neurons of a shared expert (Qwen2-MoE's always-active MLP inside the MoE block): the MLP-neuron structure of
`mlp_neurons.py` at another path, with its own config field (`shared_expert_intermediate_size`).

Its gate (`shared_expert_gate`, `Linear(hidden, 1)`) reads the hidden size only: hidden pruning slices its columns.
"""

import torch

from .mlp_neurons import (
    mlp_count_roles,
    mlp_hidden_weights,
    mlp_hooks,
    mlp_magnitude,
    prune_mlps,
    slice_mlp_hidden,
)
from .slicing import slice_linear
from .statistics import reduce_per_sample


KEY = "shared_neurons"
FIELD = "shared_expert_intermediate_size"


def present(spec) -> bool:
    return spec.moe is not None and spec.shared_expert is not None


def _path(spec) -> str:
    return f"{spec.moe}.{spec.shared_expert}"


def hooks(collector, index: int, layer) -> list:
    spec = collector.spec
    return mlp_hooks(collector, index, layer.get_submodule(_path(spec)), spec, KEY)


def sites(spec) -> list[tuple[int, str, int, str]]:
    return [(3, KEY, 0, f"input of {_path(spec)}.{spec.down_proj}")]


def scores(importance, batch_aggregation: str) -> torch.Tensor:
    """`[num_layers, shared_expert_intermediate_size]` shared-expert neuron importance."""
    return reduce_per_sample(importance.shared_neurons, batch_aggregation, importance.num_samples)


def magnitude(layer, spec, shape) -> torch.Tensor:
    return mlp_magnitude(layer.get_submodule(_path(spec)), spec, shape[FIELD])


def hidden_weights(layer, spec) -> tuple[list, list]:
    reads, writes = mlp_hidden_weights(layer.get_submodule(_path(spec)), spec)
    return reads + [layer.get_submodule(f"{spec.moe}.{spec.shared_expert_gate}").weight], writes


def slice_hidden(layer, spec, kept: torch.Tensor) -> None:
    slice_mlp_hidden(layer.get_submodule(_path(spec)), spec, kept)
    slice_linear(layer.get_submodule(f"{spec.moe}.{spec.shared_expert_gate}"), in_index=kept)


def prune(model, layers, spec, importance, source: dict, target: dict, kept_layers, record, config) -> None:
    if target[FIELD] < source[FIELD]:
        neuron_scores = scores(importance, config.batch_aggregation)
        record.shared_neurons.update(
            prune_mlps(layers, _path(spec), spec, neuron_scores, source[FIELD], target[FIELD], kept_layers)
        )


def update_config(model_config, spec, source: dict, target: dict) -> None:
    setattr(model_config, spec.shared_expert_width_field, target[FIELD])


def sync_modules(model, model_config) -> None:
    from ..architectures import get_architecture, get_decoder_layers

    spec = get_architecture(model_config)
    width = getattr(model_config, spec.shared_expert_width_field)
    for layer in get_decoder_layers(model):
        layer.get_submodule(_path(spec)).intermediate_size = width


def count_roles(spec, layer) -> dict[str, tuple]:
    roles = mlp_count_roles(_path(spec), spec, "fs")
    roles[f"{spec.moe}.{spec.shared_expert_gate}"] = (1, "h")
    return roles


def count_sizes(shape: dict) -> dict[str, int]:
    return {"fs": shape[FIELD], "2fs": 2 * shape[FIELD]}
