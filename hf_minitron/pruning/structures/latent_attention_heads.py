"""Heads of multi-head latent attention (MLA, DeepSeek-V2/V3: https://arxiv.org/abs/2405.04434).

MLA compresses the keys and values of every head into one latent (`kv_a_proj_with_mqa`, `kv_lora_rank` channels plus
one rotary key of `qk_rope_head_dim` shared by all heads) and expands it per head (`kv_b_proj`); the queries go
through a latent of `q_lora_rank` channels (`q_a_proj`, `q_b_proj`), or straight from the hidden size (`q_proj`) when
`q_lora_rank` is `None`. A head owns:

* its rows of the query up-projection (`q_b_proj` or `q_proj`): `qk_nope_head_dim + qk_rope_head_dim` each;
* its rows of `kv_b_proj`: `qk_nope_head_dim` key rows then `v_head_dim` value rows;
* its columns of `o_proj`: `v_head_dim` each.

The latents, their norms and the shared rotary key are every head's: pruning heads keeps them whole. Every head has
its own key and value (`num_key_value_heads == num_attention_heads`), so there are no KV groups to keep: the head
count is the one target, and the config's `num_key_value_heads` follows it.

* Score (paper 1 §2.2, as `attention_heads.py`): the input of `o_proj` viewed as `[heads, v_head_dim]`, L2 norm over
  `v_head_dim`, per token, reduced over the tokens of each sample and over samples. Its statistics are the `heads` of
  `ImportanceScores`, which a family has either these or `attention_heads.py`'s.
* Selection: the top heads of each layer, each layer its own.
* Hidden channels: the columns of the query (down-)projection and of `kv_a_proj_with_mqa`, the rows of `o_proj`.
"""

import torch

from . import attention_heads
from .slicing import head_rows, slice_linear, topk_sorted
from .statistics import PER_SAMPLE, add_per_sample, static_scores


KEY = attention_heads.KEY  # a family has these heads or attention_heads', never both: one statistic
SCORE_KEYS = (KEY,)
CONFIG_FIELDS = ()  # its target is declared by attention_heads, whose head count it shares
FIELDS = ("num_attention_heads",)
BLOCK = "attention"
AXES = attention_heads.AXES[:1]  # the head count; there are no KV groups to search
CARD_ROWS = {"num_attention_heads": "Attention heads"}
SUMMARY = FIELDS
RECORD = ("heads",)
_FIELD = FIELDS[0]
# The config's sizes of MLA (transformers' DeepSeek-V2/V3 names): kept, read for the shapes of the projections.
DIMS = ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "q_lora_rank", "kv_lora_rank")


def present(spec) -> bool:
    return spec.attention is not None and spec.kv_b_proj is not None


def shape(model_config, spec) -> dict:
    """The head count and the (kept) MLA sizes of `model_config`; `{}` for a family without MLA."""
    if spec is None or not present(spec):
        return {}
    return {_FIELD: model_config.num_attention_heads} | {name: getattr(model_config, name) for name in DIMS}


# ---------------------------------------------------------------------------------------------- targets
def check_applies(config, model_config, shape: dict, spec) -> None:
    """Refuses what MLA has no use for: KV heads other than the heads (every head has its own key and value), and
    the residual head merge, written for grouped-query projections."""
    if spec is None or not present(spec):
        return
    kv = getattr(config, "num_key_value_heads", None)
    heads = config.num_attention_heads or shape[_FIELD]
    if kv is not None and kv != heads:
        raise ValueError(
            f"PrunedConfig.num_key_value_heads={kv} does not apply: model_type={model_config.model_type!r} uses "
            f"multi-head latent attention, where every head has its own key and value (num_key_value_heads = "
            f"num_attention_heads). Leave it None, or set it to num_attention_heads={heads}."
        )
    if getattr(config, "head_merge", "none") != "none":
        raise ValueError(
            f"PrunedConfig.head_merge={config.head_merge!r} is not supported for model_type="
            f"{model_config.model_type!r} (multi-head latent attention): the merge is written for query rows of "
            "grouped-query attention. Use head_merge='none'."
        )


def check_target(config, model_config=None, shape: dict | None = None) -> None:
    """Any head count up to the source's (checked by `PrunedConfig.validate_for` for every target)."""


# ---------------------------------------------------------------------------------------------- modules
def _attn(layer, spec):
    return getattr(layer, spec.attention)


def _q_up(attn, spec):
    """The projection whose rows are the heads' queries: `q_b_proj`, or `q_proj` without a query latent."""
    q_b = getattr(attn, spec.q_b_proj, None)
    return q_b if q_b is not None else getattr(attn, spec.q_proj)


def _q_in(attn, spec):
    """The query projection reading the hidden size: `q_a_proj`, or `q_proj` without a query latent."""
    q_a = getattr(attn, spec.q_a_proj, None)
    return q_a if q_a is not None else getattr(attn, spec.q_proj)


# ---------------------------------------------------------------------------------------------- scores
def hooks(collector, index: int, layer) -> list:
    spec, v_dim = collector.spec, collector.shape["v_head_dim"]
    store = collector.store(KEY, index)

    def heads_hook(module, args):
        x = args[0]
        x = x.view(*x.shape[:-1], -1, v_dim).float().norm(dim=-1)  # [B, S, heads]
        add_per_sample(store, x, collector.sample_mask, collector.how)

    return [getattr(_attn(layer, spec), spec.o_proj).register_forward_pre_hook(heads_hook)]


