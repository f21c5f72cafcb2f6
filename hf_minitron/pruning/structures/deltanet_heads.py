"""Gated DeltaNet heads (Qwen3-Next, Qwen3.5): value heads within their key head, and whole key heads.

A Gated DeltaNet mixer ("Gated Delta Networks", https://arxiv.org/abs/2412.06464) has `linear_num_key_heads` query/key
heads and `linear_num_value_heads` value heads; value head j reads query/key head `j // (value heads per key head)`,
the grouping Mamba2 heads have by B/C group and attention heads by KV head. Pruning keeps that grouping, as
`mamba_heads.py` and `attention_heads.py` do:

* Statistic: each value head's output through `out_proj`, i.e. the L2 per token of `out_proj`'s columns of the head
  times the head's slice of `out_proj`'s input, then reduced over the tokens of each sample and over samples, as
  attention heads are scored. Not the input of `out_proj` alone: that is the gated RMSNorm's output, whose L2 per
  head is `|norm.weight * silu(z)| * sqrt(dv)` whatever the head computed, so it ranks heads by their gate (measured
  on the embedded Qwen3.5, docs/hybrids.md). The head dims (`linear_key_head_dim`, `linear_value_head_dim`) are
  kept.
* Key heads (`linear_num_key_heads`): each scores the L2 of its value heads' scores; the top ones are kept whole,
  with their query and key rows and all their value heads' candidates.
* Value heads (`linear_num_value_heads`): within each kept key head, its own top value heads, the same number in
  every key head (stock transformers gives every key head `value heads // key heads` consecutive value heads).

Every per-head tensor follows: the q/k rows of the kept key heads and the v/z rows of the kept value heads of the
input projections (fused per key head in Qwen3-Next's `in_proj_qkvz` / `in_proj_ba`, separate in Qwen3.5's
`in_proj_qkv` / `in_proj_z` / `in_proj_b` / `in_proj_a`, see `ArchitectureSpec.deltanet_fused`), the same channels of
the depthwise `conv1d` (channels `[q, k, v]`), `A_log` and `dt_bias` (per value head) and the `out_proj` columns. The
gated norm acts over one value head's `dv` channels, shared by every head: it is kept as it is.
"""

import torch

from .attention_heads import select
from .fields import ConfigField, refuse_absent_target, target_names
from .search_axis import SearchAxis
from .slicing import head_rows, slice_linear, slice_parameter
from .statistics import PER_SAMPLE, add_per_sample, reduce_per_sample, static_scores


KEY = "deltanet"
SCORE_KEYS = (KEY,)
CONFIG_FIELDS = (
    ConfigField(
        "linear_num_value_heads",
        doc="""Gated DeltaNet hybrids (Qwen3-Next, Qwen3.5): target number of value heads per DeltaNet layer, a multiple of
the key heads kept (`linear_num_key_heads`): every key head keeps the same number of its own value heads.""",
        help="Gated DeltaNet hybrids: target value heads per DeltaNet layer (a multiple of the key heads).",
    ),
    ConfigField(
        "linear_num_key_heads",
        doc="""Gated DeltaNet hybrids: target number of query/key heads per DeltaNet layer. Kept by default; pruning them
removes whole key heads with their value heads.""",
        help="Gated DeltaNet hybrids: target key heads per DeltaNet layer (kept unless set).",
    ),
)
FIELDS = target_names(CONFIG_FIELDS)
BLOCK = "deltanet"
CARD_ROWS = {
    "linear_num_value_heads": "Gated DeltaNet value heads",
    "linear_num_key_heads": "Gated DeltaNet key heads",
}
SUMMARY = FIELDS
RECORD = ("deltanet_value_heads", "deltanet_key_heads")
_VALUE, _KEY = FIELDS
# The head dims, kept: the projections' sizes depend on them.
_DIMS = ("linear_key_head_dim", "linear_value_head_dim")


def present(spec) -> bool:
    return spec.deltanet is not None


def shape(model_config, spec) -> dict:
    """The mixers' sizes under the config's own names (the same in every family that has them), `{}` without."""
    if spec is None or spec.deltanet is None:
        return {}
    return {name: getattr(model_config, name) for name in (*FIELDS, *_DIMS)}


