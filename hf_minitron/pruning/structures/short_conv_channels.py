"""Channels of a gated short convolution (LFM2's `conv` layers): scores, selection, slicing, counting.

The operator computes `out_proj(C * conv(B * x))`, where `in_proj` writes the rows `[B, C, x]`, each `hidden_size`
wide, and `conv` is depthwise over those channels. Its channels are as many as the hidden size's but are not the
residual stream's: the modeling code builds them `hidden_size` wide, so they are pruned when, and to the count that,
hidden channels are. It has no target of its own.

* Score (paper 1 §2.2, as MLP neurons): the input of `out_proj` (each channel's gated output), reduced over the
  tokens of each sample and over samples.
* Selection: the top `hidden_size` channels of each conv layer, each layer its own.
* Slicing: the three rows of each kept channel in `in_proj` (and its bias), the channel of `conv` (weight `[C, 1, k]`
  and bias), the column of `out_proj`. Hidden pruning slices the columns of `in_proj` and the rows of `out_proj`.
"""

import torch

from . import hidden_channels
from .fields import ConfigField
from .slicing import slice_linear, slice_parameter, topk_sorted
from .statistics import PER_SAMPLE, add_per_sample, reduce_per_sample, static_scores


KEY = "conv_channels"
SCORE_KEYS = (KEY,)
CONFIG_FIELDS: tuple[ConfigField, ...] = ()  # its target, the hidden size, is declared by hidden_channels
FIELDS = hidden_channels.FIELDS
BLOCK = "short_conv"
AXES = ()  # searched as the hidden size (`hidden_channels.AXES`)
CARD_ROWS = {}
SUMMARY = ()
RECORD = ("conv_channels",)
_WIDTH = FIELDS[0]


def present(spec) -> bool:
    return spec.short_conv is not None


def shape(model_config, spec) -> dict:
    return {}  # its width is the hidden size


def check_applies(config, model_config, shape: dict, spec) -> None:
    """Every model has a hidden size."""


def check_target(config, model_config=None, shape: dict | None = None) -> None:
    """Any hidden size up to the source's (checked by `PrunedConfig.validate_for` for every target)."""


def hooks(collector, index: int, layer) -> list:
    store = collector.store(KEY, index)

    def channels_hook(module, args):
        add_per_sample(store, args[0], collector.sample_mask, collector.how)

    return [getattr(layer, collector.spec.short_conv).out_proj.register_forward_pre_hook(channels_hook)]


def sites(spec) -> list[tuple[int, str, int, str]]:
    return [(1, KEY, 0, f"input of {spec.short_conv}.out_proj")]


def score_shapes(shape: dict) -> dict[str, tuple]:
    """`{score key: per-layer dims}` that every statistic of the key starts with."""
    return {KEY: (shape[_WIDTH],)}


def collect(collector, shape: dict, device) -> dict[str, dict]:
    """`{score key: statistics}` of the importance pass, summed over processes."""
    return {KEY: collector.stacked(KEY, shape[_WIDTH], 1, PER_SAMPLE, device)}


def random_scores(key: str, shape: dict, draw) -> dict:
    """The random baseline's scores (`draw(*dims)` draws `[num_layers, *dims]`)."""
    return {"score": draw(shape[_WIDTH])}


def magnitude_scores(model, layers, spec, shape: dict) -> dict[str, dict]:
    """`{score key: {"score": ...}}` of the weight-magnitude baseline."""
    return {KEY: static_scores([magnitude(layer, spec, shape) for layer in layers])}


def scores(importance, batch_aggregation: str) -> torch.Tensor:
    """`[num_layers, hidden_size]` short-conv channel importance."""
    return reduce_per_sample(importance.conv_channels, batch_aggregation, importance.num_samples)


def magnitude(layer, spec, shape) -> torch.Tensor:
    """`[channels]`: L2 norm of each channel's three `in_proj` rows, its `conv` filter and its `out_proj` column."""
    if not spec.has(layer, BLOCK):  # an attention layer: a zero row, never used
        return torch.zeros(shape[_WIDTH])
    operator = getattr(layer, spec.short_conv)
    width = shape[_WIDTH]
    ins = operator.in_proj.weight.float().pow(2).sum(1).view(3, width).sum(0)
    conv = operator.conv.weight.float().pow(2).flatten(1).sum(1)
    return (ins + conv + operator.out_proj.weight.float().pow(2).sum(0)).sqrt()


def hidden_weights(layer, spec) -> tuple[list, list]:
    operator = getattr(layer, spec.short_conv)
    return [operator.in_proj.weight], [operator.out_proj.weight]


def slice_hidden(layer, spec, kept: torch.Tensor) -> None:
    operator = getattr(layer, spec.short_conv)
    slice_linear(operator.in_proj, in_index=kept)
    slice_linear(operator.out_proj, out_index=kept)


def slice_channels(operator, width: int, kept: torch.Tensor) -> None:
    """Keeps the channels `kept` of an operator `width` channels wide (the hidden-facing sides stay)."""
    slice_linear(operator.in_proj, out_index=torch.cat([kept, kept + width, kept + 2 * width]))
    for name in ("weight", "bias"):
        if getattr(operator.conv, name) is not None:
            slice_parameter(operator.conv, name, kept, dim=0)
    # F.conv1d reads `groups` (depthwise: one group per channel).
    operator.conv.in_channels = operator.conv.out_channels = operator.conv.groups = kept.numel()
    slice_linear(operator.out_proj, in_index=kept)


def prune(model, layers, spec, importance, source: dict, target: dict, kept_layers, record, config) -> None:
    if target[_WIDTH] >= source[_WIDTH]:
        return
    channel_scores = scores(importance, config.batch_aggregation)
    for new_idx, src_idx in enumerate(kept_layers):
        if not spec.has(layers[new_idx], BLOCK):
            continue
        kept = topk_sorted(channel_scores[src_idx], target[_WIDTH])
        slice_channels(getattr(layers[new_idx], spec.short_conv), source[_WIDTH], kept)
        record.conv_channels[new_idx] = kept.tolist()


def update_config(model_config, spec, source: dict, target: dict) -> None:
    """Nothing to write: `hidden_channels` writes the hidden size the channels follow."""


def sync_modules(model, model_config, spec) -> None:
    """Nothing cached: `slice_channels` sets the convolution's sizes."""


def count_roles(spec, layer) -> dict[str, tuple]:
    """`h` the channels (the hidden size), `3h` the `[B, C, x]` rows of `in_proj`."""
    path = spec.short_conv
    kernel = getattr(layer, path).conv.weight.shape[-1]
    return {
        f"{path}.in_proj": ("3h", "h"),
        f"{path}.conv.weight": ("h", 1, kernel),
        f"{path}.conv": ("h",),
        f"{path}.out_proj": ("h", "h"),
    }


def count_sizes(shape: dict) -> dict[str, int]:
    return {"3h": 3 * shape[_WIDTH]}
