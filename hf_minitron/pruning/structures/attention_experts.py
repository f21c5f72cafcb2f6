"""A mixture of attention experts (JetMoE's MoA): routed attention experts and their KV heads.

JetMoE's attention routes each token to `num_experts_per_tok` of `num_local_experts` attention experts. Expert `e` is
a query projection `first[e]` `[kv_heads x head_dim, hidden]` and an output projection `second[e]` `[hidden, kv_heads
x head_dim]` (the ScatterMoE layout of `routed_experts.py`); one `kv_proj` `[k; v]` is shared by all experts. A
token's query heads are those of its k-th expert for k = 0..top_k-1 (`num_attention_heads = num_key_value_heads x
num_experts_per_tok`), and its query head `k x kv_heads + j` attends with KV head `j` (JetMoE repeats the KV heads
rather than interleaving them).

* Experts: scored like the MoE block's (`routed_experts.py`: output norm, REAP, frequency, magnitude, random) from
  the output projection of each attention expert over the tokens routed to it; the same number is kept as in the MoE
  block (one config field for both), each block its own.
* KV heads: the query heads are scored as in `attention_heads.py`, from the output projection's input (the attention
  output of each selected expert) viewed as `[top_k x kv_heads, head_dim]`; a KV head scores the L2 norm of the query
  heads reading it. A kept KV head keeps its `kv_proj` key and value rows and, in every attention expert, its query
  rows and output columns, so `num_attention_heads` follows as `num_key_value_heads x num_experts_per_tok` (a
  `PrunedConfig` asking for other head counts is refused before any work, in `update_config`). There is no query
  head inside a kept KV head to prune, so the residual head merge (`head_merge`) has nothing to merge.
* Hidden channels: `kv_proj` columns, both projections of every expert, the router's columns, the output bias.
"""

import torch

from . import attention_heads, routed_experts
from .slicing import head_rows, slice_linear, slice_parameter, topk_sorted
from .statistics import add_per_sample, static_scores


KEY = "attention_experts"
SCORE_KEYS = (attention_heads.KEY, KEY)  # its query heads are scored as attention heads
# The head counts, and the expert count it shares with the MoE block (`routed_experts`).
CONFIG_FIELDS = ()  # its targets are declared by attention_heads and routed_experts
FIELDS = (*attention_heads.FIELDS, *routed_experts.FIELDS)
BLOCK = "attention"
AXES = attention_heads.AXES  # the expert count is searched with the MoE block's (`routed_experts.AXES`)
CARD_ROWS = attention_heads.CARD_ROWS
SUMMARY = attention_heads.SUMMARY
RECORD = (*attention_heads.RECORD, "attention_experts")
_EXPERTS = routed_experts.FIELDS[0]


def present(spec) -> bool:
    return spec.attention_experts is not None


# ---------------------------------------------------------------------------------------------- targets
def shape(model_config, spec) -> dict:
    return {}  # its sizes are attention_heads' and routed_experts'


def check_applies(config, model_config, shape: dict, spec) -> None:
    """Its targets are attention's and the MoE block's: `attention_heads` and `routed_experts` check them."""


def check_target(config, model_config=None, shape: dict | None = None) -> None:
    """The head counts' grouped-query structure is checked by `attention_heads` for every model, and their relation to
    the experts per token by `update_config`, which `check_target_loads` calls before any work."""


def expert_tensors(spec) -> routed_experts.ExpertTensors:
    return routed_experts.parallel_tensors(f"{spec.attention}.{spec.attention_experts}", spec.attention_expert_layout)


def _second(spec) -> str:
    return f"{spec.attention}.{spec.attention_experts}.{spec.attention_expert_layout.second}"


# ---------------------------------------------------------------------------------------------- scores
def hooks(collector, index: int, layer) -> list:
    spec, shape = collector.spec, collector.shape
    t = expert_tensors(spec)
    num_experts, head_dim = routed_experts.get_tensor(layer, t.first).shape[0], shape["head_dim"]
    store = collector.store(attention_heads.KEY, index)
    routing = {}

    def routing_hook(module, args, output):
        routing["slots"] = output[0]  # row r of the experts' inputs is query slot `slots[r]` = token x top_k + k

    def heads_hook(module, args):
        x, slots = args[0], routing.pop("slots")
        per_slot = x.new_zeros(slots.numel(), x.shape[-1]).index_copy_(0, slots, x)
        heads = per_slot.view(*collector.mask.shape, -1, head_dim).float().norm(dim=-1)  # [B, S, top_k x kv heads]
        add_per_sample(store, heads, collector.sample_mask, collector.how)

    handles = [
        layer.get_submodule(t.gating).register_forward_hook(routing_hook),
        layer.get_submodule(_second(spec)).register_forward_pre_hook(heads_hook),
    ]
    observer = routed_experts.expert_observer(collector, collector.store(KEY, index), num_experts)
    handle = routed_experts.instrument(layer, t, observer)
    return handles + ([handle] if handle is not None else [])


