"""Neurons of a shared expert (the always-active MLP inside the MoE block of Qwen2-MoE and Nemotron-H): the
MLP-neuron structure of `mlp_neurons.py` at another path, with its own config field
(`shared_expert_intermediate_size`; Nemotron-H's `moe_shared_expert_intermediate_size`).

Qwen2-MoE's shared expert has a gate (`shared_expert_gate`, `Linear(hidden, 1)`), which reads the hidden size only:
hidden pruning slices its columns. Nemotron-H's has none (`shared_expert_gate=None`).
"""

import torch

from .mlp_neurons import mlp_count_roles, mlp_hidden_weights, mlp_hooks, mlp_magnitude, prune_mlps, slice_mlp_hidden
from .slicing import slice_linear
from .statistics import reduce_per_sample


KEY = "shared_neurons"
FIELD = "shared_expert_intermediate_size"
BLOCK = "moe"


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
    if not spec.has(layer, BLOCK):  # a hybrid's layer without an MoE block: a zero row, never used
        return torch.zeros(shape[FIELD])
    return mlp_magnitude(layer.get_submodule(_path(spec)), spec, shape[FIELD])


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
    if target[FIELD] < source[FIELD]:
        neuron_scores = scores(importance, config.batch_aggregation)
        record.shared_neurons.update(
            prune_mlps(layers, _path(spec), spec, neuron_scores, source[FIELD], target[FIELD], kept_layers, BLOCK)
        )


def update_config(model_config, spec, source: dict, target: dict) -> None:
    setattr(model_config, spec.shared_expert_width_field, target[FIELD])


def sync_modules(model, model_config, spec) -> None:
    from ...architectures import get_decoder_layers

    width = getattr(model_config, spec.shared_expert_width_field)
    for layer in get_decoder_layers(model):
        if spec.has(layer, BLOCK):
            layer.get_submodule(_path(spec)).intermediate_size = width


def count_roles(spec, layer) -> dict[str, tuple]:
    roles = mlp_count_roles(_path(spec), spec, "fs")
    if spec.shared_expert_gate is not None:
        roles[f"{spec.moe}.{spec.shared_expert_gate}"] = (1, "h")
    return roles


def count_sizes(shape: dict) -> dict[str, int]:
    return {"fs": shape[FIELD], "2fs": 2 * shape[FIELD]}
