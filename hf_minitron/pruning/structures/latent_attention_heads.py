"""Heads and latent ranks of multi-head latent attention (MLA, DeepSeek-V2/V3: https://arxiv.org/abs/2405.04434).

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

The latents' ranks (`q_lora_rank`, `kv_lora_rank`) are pruned too. A kept channel keeps its row of the
down-projection, its weight of the norm and its column of the up-projection; the rotary key, computed by the last rows
of `kv_a_proj_with_mqa` next to the latent, is kept whole.

* Score: what the up-projection (`q_b_proj`, `kv_b_proj`) does with the channel. Its output is
  `sum_c x_c * W[:, c]` over the normalised latent `x`, so channel c adds a vector of norm `|x_c| * ||W[:, c]||` to
  every token. The hook records the statistics of `x_c * ||W[:, c]||` (reduced over the tokens of each sample and over
  samples, as the neurons of an MLP): the activation alone cannot see that a channel is read by nothing. The latent's
  RMS norm holds every channel near the latent's RMS, so a channel the up-projection ignores (a null space of the
  key/value map, e.g. the 256 of 576 channels of the embedded MLA model, which only keep its RMS) is as active as any
  other; weighted by its column, it scores 0.
* Norm compensation: the latent's RMS norm computes `weight * z / rms(z)` over the channels `z` of the
  down-projection (transformers' `DeepseekV3RMSNorm`); over the kept channels K it divides by `rms_K(z)` instead, which
  rescales every kept output by `rms(z) / rms_K(z)`. The kept norm weights are multiplied by
  `sqrt(sum_K E[z_c^2] / |K| / (sum_c E[z_c^2] / rank))`, the ratio of the mean squared latent over the kept channels
  to that over all of them, from `E[z_c^2]` measured at the norm's input during the importance pass (`prenorm_sq`, a
  sum over tokens: the token count cancels). One factor serves every token: it is exact when the ratio
  `rms_K(z) / rms(z)` is the same for every token (e.g. removing channels that are always zero), first-order
  otherwise, and ignores the norm's epsilon. The static baselines (magnitude, random) run no forward pass: they take
  `E[z_c^2]` proportional to the squared norm of the channel's down-projection row, as for an isotropic input.
"""

import torch

from . import attention_heads
from .fields import ConfigField, target_names
from .search_axis import SearchAxis
from .slicing import head_rows, slice_linear, slice_norm, topk_sorted
from .statistics import PER_SAMPLE, add_per_sample, add_sums, reduce_per_sample, static_scores


KEY = attention_heads.KEY  # a family has these heads or attention_heads', never both: one statistic
Q_KEY, KV_KEY = "q_latent", "kv_latent"
SCORE_KEYS = (KEY, Q_KEY, KV_KEY)
# The head count is declared by attention_heads, which it shares; the latents' ranks are this structure's own.
CONFIG_FIELDS = (
    ConfigField(
        "q_lora_rank",
        doc="Multi-head latent attention (DeepSeek-V3): target rank of the query latent (`q_a_proj` rows).",
        help="MLA: target rank of the query latent.",
    ),
    ConfigField(
        "kv_lora_rank",
        doc="Multi-head latent attention (DeepSeek-V3): target rank of the key/value latent, the per-token cache.",
        help="MLA: target rank of the key/value latent.",
    ),
)
FIELDS = ("num_attention_heads", *target_names(CONFIG_FIELDS))
BLOCK = "attention"
AXES = (
    attention_heads.AXES[0],  # the head count; there are no KV groups to search
    SearchAxis("q_lora_rank", "qrank", "q rank", multiple_default=64),
    SearchAxis("kv_lora_rank", "kvrank", "KV rank", multiple_default=64),
)
CARD_ROWS = {
    "num_attention_heads": "Attention heads",
    "q_lora_rank": "Query latent rank",
    "kv_lora_rank": "KV latent rank",
}
SUMMARY = FIELDS
RECORD = ("heads", Q_KEY, KV_KEY)
_FIELD = FIELDS[0]
_RANKS = {Q_KEY: "q_lora_rank", KV_KEY: "kv_lora_rank"}  # score key -> its target
# A latent's statistic besides the per-sample sums: the sum over tokens of each channel's square before the norm.
PRENORM = "prenorm_sq"
# The config's sizes of MLA (transformers' DeepSeek-V2/V3 names): the head dims are kept, the latents' ranks targets.
DIMS = ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "q_lora_rank", "kv_lora_rank")


def present(spec) -> bool:
    return spec.attention is not None and spec.kv_b_proj is not None


def shape(model_config, spec) -> dict:
    """The head count, the latents' ranks and the head dims (kept) of `model_config`; `{}` for a family without MLA.
    Without a query latent (`q_lora_rank=None`) its rank is not in the shape: it is no target."""
    if spec is None or not present(spec):
        return {}
    sizes = {_FIELD: model_config.num_attention_heads} | {name: getattr(model_config, name) for name in DIMS}
    return {name: value for name, value in sizes.items() if value is not None}


