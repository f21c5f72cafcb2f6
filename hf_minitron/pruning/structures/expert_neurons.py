"""Expert FFN neurons (expert width) of a Mixture-of-Experts block: scores, selection, slicing, counting.

* Score: each expert's down-projection input (its neuron activations), mean |activation| over the tokens routed to
  that expert (an expert sees a varying handful of each sample's tokens, so the per-sample statistics of dense
  neurons do not apply). Recorded by the experts' instrumented forward (`routed_experts.instrument`).
* Selection: every expert keeps the same number of neurons (the config has one expert width) but its own indices.
* Slicing: per expert, the gate and up rows of the fused first projection (concatenated `[gate; up]`, or
  interleaved gate/up columns for GPT-OSS) and the matching `down_proj` inputs, gathered into smaller fused tensors.

Both expert layouts (transformers' experts module, JetMoE's ScatterMoE weights) are read through
`routed_experts.expert_tensors`.
"""

import torch

from .fields import ConfigField, target_names
from .routed_experts import (
    check_moe_target,
    expert_tensors,
    first_width_dim,
    gather_per_expert,
    get_tensor,
    instrument,
    second_width_dim,
    tensor_owner,
)
from .search_axis import SearchAxis
from .slicing import topk_sorted
from .statistics import per_token_mean, static_scores, zeros_like


KEY = "expert_neurons"
SCORE_KEYS = (KEY,)
CONFIG_FIELDS = (
    ConfigField(
        "moe_intermediate_size",
        doc="MoE: target FFN width of each routed expert (Mixtral and GPT-OSS call it `intermediate_size`). Every\n"
        "expert keeps the same number of neurons, its own indices.",
        help="MoE: target width of each expert.",
    ),
)
FIELDS = target_names(CONFIG_FIELDS)
BLOCK = "moe"
AXES = (SearchAxis("moe_intermediate_size", "expertmlp", "expert MLP", multiple_default=64, cap=True),)
CARD_ROWS = {"moe_intermediate_size": "Expert FFN width"}
SUMMARY = FIELDS
RECORD = ("expert_neurons",)
_FIELD = FIELDS[0]


def present(spec) -> bool:
    return spec.moe is not None


def shape(model_config, spec) -> dict:
    if spec is None or spec.moe is None:
        return {}
    return {"moe_intermediate_size": getattr(model_config, spec.expert_width_field)}


def check_applies(config, model_config, shape: dict, spec) -> None:
    check_moe_target(config, _FIELD, "routed experts", model_config, shape, spec)


# transformers runs the experts of most MoE families with grouped matrix products (`_experts_implementation:
# grouped_mm`), whose operands need 16-byte aligned rows: 8 values in (b)float16, which covers float32 too.
GROUPED_MM_MULTIPLE = 8


def check_target(config, model_config=None, shape: dict | None = None) -> None:
    """Any width up to the source's (checked by `PrunedConfig.validate_for` for every target)."""


def check_runs(model_config, source: dict, target: dict) -> None:
    """With grouped expert kernels, refuses expert rows (the expert width and the hidden size) that lose alignment
    (`check_target_loads` asks it before any work)."""
    if getattr(model_config, "_experts_implementation", None) != "grouped_mm":
        return
    for name in (_FIELD, "hidden_size"):
        value = target.get(name)
        if value is not None and value != source.get(name) and value % GROUPED_MM_MULTIPLE:
            lower = value - value % GROUPED_MM_MULTIPLE
            raise ValueError(
                f"PrunedConfig.{name}={value} would give a model that cannot run: transformers' grouped expert kernels "
                f"need rows of a multiple of {GROUPED_MM_MULTIPLE} values. Use {lower or GROUPED_MM_MULTIPLE} or "
                f"{lower + GROUPED_MM_MULTIPLE}."
            )


def hooks(collector, index: int, layer) -> list:
    t = expert_tensors(layer, collector.spec)
    store = collector.store(KEY, index)
    num_experts = get_tensor(layer, t.first).shape[0]

    def observe(e, token_idx, weights, act, out):
        mask = collector.token_mask[token_idx]
        if not store:
            zeros_like(store, act.device, sum=(num_experts, act.shape[-1]), count=(num_experts,))
        store["sum"][e] += (act.float().abs() * mask[:, None]).sum(0).double()
        store["count"][e] += mask.sum().double()

    handle = instrument(layer, t, observe)
    return [handle] if handle is not None else []


def sites(spec) -> list[tuple[int, str, int, str]]:
    if spec.expert_layout is not None:
        return [(3, KEY, 0, f"input of {spec.moe}.{spec.expert_layout.second}")]
    return [(3, KEY, 0, f"input of {spec.moe}.{spec.experts}.down_proj")]


def score_shapes(shape: dict) -> dict[str, tuple]:
    """`{score key: per-layer dims}` that every statistic of the key starts with (`count` is per expert)."""
    return {KEY: (shape["num_experts"],)}


