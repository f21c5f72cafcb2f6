"""Attention heads (and whole KV groups): scores, selection, the residual head merge, slicing, counting.

* Score (paper 1 §2.2): the input of `o_proj` viewed as `[heads, head_dim]`, L2 norm over `head_dim`, per token,
  then reduced over the tokens of each sample and over samples. A KV group scores the L2 norm of its query heads.
* Selection: whole KV groups first, then the same number of query heads inside every kept group, ranked within the
  group, so the grouped-query structure (query head j attends with KV head j // group_size) survives. Layers that share
  keys and values (Gemma 3n's last `num_kv_shared_layers`) keep the groups of the layer computing them, chosen by
  all of them.
* Slicing: the query rows (and the key/value rows of kept groups) of q/k/v or a fused qkv projection, the matching
  `o_proj` columns, and any per-head parameter (GPT-OSS attention sinks) or per-head norm (`qk_norm_over_heads`).
  With an output gate (`attention_output_gate`: Qwen3-Next, Qwen3.5), a head's query rows are followed by its gate
  rows, and both go with the head. The score is unchanged: `o_proj` reads the gated output.
"""

import math

import torch

from .depth import kv_sources
from .fields import ConfigField, target_names
from .search_axis import SearchAxis
from .slicing import head_rows, slice_linear, slice_norm, slice_parameter, topk_sorted
from .statistics import PER_SAMPLE, add_per_sample, reduce_per_sample, static_scores


KEY = "heads"
SCORE_KEYS = (KEY,)
# Residual head merge (paper 1 §2.3): off, on the query (MHA: query/key/value) rows, or on the `o_proj` columns.
HEAD_MERGES = ("none", "query", "o_proj")
CONFIG_FIELDS = (
    ConfigField(
        "num_attention_heads",
        doc="Target number of query heads per layer. `head_dim` never changes.",
        help="Target query heads per layer.",
    ),
    ConfigField(
        "num_key_value_heads",
        doc="Target number of KV heads (groups). Kept by default; pruning them removes whole groups.",
        help="Target KV heads per layer (kept unless set).",
    ),
    ConfigField(
        "head_merge",
        doc="""Residual head merge (paper 1, §2.3): before a pruned head is removed, the kept head paired with it becomes
`head_i + (head_i - head_{2K-i+1})`. `"query"` applies it to the heads' own projection weights, as the
paper describes: the query rows (and bias) of each kept/pruned pair within a KV group, and for MHA
models the key and value rows too; `"o_proj"` applies it to the heads' `o_proj` columns instead;
`"none"` turns it off. `true` / `false` (the boolean of earlier versions, in saved configs) read as
`"o_proj"` / `"none"`, what they did then.""",
        help="Residual head merge (paper 1 §2.3): 'query' (the heads' q rows; MHA: q/k/v), 'o_proj' (their "
        "o_proj columns) or 'none'.",
        type=str,
        default="none",
        choices=HEAD_MERGES,
        target=False,
    ),
)
FIELDS = target_names(CONFIG_FIELDS)
BLOCK = "attention"
CARD_ROWS = {"num_attention_heads": "Attention heads", "num_key_value_heads": "KV heads", "head_dim": "Head dimension"}
SUMMARY = (*FIELDS, "head_dim")
RECORD = ("heads", "kv_heads")


def present(spec) -> bool:
    # Else: `attention_experts.py` (JetMoE), `latent_attention_heads.py` (MLA).
    return spec.attention is not None and spec.attention_experts is None and spec.kv_b_proj is None


# ---------------------------------------------------------------------------------------------- targets
def prepare_config(config) -> None:
    """Saved configs of earlier versions hold a boolean `head_merge`, and `true` merged the o_proj columns."""
    if isinstance(config.head_merge, bool):
        config.head_merge = "o_proj" if config.head_merge else "none"