# ---------------------------------------------------------------------------------------------- targets
def check_applies(config, model_config, shape: dict, spec) -> None:
    """Refuses the latents' ranks for a model without them, and what MLA has no use for: KV heads other than the
    heads (every head has its own key and value), and the residual head merge, written for grouped-query
    projections."""
    for name in _RANKS.values():
        value = getattr(config, name, None)
        if value is not None and name not in shape:
            without = "MLA" if spec is None or not present(spec) else "query latent (its q_lora_rank is None)"
            raise ValueError(
                f"PrunedConfig.{name}={value} does not apply: model_type={model_config.model_type!r} has no "
                f"{without}. Leave it None."
            )
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
    """Any head count or rank up to the source's (checked by `PrunedConfig.validate_for` for every target)."""


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

    attn = _attn(layer, spec)
    handles = [getattr(attn, spec.o_proj).register_forward_pre_hook(heads_hook)]
    norms, columns = _norms(attn, spec), {}
    for key, up in _ups(attn, spec).items():
        store_latent = collector.store(key, index)

        def latent_hook(module, args, store_latent=store_latent, key=key):
            x = args[0]  # [B, S, rank]; the key/value latent arrives as one head, [B, 1, S, rank]
            x = x.flatten(0, -3) if x.dim() == 4 else x
            # Channel c adds x_c * W[:, c] to the output: its share has norm |x_c| * ||W[:, c]||. The weights do not
            # change during the pass: the column norms are computed once.
            if key not in columns:
                columns[key] = module.weight.detach().float().pow(2).sum(0).sqrt()
            add_per_sample(store_latent, x, collector.sample_mask, collector.how, scale=columns[key])

        def prenorm_hook(module, args, store_latent=store_latent):
            x = args[0].float()  # [B, S, rank], before the norm
            square = x * x
            if collector.sample_mask is not None:
                square = square * collector.sample_mask.to(x.device).unsqueeze(-1)
            # Summed as [tokens, rank] over dim 0 (`torch.linalg.vector_norm` over (0, 1) is 6x slower on a CPU).
            square = square.reshape(-1, square.shape[-1]).sum(dim=0)
            add_sums(store_latent, {PRENORM: square})

        handles.append(up.register_forward_pre_hook(latent_hook))
        handles.append(norms[key].register_forward_pre_hook(prenorm_hook))
    return handles


def _ups(attn, spec) -> dict:
    """The up-projections reading a latent, by score key: `kv_b_proj`, and `q_b_proj` when queries have a latent."""
    ups = {KV_KEY: getattr(attn, spec.kv_b_proj)}
    if getattr(attn, spec.q_b_proj, None) is not None:
        ups[Q_KEY] = getattr(attn, spec.q_b_proj)
    return ups


def _norms(attn, spec) -> dict:
    """The latents' RMS norms, by score key."""
    return {key: norm for key, (_, norm) in _downs(attn, spec).items()}


def sites(spec) -> list[tuple[int, str, int, str]]:
    """`(forward position, key, slot, description)` of the statistics, for error messages in forward order."""
    return [
        (1, Q_KEY, 0, f"input of {spec.attention}.q_a_layernorm or {spec.q_b_proj}"),
        (1, KV_KEY, 0, f"input of {spec.attention}.kv_a_layernorm or {spec.kv_b_proj}"),
        (1, KEY, 0, f"input of {spec.attention}.{spec.o_proj}"),
    ]


def _dims(shape: dict) -> dict[str, int]:
    """Score key -> per-layer size, for the keys of the model's shape (no query latent: no `q_latent`)."""
    dims = {KEY: shape[_FIELD]}
    return dims | {key: shape[name] for key, name in _RANKS.items() if name in shape}


def score_shapes(shape: dict) -> dict[str, tuple]:
    """`{score key: per-layer dims}` that every statistic of the key starts with."""
    return {key: (size,) for key, size in _dims(shape).items()}


def collect(collector, shape: dict, device) -> dict[str, dict]:
    """`{score key: statistics}` of the importance pass, summed over processes."""
    names = {KEY: PER_SAMPLE} | {key: (*PER_SAMPLE, PRENORM) for key in _RANKS}
    return {key: collector.stacked(key, size, 1, names[key], device) for key, size in _dims(shape).items()}


def random_scores(key: str, shape: dict, draw) -> dict:
    """The random baseline's scores (`draw(*dims)` draws `[num_layers, *dims]`)."""
    return {"score": draw(_dims(shape)[key])} if key in _dims(shape) else {}


def magnitude_scores(model, layers, spec, shape: dict) -> dict[str, dict]:
    """`{score key: {"score": ...}}` of the weight-magnitude baseline: heads, and each latent channel's down-projection
    row and up-projection column."""
    result = {KEY: static_scores([magnitude(layer, spec, shape) for layer in layers])}
    for key, name in _RANKS.items():
        if name in shape:
            result[key] = static_scores([latent_magnitude(layer, spec, key, shape[name]) for layer in layers])
    return result