def sites(spec) -> list[tuple[int, str, int, str]]:
    second = _second(spec)
    return [(1, attention_heads.KEY, 0, f"input of {second}"), (1, KEY, 0, f"output of {second}")]


def score_shapes(shape: dict) -> dict[str, tuple]:
    """`{score key: per-layer dims}` that every statistic of the key starts with."""
    return attention_heads.score_shapes(shape) | {KEY: (shape[_EXPERTS],)}


def collect(collector, shape: dict, device) -> dict[str, dict]:
    """`{score key: statistics}` of the importance pass, summed over processes."""
    stats = routed_experts.STATISTICS
    return attention_heads.collect(collector, shape, device) | {
        KEY: collector.stacked(KEY, shape[_EXPERTS], 1, stats, device)
    }


def random_scores(key: str, shape: dict, draw) -> dict:
    """The random baseline's scores of `key` (`draw(*dims)` draws `[num_layers, *dims]`)."""
    if key == attention_heads.KEY:
        return attention_heads.random_scores(key, shape, draw)
    return {"score": draw(shape[_EXPERTS])}


def magnitude_scores(model, layers, spec, shape: dict) -> dict[str, dict]:
    """`{score key: {"score": ...}}` of the weight-magnitude baseline."""
    return {
        attention_heads.KEY: static_scores([head_magnitude(layer, spec, shape) for layer in layers]),
        KEY: static_scores([magnitude(layer, spec, shape) for layer in layers]),
    }


def expert_scores(importance, expert_importance: str = "reap") -> torch.Tensor:
    """`[num_layers, num_experts]` attention-expert importance by `expert_importance`."""
    return routed_experts.reduce_stats(importance.attention_experts, expert_importance)


def magnitude(layer, spec, shape) -> torch.Tensor:
    """`[num_experts]`: L2 norm of each attention expert's weights."""
    return routed_experts.weights_magnitude(layer, expert_tensors(spec))


def head_magnitude(layer, spec, shape) -> torch.Tensor:
    """`[num_attention_heads]` (JetMoE's order, `[top_k, kv_heads]`): for KV head j, the L2 norm of its key and value
    rows and of its query rows and output columns in every expert, shared evenly by the top_k query heads reading it
    (so that the KV head's score, the L2 norm over them, is that norm)."""
    t, head_dim = expert_tensors(spec), shape["head_dim"]
    kv, top_k = shape["num_key_value_heads"], shape["num_attention_heads"] // shape["num_key_value_heads"]
    q = routed_experts.get_tensor(layer, t.first).float().pow(2).view(-1, kv, head_dim, shape["hidden_size"])
    o = routed_experts.get_tensor(layer, t.second).float().pow(2).view(-1, shape["hidden_size"], kv, head_dim)
    k, v = _kv_proj(layer, spec).weight.float().pow(2).view(2, kv, head_dim, -1)
    per_kv = q.sum(dim=(0, 2, 3)) + o.sum(dim=(0, 1, 3)) + k.sum(dim=(1, 2)) + v.sum(dim=(1, 2))
    return (per_kv / top_k).sqrt().repeat(top_k)


def _kv_proj(layer, spec):
    return layer.get_submodule(f"{spec.attention}.{spec.kv_proj}")


def hidden_weights(layer, spec) -> tuple[list, list]:
    reads, writes = routed_experts.tensors_hidden_weights(layer, expert_tensors(spec))
    return [_kv_proj(layer, spec).weight] + reads, writes


def slice_hidden(layer, spec, kept: torch.Tensor) -> None:
    slice_linear(_kv_proj(layer, spec), in_index=kept)
    routed_experts.slice_tensors_hidden(layer, expert_tensors(spec), kept)