def shape(model_config, spec) -> dict:
    """Query and KV heads and the head dimension (kept: it sizes the rotary embedding); `{}` for multi-head latent
    attention, whose heads and sizes are `latent_attention_heads`'."""
    if spec is not None and spec.kv_b_proj is not None:
        return {}
    heads = model_config.num_attention_heads
    return {
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(model_config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(model_config, "head_dim", None) or model_config.hidden_size // heads,
    }


def check_applies(config, model_config, shape: dict, spec) -> None:
    """Every family has attention heads (JetMoE's are its attention experts')."""


def check_target(config, model_config=None, shape: dict | None = None) -> None:
    """Refuses head counts that break the grouped-query structure: query heads not a multiple of the KV heads, more
    KV heads than query heads, or (against the model's `shape`) more query heads per KV group than the source has."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if shape is None:  # the config alone, when it is built
        if heads is not None and kv is not None and heads % kv:
            raise ValueError(
                f"PrunedConfig.num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}: every KV "
                "group must keep the same number of query heads. Pick a multiple."
            )
        return
    if "num_key_value_heads" not in shape:  # no KV groups: a family without these heads (MLA's own check them)
        return
    heads = heads or shape["num_attention_heads"]
    kv = kv or shape["num_key_value_heads"]
    if heads % kv:
        raise ValueError(
            f"PrunedConfig.num_attention_heads={heads} is not a multiple of the number of KV heads ({kv}): every KV "
            f"group must keep the same number of query heads. Use a multiple of {kv}, e.g. "
            f"{max(kv, heads // kv * kv)}."
        )
    if kv > heads:
        raise ValueError(
            f"PrunedConfig.num_key_value_heads={kv} exceeds num_attention_heads={heads}: prune KV heads too."
        )
    source_per_group = shape["num_attention_heads"] // shape["num_key_value_heads"]
    if heads // kv > source_per_group:
        # Pruning removes whole KV groups and heads inside groups; it never moves heads between groups.
        raise ValueError(
            f"PrunedConfig keeps {heads // kv} query heads per KV group (num_attention_heads={heads}, "
            f"num_key_value_heads={kv}), but the source model's groups hold {source_per_group}: use "
            f"num_attention_heads <= {kv * source_per_group}, or keep more KV heads."
        )


def keeps_groups(target: dict, source: dict) -> bool:
    """Whether a candidate shape keeps the grouped-query structure: whole groups are removed, and a group keeps the
    same number of heads, no more than it had."""
    heads, kv = target["num_attention_heads"], target["num_key_value_heads"]
    return not (heads % kv or heads // kv > source["num_attention_heads"] // source["num_key_value_heads"])


def kv_head_values(config, source: int) -> list[int]:
    """The searched KV head counts: the teacher's only, unless `search_kv_heads` (then the divisors of its count within
    `max_width_pruning`, so that the groups stay equal)."""
    if not config.search_kv_heads:
        return [source]
    low = math.ceil(source * (1 - config.max_width_pruning))
    return [v for v in range(1, source + 1) if source % v == 0 and v >= low]


AXES = (
    SearchAxis("num_attention_heads", "heads", "heads", cap=True),
    SearchAxis(
        "num_key_value_heads",
        "kv",
        "KV",
        multiple=False,
        values=kv_head_values,
        fits=keeps_groups,
        switch=("search_kv_heads", "Also try removing whole KV groups."),
    ),
)


# ---------------------------------------------------------------------------------------------- scores
def hooks(collector, index: int, layer) -> list:
    spec, head_dim = collector.spec, collector.shape["head_dim"]
    store = collector.store(KEY, index)

    def heads_hook(module, args):
        x = args[0]
        x = x.view(*x.shape[:-1], -1, head_dim).float().norm(dim=-1)  # [B, S, heads]
        add_per_sample(store, x, collector.sample_mask, collector.how)

    return [layer.get_submodule(f"{spec.attention}.{spec.o_proj}").register_forward_pre_hook(heads_hook)]


def sites(spec) -> list[tuple[int, str, int, str]]:
    """`(forward position, key, slot, description)` of the statistics, for error messages in forward order."""
    return [(1, KEY, 0, f"input of {spec.attention}.{spec.o_proj}")]


def score_shapes(shape: dict) -> dict[str, tuple]:
    """`{score key: per-layer dims}` that every statistic of the key starts with."""
    return {KEY: (shape["num_attention_heads"],)}


def collect(collector, shape: dict, device) -> dict[str, dict]:
    """`{score key: statistics}` of the importance pass, summed over processes."""
    return {KEY: collector.stacked(KEY, shape["num_attention_heads"], 1, PER_SAMPLE, device)}


def random_scores(key: str, shape: dict, draw) -> dict:
    """The random baseline's scores (`draw(*dims)` draws `[num_layers, *dims]`)."""
    return {"score": draw(shape["num_attention_heads"])}


def magnitude_scores(model, layers, spec, shape: dict) -> dict[str, dict]:
    """`{score key: {"score": ...}}` of the weight-magnitude baseline."""
    return {KEY: static_scores([magnitude(layer, spec, shape) for layer in layers])}