def scores(importance, batch_aggregation: str) -> torch.Tensor:
    """`[num_layers, num_attention_heads]` head importance (the statistics are `attention_heads`')."""
    return attention_heads.scores(importance, batch_aggregation)


def latent_scores(importance, key: str, batch_aggregation: str) -> torch.Tensor:
    """`[num_layers, rank]` importance of the channels of the latent `key` (`"q_latent"`, `"kv_latent"`)."""
    return reduce_per_sample(getattr(importance, key), batch_aggregation, importance.num_samples)


def _downs(attn, spec) -> dict:
    """The down-projections writing a latent and its norm, by score key."""
    downs = {KV_KEY: (getattr(attn, spec.kv_a_proj), attn.kv_a_layernorm)}
    if getattr(attn, spec.q_b_proj, None) is not None:
        downs[Q_KEY] = (getattr(attn, spec.q_a_proj), attn.q_a_layernorm)
    return downs


def latent_magnitude(layer, spec, key: str, rank: int) -> torch.Tensor:
    """`[rank]`: L2 norm of each latent channel's down-projection row and up-projection column."""
    attn = _attn(layer, spec)
    down = _downs(attn, spec)[key][0].weight[:rank].float()  # the key/value latent's rotary rows follow it
    up = _ups(attn, spec)[key].weight.float()
    return (down.pow(2).sum(1) + up.pow(2).sum(0)).sqrt()


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


def slice_latent(attn, spec, key: str, rank: int, kept: torch.Tensor, mean_square: torch.Tensor | None = None) -> None:
    """Keeps the channels `kept` of the latent `key`: its rows of the down-projection (and the rotary key's rows after
    the key/value latent), its norm weights, its columns of the up-projection. With `mean_square` (`[rank]`, each
    channel's mean square before the norm, up to a common factor), the kept norm weights are rescaled so that the norm
    divides by the RMS it had over every channel (see the module docstring)."""
    down, norm = _downs(attn, spec)[key]
    rows = torch.cat([kept, torch.arange(rank, down.out_features, device=kept.device)])
    slice_linear(down, out_index=rows)
    slice_norm(norm, kept)
    slice_linear(_ups(attn, spec)[key], in_index=kept)
    if mean_square is not None:
        kept_mean = mean_square[kept.to(mean_square.device)].mean()
        if kept_mean > 0:
            factor = (kept_mean / mean_square.mean()).sqrt()
            with torch.no_grad():
                norm.weight.mul_(factor.to(norm.weight.dtype))


def latent_mean_square(importance, key: str, attn, spec, layer: int, rank: int) -> torch.Tensor:
    """`[rank]`: each channel's mean square at the input of the latent's norm in source layer `layer`, up to a common
    factor: measured by the importance pass, or, for the static baselines, the squared norm of its down-projection
    row (the mean square for an isotropic input)."""
    stats = getattr(importance, key)
    if PRENORM in stats:
        return stats[PRENORM][layer].double()
    return _downs(attn, spec)[key][0].weight[:rank].detach().double().pow(2).sum(1)


def prune(model, layers, spec, importance, source: dict, target: dict, kept_layers, record, config) -> None:
    if target[_FIELD] < source[_FIELD]:
        head_scores = scores(importance, config.batch_aggregation)
        for new_idx, src_idx in enumerate(kept_layers):
            kept = topk_sorted(head_scores[src_idx], target[_FIELD])
            slice_heads(_attn(layers[new_idx], spec), spec, source, kept)
            record.heads[new_idx] = kept.tolist()
    for key, name in _RANKS.items():
        if name not in source or target[name] >= source[name]:
            continue
        channel_scores = latent_scores(importance, key, config.batch_aggregation)
        for new_idx, src_idx in enumerate(kept_layers):
            attn = _attn(layers[new_idx], spec)
            kept = topk_sorted(channel_scores[src_idx], target[name])
            mean_square = latent_mean_square(importance, key, attn, spec, src_idx, source[name])
            slice_latent(attn, spec, key, source[name], kept, mean_square)
            getattr(record, key)[new_idx] = kept.tolist()


def update_config(model_config, spec, source: dict, target: dict) -> None:
    model_config.num_attention_heads = target[_FIELD]
    model_config.num_key_value_heads = target[_FIELD]
    for name in _RANKS.values():
        if name in source:
            setattr(model_config, name, target[name])


def sync_modules(model, model_config, spec) -> None:
    """Updates the sizes the attention modules cache at init: head counts (`num_heads`, `num_key_value_groups`) and
    the latents' ranks, which their forward splits by."""
    attention_heads.sync_modules(model, model_config, spec)
    from ...architectures import get_decoder_layers

    for layer in get_decoder_layers(model):
        attn = _attn(layer, spec)
        for name in _RANKS.values():
            if isinstance(getattr(attn, name, None), int):
                setattr(attn, name, getattr(model_config, name))


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
        "q_lora": shape.get("q_lora_rank", 0),
        "kv_lora": shape["kv_lora_rank"],
        "kv_a": shape["kv_lora_rank"] + rope,
    }