def _fits(target: dict, source: dict) -> bool:
    """Whether a candidate's value heads suit its key heads: as many per key head, no more than the source has."""
    values, keys = target[_VALUE], target[_KEY]
    return not (values % keys or values // keys > source[_VALUE] // source[_KEY])


AXES = (
    SearchAxis(
        _VALUE,
        "dnvalues",
        "DeltaNet value heads",
        floor=_KEY,
        step=_KEY,
        step_reason="every key head keeps the same number of value heads",
        cap=True,
        fits=_fits,
    ),
    # Key heads are searched at the teacher's count unless a grid gives others: a key head carries its value heads.
    SearchAxis(
        _KEY, "dnkeys", "DeltaNet key heads", multiple=False, values=lambda config, source: [source], fits=_fits
    ),
)


# ---------------------------------------------------------------------------------------------- targets
def check_applies(config, model_config, shape: dict, spec) -> None:
    """Refuses Gated DeltaNet targets for a model without Gated DeltaNet layers."""
    for name in FIELDS:
        refuse_absent_target(config, name, model_config, shape, "Gated DeltaNet layers", "deltanet")


def check_target(config, model_config=None, shape: dict | None = None) -> None:
    """Refuses value heads that are not shared equally by the key heads, more key heads than value heads, or (against
    the model's `shape`) more value heads per key head than the source has."""
    values, keys = getattr(config, _VALUE), getattr(config, _KEY)
    if shape is None:  # the config alone, when it is built
        if values is not None and keys is not None and values % keys:
            raise ValueError(
                f"PrunedConfig.{_VALUE}={values} is not a multiple of {_KEY}={keys}: every key head keeps the same "
                f"number of value heads. Use a multiple of {keys}, e.g. {max(keys, values // keys * keys)}."
            )
        return
    if values is None and keys is None:
        return
    values = values or shape[_VALUE]
    keys = keys or shape[_KEY]
    if keys > values:
        raise ValueError(
            f"PrunedConfig keeps {keys} key heads ({_KEY}) and {values} value heads ({_VALUE}): every key head keeps "
            f"at least one value head. Use {_VALUE} >= {keys}, or set {_KEY} <= {values}."
        )
    if values % keys:
        raise ValueError(
            f"PrunedConfig.{_VALUE}={values} is not a multiple of the {keys} key heads ({_KEY}): every key head keeps "
            f"the same number of value heads. Use a multiple of {keys}, e.g. {max(keys, values // keys * keys)}."
        )
    per_key = shape[_VALUE] // shape[_KEY]
    if values // keys > per_key:
        # Pruning removes whole key heads and value heads inside them; it never moves a value head to another key.
        raise ValueError(
            f"PrunedConfig keeps {values // keys} value heads per key head ({_VALUE}={values}, {_KEY}={keys}), but "
            f"the source model's key heads hold {per_key}: use {_VALUE} <= {keys * per_key}, or keep more key heads."
        )


# ---------------------------------------------------------------------------------------------- scores
def hooks(collector, index: int, layer) -> list:
    store = collector.store(KEY, index)
    head_dim = collector.shape["linear_value_head_dim"]

    def heads_hook(module, args):
        x = args[0]
        add_per_sample(store, head_output_norms(x, module.weight, head_dim), collector.sample_mask, collector.how)

    return [getattr(layer, collector.spec.deltanet).out_proj.register_forward_pre_hook(heads_hook)]


def sites(spec) -> list[tuple[int, str, int, str]]:
    return [(1, KEY, 0, f"each value head's output through {spec.deltanet}.out_proj")]


def head_output_norms(x: torch.Tensor, weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """`[B, S, heads]`: per token, the L2 of each head's contribution to `out_proj`'s output, `|W_h x_h|` for the
    head's columns `W_h` (`[hidden, head_dim]`) and its slice `x_h` of the input `x` (`[B, S, heads * head_dim]`).

    As `sqrt(x_h^T (W_h^T W_h) x_h)`: the heads' `[head_dim, head_dim]` Gram matrices are a `head_dim / hidden` fraction
    of `out_proj`'s own cost per token, where the heads' outputs themselves would cost `out_proj` again and hold
    `heads` copies of the hidden states."""
    *lead, width = x.shape
    heads = width // head_dim
    w = weight.float().view(weight.shape[0], heads, head_dim).transpose(0, 1)  # [heads, hidden, head_dim]
    gram = w.transpose(1, 2) @ w  # [heads, head_dim, head_dim]
    xh = x.float().reshape(-1, heads, head_dim).transpose(0, 1)  # [heads, tokens, head_dim]
    squares = ((xh @ gram) * xh).sum(dim=-1).clamp_min(0)  # [heads, tokens]; >= 0 but for rounding
    return squares.sqrt().transpose(0, 1).reshape(*lead, heads)


def score_shapes(shape: dict) -> dict[str, tuple]:
    """`{score key: per-layer dims}` that every statistic of the key starts with: the value heads."""
    return {KEY: (shape[_VALUE],)}


def collect(collector, shape: dict, device) -> dict[str, dict]:
    """`{score key: statistics}` of the importance pass, summed over processes."""
    return {KEY: collector.stacked(KEY, shape[_VALUE], 1, PER_SAMPLE, device)}


def random_scores(key: str, shape: dict, draw) -> dict:
    """The random baseline's scores (`draw(*dims)` draws `[num_layers, *dims]`)."""
    return {"score": draw(shape[_VALUE])}


def magnitude_scores(model, layers, spec, shape: dict) -> dict[str, dict]:
    """`{score key: {"score": ...}}` of the weight-magnitude baseline."""
    return {KEY: static_scores([magnitude(layer, spec, shape) for layer in layers])}


def scores(importance, batch_aggregation: str) -> torch.Tensor:
    """`[num_layers, linear_num_value_heads]` value-head importance (zero rows for layers without the mixer)."""
    return reduce_per_sample(getattr(importance, KEY), batch_aggregation, importance.num_samples)


def key_scores(value_scores: torch.Tensor, num_keys: int) -> torch.Tensor:
    """`[..., value heads]` -> `[..., key heads]`: each key head's L2 over its value heads."""
    return value_scores.view(*value_scores.shape[:-1], num_keys, -1).norm(dim=-1)


def _value_rows(spec, shape: dict) -> dict[str, torch.Tensor]:
    """`{input projection: its rows of each value head}` (`[value heads, rows per head]`): v and z rows, b and a."""
    dk, dv = shape["linear_key_head_dim"], shape["linear_value_head_dim"]
    values, keys = shape[_VALUE], shape[_KEY]
    per_key = values // keys
    heads = torch.arange(values)
    if spec.deltanet_fused:
        key, local = heads // per_key, heads % per_key
        block = key * (2 * dk + 2 * per_key * dv) + 2 * dk + local * dv  # first v row of each value head
        channels = torch.arange(dv)
        v = block[:, None] + channels
        z = v + per_key * dv
        ba = (key * 2 * per_key + local)[:, None]
        return {"in_proj_qkvz": torch.cat([v, z], dim=1), "in_proj_ba": torch.cat([ba, ba + per_key], dim=1)}
    v = head_rows(heads, dv, offset=2 * keys * dk).view(values, dv)
    return {
        "in_proj_qkv": v,
        "in_proj_z": head_rows(heads, dv).view(values, dv),
        "in_proj_b": heads[:, None],
        "in_proj_a": heads[:, None],
    }


def magnitude(layer, spec, shape) -> torch.Tensor:
    """`[value heads]`: L2 norm of each value head's v, z, b and a rows, its conv filters and `out_proj` columns."""
    values = shape[_VALUE]
    if not spec.has(layer, BLOCK):  # a layer with attention instead: a zero row, never used
        return torch.zeros(values)
    mixer = getattr(layer, spec.deltanet)
    dv = shape["linear_value_head_dim"]
    total = torch.zeros(values)
    for name, rows in _value_rows(spec, shape).items():
        total += getattr(mixer, name).weight.float().pow(2).sum(dim=1)[rows].sum(dim=1)
    conv = mixer.conv1d.weight.float().pow(2).flatten(1).sum(dim=1)
    total += conv[2 * shape[_KEY] * shape["linear_key_head_dim"] :].view(values, dv).sum(dim=1)
    total += mixer.out_proj.weight.float().pow(2).sum(dim=0).view(values, dv).sum(dim=1)
    return total.sqrt()


def _projections(spec) -> tuple[str, ...]:
    return (
        ("in_proj_qkvz", "in_proj_ba")
        if spec.deltanet_fused
        else ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")
    )


def hidden_weights(layer, spec) -> tuple[list, list]:
    mixer = getattr(layer, spec.deltanet)
    return [getattr(mixer, name).weight for name in _projections(spec)], [mixer.out_proj.weight]


def slice_hidden(layer, spec, kept: torch.Tensor) -> None:
    """Keeps the hidden channels `kept`: input columns of the input projections, output rows of `out_proj`."""
    mixer = getattr(layer, spec.deltanet)
    for name in _projections(spec):
        slice_linear(getattr(mixer, name), in_index=kept)
    slice_linear(mixer.out_proj, out_index=kept)


# ---------------------------------------------------------------------------------------------- slicing
def slice_deltanet(mixer, spec, shape: dict, kept_keys: torch.Tensor, kept_values: torch.Tensor) -> None:
    """Keeps the key heads `kept_keys` and the value heads `kept_values` (sorted, as many in every kept key head)."""
    dk, dv = shape["linear_key_head_dim"], shape["linear_value_head_dim"]
    values, keys = shape[_VALUE], shape[_KEY]
    key_dim = keys * dk
    q_rows, v_rows = head_rows(kept_keys, dk), head_rows(kept_values, dv)
    qkv = torch.cat([q_rows, q_rows + key_dim, v_rows + 2 * key_dim])  # also the conv channels [q, k, v]
    if spec.deltanet_fused:
        per_key = values // keys
        block = 2 * dk + 2 * per_key * dv
        rows, ba = [], []
        for key in kept_keys.tolist():
            local = kept_values[kept_values // per_key == key] % per_key
            v = head_rows(local, dv) + key * block + 2 * dk
            rows += [torch.arange(2 * dk) + key * block, v, v + per_key * dv]
            ba += [local + key * 2 * per_key, local + key * 2 * per_key + per_key]
        slice_linear(mixer.in_proj_qkvz, out_index=torch.cat(rows))
        slice_linear(mixer.in_proj_ba, out_index=torch.cat(ba))
    else:
        slice_linear(mixer.in_proj_qkv, out_index=qkv)
        slice_linear(mixer.in_proj_z, out_index=v_rows)
        slice_linear(mixer.in_proj_b, out_index=kept_values)
        slice_linear(mixer.in_proj_a, out_index=kept_values)
    slice_parameter(mixer.conv1d, "weight", qkv, dim=0)
    if mixer.conv1d.bias is not None:
        slice_parameter(mixer.conv1d, "bias", qkv, dim=0)
    for name in ("A_log", "dt_bias"):
        slice_parameter(mixer, name, kept_values, dim=0)
    slice_linear(mixer.out_proj, in_index=v_rows)


def prune(model, layers, spec, importance, source: dict, target: dict, kept_layers, record, config) -> None:
    if all(target[name] == source[name] for name in FIELDS):
        return
    value_scores = scores(importance, config.batch_aggregation)
    for new_idx, src_idx in enumerate(kept_layers):
        layer = layers[new_idx]
        if not spec.has(layer, BLOCK):
            continue
        kept_keys, kept_values = select(
            value_scores[src_idx],
            source[_KEY],
            target[_VALUE],
            target[_KEY],
            key_scores(value_scores[src_idx], source[_KEY]),
        )
        slice_deltanet(getattr(layer, spec.deltanet), spec, source, kept_keys, kept_values)
        record.deltanet_value_heads[new_idx] = kept_values.tolist()
        record.deltanet_key_heads[new_idx] = kept_keys.tolist()


def update_config(model_config, spec, source: dict, target: dict) -> None:
    for name in FIELDS:
        setattr(model_config, name, target[name])


def sync_modules(model, model_config, spec) -> None:
    """The sizes every Gated DeltaNet mixer caches at init (its conv1d's channels too)."""
    from ...architectures import get_decoder_layers

    values, keys = getattr(model_config, _VALUE), getattr(model_config, _KEY)
    for layer in get_decoder_layers(model):
        if not spec.has(layer, BLOCK):
            continue
        mixer = getattr(layer, spec.deltanet)
        mixer.num_v_heads, mixer.num_k_heads = values, keys
        mixer.key_dim, mixer.value_dim = keys * mixer.head_k_dim, values * mixer.head_v_dim
        mixer.conv_dim = 2 * mixer.key_dim + mixer.value_dim
        mixer.conv1d.in_channels = mixer.conv1d.out_channels = mixer.conv1d.groups = mixer.conv_dim


# ---------------------------------------------------------------------------------------------- counting
def count_roles(spec, layer) -> dict[str, tuple]:
    """`dnh` value heads, `dnv` value channels, `dnqkv` channels `[q, k, v]`, `dnqkvz` and `dnba` the rows of
    Qwen3-Next's fused projections, `h` the hidden size."""
    path = spec.deltanet
    kernel = getattr(layer, path).conv1d.weight.shape[-1]
    roles = {
        f"{path}.conv1d.weight": ("dnqkv", 1, kernel),
        f"{path}.conv1d": ("dnqkv",),
        f"{path}.out_proj": ("h", "dnv"),
        f"{path}.A_log": ("dnh",),
        f"{path}.dt_bias": ("dnh",),
    }
    if spec.deltanet_fused:
        roles |= {f"{path}.in_proj_qkvz": ("dnqkvz", "h"), f"{path}.in_proj_ba": ("dnba", "h")}
    else:
        roles |= {
            f"{path}.in_proj_qkv": ("dnqkv", "h"),
            f"{path}.in_proj_z": ("dnv", "h"),
            f"{path}.in_proj_b": ("dnh", "h"),
            f"{path}.in_proj_a": ("dnh", "h"),
        }
    return roles


def count_sizes(shape: dict) -> dict[str, int]:
    values = shape[_VALUE]
    key_dim = shape[_KEY] * shape["linear_key_head_dim"]
    value_dim = values * shape["linear_value_head_dim"]
    return {
        "dnh": values,
        "dnv": value_dim,
        "dnqkv": 2 * key_dim + value_dim,
        "dnqkvz": 2 * key_dim + 2 * value_dim,
        "dnba": 2 * values,
    }