def scores(importance, batch_aggregation: str) -> torch.Tensor:
    """`[num_layers, num_attention_heads]` query-head importance."""
    return reduce_per_sample(importance.heads, batch_aggregation, importance.num_samples)


def group_scores(importance, batch_aggregation: str) -> torch.Tensor:
    """`[num_layers, num_key_value_heads]`: L2 over the query heads of each KV group."""
    heads = scores(importance, batch_aggregation)
    groups = importance.model_shape["num_key_value_heads"]
    if importance.attention_experts:  # scores of a family with attention experts (JetMoE) hold theirs
        # A mixture of attention experts repeats the KV heads: query head k x kv_heads + j reads KV head j.
        return heads.view(heads.shape[0], -1, groups).norm(dim=1)
    return heads.view(heads.shape[0], groups, -1).norm(dim=-1)


def _q_rows_per_head(spec, head_dim: int) -> int:
    """Rows of the query projection per head: its query, and its output gate where the family has one."""
    return 2 * head_dim if spec.attention_output_gate else head_dim


def _q_weight(attn, spec, shape):
    if spec.qkv_proj:
        return getattr(attn, spec.qkv_proj).weight[: shape["num_attention_heads"] * shape["head_dim"]]
    return getattr(attn, spec.q_proj).weight


def magnitude(layer, spec, shape) -> torch.Tensor:
    """`[heads]`: L2 norm of each head's query rows and `o_proj` columns."""
    if not spec.has(layer, BLOCK):  # a hybrid's layer without attention: a zero row, never used
        return torch.zeros(shape["num_attention_heads"])
    attn = getattr(layer, spec.attention)
    head_dim, heads = shape["head_dim"], shape["num_attention_heads"]
    o = getattr(attn, spec.o_proj).weight.float()
    q = _q_weight(attn, spec, shape).float()
    q_rows = _q_rows_per_head(spec, head_dim)
    head_sq = q.pow(2).view(heads, q_rows, -1).sum(dim=(1, 2)) + o.pow(2).view(o.shape[0], heads, head_dim).sum(
        dim=(0, 2)
    )
    return head_sq.sqrt()


def hidden_weights(layer, spec) -> tuple[list, list]:
    """The weights that read the hidden size (columns) and write it (rows): for magnitude hidden-channel scores."""
    attn = getattr(layer, spec.attention)
    reads = [getattr(attn, n).weight for n in (spec.q_proj, spec.k_proj, spec.v_proj, spec.qkv_proj) if _has(attn, n)]
    return reads, [getattr(attn, spec.o_proj).weight]


def _has(attn, name: str | None) -> bool:
    """Whether `attn` holds projection `name`: the layers that read an earlier layer's keys and values (Gemma 3n's last
    `num_kv_shared_layers`) have no key/value projections."""
    return name is not None and getattr(attn, name, None) is not None


def slice_hidden(layer, spec, kept: torch.Tensor) -> None:
    """Keeps the hidden channels `kept`: input columns of q/k/v, output rows of `o_proj`."""
    attn = getattr(layer, spec.attention)
    for name in (spec.q_proj, spec.k_proj, spec.v_proj, spec.qkv_proj):
        if _has(attn, name):
            slice_linear(getattr(attn, name), in_index=kept)
    slice_linear(getattr(attn, spec.o_proj), out_index=kept)


# ---------------------------------------------------------------------------------------------- selection
def select(head_scores: torch.Tensor, num_kv: int, target_heads: int, target_kv: int, kv_scores=None):
    """Kept KV groups and kept query heads of one layer (see the module docstring)."""
    per_group = head_scores.numel() // num_kv
    if kv_scores is None:
        kv_scores = head_scores.view(num_kv, per_group).norm(dim=-1)
    kept_groups = topk_sorted(kv_scores, target_kv)
    keep_per_group = target_heads // target_kv
    kept = []
    for g in kept_groups.tolist():
        in_group = topk_sorted(head_scores[g * per_group : (g + 1) * per_group], keep_per_group)
        kept.append(in_group + g * per_group)
    return kept_groups, torch.cat(kept)