def sites(spec) -> list[tuple[int, str, int, str]]:
    """`(forward position, key, slot, description)` of the statistics, for error messages in forward order."""
    return [(1, KEY, 0, f"input of {spec.attention}.{spec.o_proj}")]


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
    """`[num_layers, num_attention_heads]` head importance (the statistics are `attention_heads`')."""
    return attention_heads.scores(importance, batch_aggregation)


def magnitude(layer, spec, shape: dict) -> torch.Tensor:
    """`[heads]`: L2 norm of each head's query rows, `kv_b_proj` rows and `o_proj` columns."""
    attn, heads = _attn(layer, spec), shape[_FIELD]
    total = 0
    for weight in (_q_up(attn, spec).weight, getattr(attn, spec.kv_b_proj).weight):
        total = total + weight.float().pow(2).view(heads, -1).sum(1)
    o = getattr(attn, spec.o_proj).weight.float()
    return (total + o.pow(2).view(o.shape[0], heads, -1).sum(dim=(0, 2))).sqrt()


def hidden_weights(layer, spec) -> tuple[list, list]:
    """The weights that read the hidden size (columns) and write it (rows): for magnitude hidden-channel scores."""
    attn = _attn(layer, spec)
    return [_q_in(attn, spec).weight, getattr(attn, spec.kv_a_proj).weight], [getattr(attn, spec.o_proj).weight]


def slice_hidden(layer, spec, kept: torch.Tensor) -> None:
    """Keeps the hidden channels `kept`: input columns of the query and key/value down-projections, output rows of
    `o_proj`."""
    attn = _attn(layer, spec)
    slice_linear(_q_in(attn, spec), in_index=kept)
    slice_linear(getattr(attn, spec.kv_a_proj), in_index=kept)
    slice_linear(getattr(attn, spec.o_proj), out_index=kept)


# ---------------------------------------------------------------------------------------------- slicing
def slice_heads(attn, spec, shape: dict, kept: torch.Tensor) -> None:
    """Keeps the heads `kept`: their query rows, `kv_b_proj` rows and `o_proj` columns."""
    nope, rope, v_dim = shape["qk_nope_head_dim"], shape["qk_rope_head_dim"], shape["v_head_dim"]
    slice_linear(_q_up(attn, spec), out_index=head_rows(kept, nope + rope))
    slice_linear(getattr(attn, spec.kv_b_proj), out_index=head_rows(kept, nope + v_dim))
    slice_linear(getattr(attn, spec.o_proj), in_index=head_rows(kept, v_dim))


def prune(model, layers, spec, importance, source: dict, target: dict, kept_layers, record, config) -> None:
    if target[_FIELD] >= source[_FIELD]:
        return
    head_scores = scores(importance, config.batch_aggregation)
    for new_idx, src_idx in enumerate(kept_layers):
        kept = topk_sorted(head_scores[src_idx], target[_FIELD])
        slice_heads(_attn(layers[new_idx], spec), spec, source, kept)
        record.heads[new_idx] = kept.tolist()


def update_config(model_config, spec, source: dict, target: dict) -> None:
    model_config.num_attention_heads = target[_FIELD]
    model_config.num_key_value_heads = target[_FIELD]


def sync_modules(model, model_config, spec) -> None:
    """Updates the head counts the attention modules cache at init (`num_heads`, `num_key_value_groups`)."""
    attention_heads.sync_modules(model, model_config, spec)


# ---------------------------------------------------------------------------------------------- counting
def count_roles(spec, layer) -> dict[str, tuple]:
    """Module path inside a decoder layer -> symbols of its (output, input) axes: `mla_q` the heads' query rows,
    `mla_kv` their key/value rows, `mla_o` their `o_proj` columns; the latents (`q_lora`, `kv_lora`, `kv_a` with the
    rotary key) and `h` the hidden size."""
    path, attn = spec.attention, _attn(layer, spec)
    roles = {f"{path}.{spec.kv_a_proj}": ("kv_a", "h"), f"{path}.kv_a_layernorm": ("kv_lora",)}
    roles[f"{path}.{spec.kv_b_proj}"] = ("mla_kv", "kv_lora")
    if getattr(attn, spec.q_b_proj, None) is not None:
        roles[f"{path}.{spec.q_a_proj}"] = ("q_lora", "h")
        roles[f"{path}.q_a_layernorm"] = ("q_lora",)
        roles[f"{path}.{spec.q_b_proj}"] = ("mla_q", "q_lora")
    else:
        roles[f"{path}.{spec.q_proj}"] = ("mla_q", "h")
    roles[f"{path}.{spec.o_proj}"] = ("h", "mla_o")
    return roles


def count_sizes(shape: dict) -> dict[str, int]:
    heads, nope, rope = shape[_FIELD], shape["qk_nope_head_dim"], shape["qk_rope_head_dim"]
    return {
        "mla_q": heads * (nope + rope),
        "mla_kv": heads * (nope + shape["v_head_dim"]),
        "mla_o": heads * shape["v_head_dim"],
        "q_lora": shape["q_lora_rank"] or 0,
        "kv_lora": shape["kv_lora_rank"],
        "kv_a": shape["kv_lora_rank"] + rope,
    }