def collect(collector, shape: dict, device) -> dict[str, dict]:
    """`{score key: statistics}` of the importance pass, summed over processes: per-expert neuron sums and the
    per-expert token counts."""
    num_experts = shape["num_experts"]
    sums = collector.stacked(KEY, (num_experts, shape[_FIELD]), 1, ("sum",), device)
    return {KEY: sums | collector.stacked(KEY, num_experts, 1, ("count",), device)}


def random_scores(key: str, shape: dict, draw) -> dict:
    """The random baseline's scores (`draw(*dims)` draws `[num_layers, *dims]`)."""
    return {"score": draw(shape["num_experts"], shape[_FIELD])}


def magnitude_scores(model, layers, spec, shape: dict) -> dict[str, dict]:
    """`{score key: {"score": ...}}` of the weight-magnitude baseline."""
    return {KEY: static_scores([magnitude(layer, spec, shape) for layer in layers])}


def scores(importance) -> torch.Tensor:
    """`[num_layers, num_experts, moe_intermediate_size]` expert-neuron importance."""
    return per_token_mean(importance.expert_neurons, "sum")


def magnitude(layer, spec, shape) -> torch.Tensor:
    """`[num_experts, width]`: L2 norm of each neuron's gate/up rows and down column, per expert."""
    if not spec.has(layer, BLOCK):  # a hybrid's layer without an MoE block: a zero row, never used
        return torch.zeros(shape["num_experts"], shape[_FIELD])
    t = expert_tensors(layer, spec)
    first = get_tensor(layer, t.first).float().pow(2)
    first = first.sum(dim=1) if t.transposed else first.sum(dim=2)  # [E, 2I] or [E, I]
    first = _split_gate_up(t, first).sum(dim=1) if t.gated else first
    down = get_tensor(layer, t.second).float().pow(2)
    down = down.sum(dim=2) if t.transposed else down.sum(dim=1)  # [E, I]
    return (first + down).sqrt()


def _split_gate_up(t, values: torch.Tensor) -> torch.Tensor:
    """`[E, 2I]` over the fused gate/up axis -> `[E, 2, I]` (gate, up), concatenated or interleaved."""
    if t.concatenated:
        return values.view(values.shape[0], 2, -1)
    return values.view(values.shape[0], -1, 2).transpose(1, 2)


def _fused_index(t, kept: torch.Tensor, width: int) -> torch.Tensor:
    """`[E, K]` kept neurons -> `[E, 2K]` positions in the fused gate/up axis."""
    if not t.gated:
        return kept
    if t.concatenated:
        return torch.cat([kept, kept + width], dim=1)
    return torch.stack([2 * kept, 2 * kept + 1], dim=2).flatten(1)


def slice_expert_neurons(layer, spec, kept: torch.Tensor, width: int) -> None:
    t = expert_tensors(layer, spec)
    fused = _fused_index(t, kept, width)
    gather_per_expert(*tensor_owner(layer, t.first), fused, first_width_dim(t))
    if t.first_bias is not None:
        gather_per_expert(*tensor_owner(layer, t.first_bias), fused, 1)
    gather_per_expert(*tensor_owner(layer, t.second), kept, second_width_dim(t))


def prune(model, layers, spec, importance, source: dict, target: dict, kept_layers, record, config) -> None:
    if target[_FIELD] >= source[_FIELD]:
        return
    neuron_scores = scores(importance)
    for new_idx, src_idx in enumerate(kept_layers):
        if not spec.has(layers[new_idx], BLOCK):
            continue
        per_expert = neuron_scores[src_idx]
        kept_experts = record.experts.get(new_idx)
        if kept_experts is not None:  # experts were pruned first: their rows only
            per_expert = per_expert[kept_experts]
        kept = torch.stack([topk_sorted(row, target[_FIELD]) for row in per_expert])
        slice_expert_neurons(layers[new_idx], spec, kept, source[_FIELD])
        record.expert_neurons[new_idx] = kept.tolist()


def update_config(model_config, spec, source: dict, target: dict) -> None:
    setattr(model_config, spec.expert_width_field, target[_FIELD])


def sync_modules(model, model_config, spec) -> None:
    from ...architectures import get_decoder_layers

    if spec.expert_layout is not None:
        return  # ScatterMoE-layout blocks: routed_experts.sync_modules sets every size they cache
    width = getattr(model_config, spec.expert_width_field)
    for layer in get_decoder_layers(model):
        if not spec.has(layer, BLOCK):
            continue
        experts = layer.get_submodule(f"{spec.moe}.{spec.experts}")
        for name in ("intermediate_dim", "intermediate_size", "expert_dim"):
            if isinstance(getattr(experts, name, None), int):
                setattr(experts, name, width)


def count_roles(spec, layer) -> dict[str, tuple]:
    return {}  # the expert tensors are described by routed_experts.count_roles (`fe` / `2fe`)


def count_sizes(shape: dict) -> dict[str, int]:
    return {"fe": shape[_FIELD], "2fe": 2 * shape[_FIELD]}