def merge_pairs(head_scores: torch.Tensor, kept_heads, num_kv: int) -> list[tuple[int, int]]:
    """`(kept head, pruned head)` pairs of the residual head merge (paper 1, §2.3) in one layer.

    Within a group of L heads ranked by importance (1 = most important), K of them kept, kept head i absorbs pruned
    head 2K - i + 1 for i = 2K - L + 1..K, mirroring around the cut as in the paper (pruned heads ranked below 2K
    absorb into none). A group is a KV group, so a query head is only merged into one that attends with the same
    keys and values; in an MHA model every KV group holds one head, kept or removed whole, so the group is the layer.
    """
    heads = head_scores.numel()
    per_group = heads // num_kv
    groups = [range(heads)] if per_group == 1 else [range(g * per_group, (g + 1) * per_group) for g in range(num_kv)]
    kept_set = set(kept_heads.tolist())
    pairs = []
    for group in groups:
        ranked = sorted(group, key=lambda h: -float(head_scores[h]))
        k = sum(h in kept_set for h in group)
        ranked_kept = [h for h in ranked if h in kept_set]
        ranked_pruned = [h for h in ranked if h not in kept_set]
        ranked = ranked_kept + ranked_pruned  # the selection's ranking (ties broken as it broke them)
        for i in range(max(1, 2 * k - len(ranked) + 1), k + 1):  # 1-based ranks, as in the paper
            pairs.append((ranked[i - 1], ranked[2 * k - i]))
    return pairs


def merge_pruned_heads(attn, spec, shape: dict, head_scores: torch.Tensor, kept_heads, where: str = "query") -> None:
    """Residual head merge (paper 1, §2.3): `head_i <- head_i + (head_i - head_{2K-i+1})` for the pairs of
    `merge_pairs`, before the pruned heads are sliced away.

    `where="query"` merges the heads themselves, their rows of the query projection (and its bias); in an MHA model,
    where each query head owns its key and value heads, their key and value rows too. With grouped-query attention
    the paper applies the merge "only to the query heads": the key/value rows are shared by the whole group. A
    per-head norm over head_dim (Qwen3) is shared by every head; norms over all heads (`qk_norm_over_heads`) and
    per-head parameters (attention sinks) are left as they are. `where="o_proj"` merges the heads' `o_proj` columns
    (their output path) instead. The merge is the MHA analogue of Layer Collapse; its effect is measured, not
    assumed (`benchmarks/prune_quality.py`, `benchmarks/claims.py` claim h).
    """
    head_dim, heads, kv = shape["head_dim"], shape["num_attention_heads"], shape["num_key_value_heads"]
    pairs = merge_pairs(head_scores, kept_heads, kv)
    if not pairs:
        return
    if where == "o_proj":
        o = getattr(attn, spec.o_proj).weight.data
        cols = o.view(o.shape[0], heads, head_dim)
        for h_i, h_p in pairs:
            cols[:, h_i] += cols[:, h_i] - cols[:, h_p]
        return
    # Row offsets of each merged block: (projection, offset of head 0's rows) for q, and for MHA for k and v too.
    mha = kv == heads
    if spec.qkv_proj:
        blocks = [(spec.qkv_proj, 0)] + ([(spec.qkv_proj, heads), (spec.qkv_proj, 2 * heads)] if mha else [])
    else:
        blocks = [(spec.q_proj, 0)] + ([(spec.k_proj, 0), (spec.v_proj, 0)] if mha else [])
    for name, offset in blocks:
        proj = getattr(attn, name)
        # A gated query projection's rows per head are [query; gate]: the query rows merge, each head keeps its gate.
        width = _q_rows_per_head(spec, head_dim) if name == spec.q_proj else head_dim
        for tensor in (proj.weight, proj.bias):
            if tensor is None:
                continue
            rows = tensor.data[offset * head_dim : offset * head_dim + heads * width].view(heads, width, -1)
            rows = rows[:, :head_dim]
            for h_i, h_p in pairs:
                rows[h_i] += rows[h_i] - rows[h_p]


# ---------------------------------------------------------------------------------------------- slicing
def slice_heads(attn, spec, shape: dict, kept_heads, kept_groups) -> None:
    head_dim, heads, kv = shape["head_dim"], shape["num_attention_heads"], shape["num_key_value_heads"]
    q_rows = head_rows(kept_heads, head_dim)
    kv_rows = head_rows(kept_groups, head_dim)
    if spec.qkv_proj:
        rows = torch.cat([q_rows, kv_rows + heads * head_dim, kv_rows + (heads + kv) * head_dim])
        slice_linear(getattr(attn, spec.qkv_proj), out_index=rows)
    else:
        slice_linear(getattr(attn, spec.q_proj), out_index=head_rows(kept_heads, _q_rows_per_head(spec, head_dim)))
        for name in (spec.k_proj, spec.v_proj):
            if _has(attn, name):
                slice_linear(getattr(attn, name), out_index=kv_rows)
    slice_linear(getattr(attn, spec.o_proj), in_index=q_rows)
    for name in spec.attention_head_parameters:
        slice_parameter(attn, name, kept_heads, dim=0)
    if spec.qk_norm_over_heads:
        slice_norm(attn.q_norm, q_rows)
        slice_norm(attn.k_norm, kv_rows)