# ---------------------------------------------------------------------------------------------- slicing
def slice_kv_heads(layer, spec, kept: torch.Tensor, num_kv: int, head_dim: int) -> None:
    """Keeps KV heads `kept`: their `kv_proj` key and value rows, and in every expert their query rows and output
    columns."""
    rows = head_rows(kept, head_dim)
    slice_linear(_kv_proj(layer, spec), out_index=torch.cat([rows, rows + num_kv * head_dim]))
    t = expert_tensors(spec)
    slice_parameter(*routed_experts.tensor_owner(layer, t.first), rows, dim=1)
    slice_parameter(*routed_experts.tensor_owner(layer, t.second), rows, dim=2)


def prune(model, layers, spec, importance, source: dict, target: dict, kept_layers, record, config) -> None:
    if target[_EXPERTS] < source[_EXPERTS]:
        scores = expert_scores(importance, config.expert_importance)
        for new_idx, src_idx in enumerate(kept_layers):
            kept = topk_sorted(scores[src_idx], target[_EXPERTS])
            routed_experts.slice_experts(layers[new_idx], expert_tensors(spec), kept)
            record.attention_experts[new_idx] = kept.tolist()
    num_kv, target_kv = source["num_key_value_heads"], target["num_key_value_heads"]
    if target_kv < num_kv:
        kv_scores = attention_heads.group_scores(importance, config.batch_aggregation)
        top_k = source["num_attention_heads"] // num_kv
        for new_idx, src_idx in enumerate(kept_layers):
            kept = topk_sorted(kv_scores[src_idx], target_kv)
            slice_kv_heads(layers[new_idx], spec, kept, num_kv, source["head_dim"])
            record.kv_heads[new_idx] = kept.tolist()
            record.heads[new_idx] = [k * num_kv + j for k in range(top_k) for j in kept.tolist()]


def update_config(model_config, spec, source: dict, target: dict) -> None:
    """Sets the head counts; refuses (`ValueError`, before any work: `check_target_loads` calls this first) a target
    whose query heads are not `num_key_value_heads x num_experts_per_tok`."""
    top_k = model_config.num_experts_per_tok
    heads, kv = target["num_attention_heads"], target["num_key_value_heads"]
    if heads != kv * top_k:
        raise ValueError(
            f"PrunedConfig.num_attention_heads={heads} does not fit model_type={model_config.model_type!r}: its query "
            f"heads are num_key_value_heads x num_experts_per_tok (each token reads every KV head once per selected "
            f"attention expert), so num_key_value_heads={kv} means num_attention_heads={kv * top_k}. Prune KV heads "
            f"and set both: e.g. num_key_value_heads={kv}, num_attention_heads={kv * top_k}."
        )
    model_config.num_key_value_heads = kv
    model_config.num_attention_heads = heads


def sync_modules(model, model_config, spec) -> None:
    """The head counts the attention modules cache, and the sizes of the mixture of attention experts."""
    from ...architectures import get_decoder_layers

    kv, head_dim = model_config.num_key_value_heads, model_config.head_dim
    num_experts = getattr(model_config, spec.num_experts_field)
    for layer in get_decoder_layers(model):
        attn = layer.get_submodule(spec.attention)
        attn.num_heads, attn.num_key_value_heads = model_config.num_attention_heads, kv
        attn.kv_projection_size = kv * head_dim
        block = layer.get_submodule(f"{spec.attention}.{spec.attention_experts}")
        layout = spec.attention_expert_layout
        routed_experts.sync_parallel_block(block, layout, num_experts, model_config.hidden_size, kv * head_dim)


# ---------------------------------------------------------------------------------------------- counting
def count_roles(spec, layer) -> dict[str, tuple]:
    """`kv` key (or value) rows, `2kv` the `[k; v]` rows of `kv_proj`, and the experts' tensors as in
    `routed_experts` with the query rows `kv` as their width."""
    roles = {f"{spec.attention}.{spec.kv_proj}": ("2kv", "h")}
    roles.update(routed_experts.tensors_count_roles(expert_tensors(spec), "kv"))
    return roles


def count_sizes(shape: dict) -> dict[str, int]:
    kv = shape["num_key_value_heads"] * shape["head_dim"]
    return {"kv": kv, "2kv": 2 * kv} | routed_experts.count_sizes(shape)