def prune(model, layers, spec, importance, source: dict, target: dict, kept_layers, record, config) -> None:
    if target["num_attention_heads"] == source["num_attention_heads"] and (
        target["num_key_value_heads"] == source["num_key_value_heads"]
    ):
        return
    head_scores = scores(importance, config.batch_aggregation)
    kv_scores = _shared_group_scores(model.config, group_scores(importance, config.batch_aggregation), kept_layers)
    for new_idx, src_idx in enumerate(kept_layers):
        if not spec.has(layers[new_idx], BLOCK):
            continue
        kept_groups, kept_heads = select(
            head_scores[src_idx],
            source["num_key_value_heads"],
            target["num_attention_heads"],
            target["num_key_value_heads"],
            kv_scores[src_idx],
        )
        attn = getattr(layers[new_idx], spec.attention)
        if config.head_merge != "none":
            merge_pruned_heads(attn, spec, source, head_scores[src_idx], kept_heads, config.head_merge)
        slice_heads(attn, spec, source, kept_heads, kept_groups)
        record.heads[new_idx] = kept_heads.tolist()
        record.kv_heads[new_idx] = kept_groups.tolist()


def _shared_group_scores(model_config, kv_scores: torch.Tensor, kept_layers) -> torch.Tensor:
    """`kv_scores` (by source layer) where layers share keys and values (Gemma 3n's last `num_kv_shared_layers` read
    an earlier layer's): a KV head serves the layer computing it and every layer reading it, so all of them score it
    by the L2 of their group scores and keep the same groups. `model_config` is the depth-pruned model's: its layer
    `i` is source layer `kept_layers[i]`."""
    sources = kv_sources(model_config)
    if not sources:
        return kv_scores
    kv_scores = kv_scores.clone()
    for producer in set(sources.values()):
        tied = [kept_layers[i] for i in (producer, *[r for r, p in sources.items() if p == producer])]
        kv_scores[tied] = kv_scores[tied].norm(dim=0)
    return kv_scores


def update_config(model_config, spec, source: dict, target: dict) -> None:
    # head_dim is written explicitly: it no longer equals hidden / heads.
    model_config.head_dim = source["head_dim"]
    for name in FIELDS:
        setattr(model_config, name, target[name])


def sync_modules(model, model_config, spec) -> None:
    """Updates the head counts that attention modules cache at init from the (now pruned) config."""
    heads, kv = model_config.num_attention_heads, model_config.num_key_value_heads
    for module in model.modules():
        if isinstance(getattr(module, "num_key_value_groups", None), int):
            module.num_key_value_groups = heads // kv
        for name, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv)):
            if isinstance(getattr(module, name, None), int) and not isinstance(module, torch.nn.Linear):
                setattr(module, name, value)


# ---------------------------------------------------------------------------------------------- counting
def count_roles(spec, layer) -> dict[str, tuple]:
    """Module path inside a decoder layer -> symbols of its (output, input) axes: `q` query rows, `qg` query and
    output-gate rows, `kv` key/value rows, `qkv` a fused projection, `h` the hidden size."""
    attn = spec.attention
    roles = {}
    q = "qg" if spec.attention_output_gate else "q"
    for name, rows in ((spec.q_proj, q), (spec.k_proj, "kv"), (spec.v_proj, "kv"), (spec.qkv_proj, "qkv")):
        if name:
            roles[f"{attn}.{name}"] = (rows, "h")
    roles[f"{attn}.{spec.o_proj}"] = ("h", "q")
    for name in spec.attention_head_parameters:
        roles[f"{attn}.{name}"] = ("heads",)
    if spec.qk_norm_over_heads:
        roles[f"{attn}.q_norm"] = ("q",)
        roles[f"{attn}.k_norm"] = ("kv",)
    return roles


def count_sizes(shape: dict) -> dict[str, int]:
    head_dim = shape["head_dim"]
    q = shape["num_attention_heads"] * head_dim
    kv = shape["num_key_value_heads"] * head_dim
    return {"heads": shape["num_attention_heads"], "q": q, "qg": 2 * q, "kv": kv, "qkv": q + 2 * kv}
