"""Mamba2 heads and head channels of hybrid models (Minitron-SSM): scores, group-aware selection, slicing, counting.

Minitron-SSM ("Efficient Hybrid Language Model Compression through Group-Aware SSM Pruning",
https://arxiv.org/abs/2504.11409, §3) prunes a Mamba2 mixer along two nested axes, from ONE statistic:

* Statistic: the input of `out_proj` (the gated, normalised SSM output `y`, `[heads x head_dim]` channels), reduced
  over the tokens of each sample and over samples like MLP neurons (sequence mean |y|, batch L2 by default).
* Head channels (`mamba_head_dim`): the statistic viewed as `[heads, head_dim]`, L2 over heads; the same top channels
  are kept in every head (the config has one head_dim).
* Heads (`mamba_num_heads`), nested: each head scores the L2 of its statistic over the KEPT channels. Group-aware
  (the paper's method, the default): the `n_groups` B/C groups each own `heads / n_groups` consecutive heads, which
  read that group's B and C; heads are ranked within each group and every group keeps the same number, so each kept
  head still reads its own group's B/C and the shared B/C projections stay as they are. Group-blind
  (`mamba_group_aware=False`, the paper's naive baseline): the top heads overall, in index order. Stock transformers
  needs the same number of heads per group, so the pruned mixer assigns the kept heads to groups by position: a head
  kept from a group that lost more heads than another ends up reading another group's B/C. That misassignment is
  what naive pruning does, and what the benchmark measures.

Every per-head tensor follows the kept heads and channels: the z, x and dt rows of `in_proj` (rows `[z (H*P), x (H*P),
B (G*N), C (G*N), dt (H)]`), the x channels of the depthwise `conv1d` (channels `[x, B, C]`: weight `[C, 1, k]` and
bias), `A_log`, `D`, `dt_bias`, the gated norm's weight (its `group_size = H*P / G` follows) and the `out_proj`
columns (and Falcon-H1's muP `mup_vector` over the rows of `in_proj`). B and C are never pruned. The module names
are those every transformers Mamba2 mixer uses; the config fields are each family's (its spec's `mamba_*_field`).
"""

import torch

from .fields import ConfigField, refuse_absent_target, target_names
from .search_axis import SearchAxis
from .slicing import slice_linear, slice_norm, slice_parameter, topk_sorted
from .statistics import PER_SAMPLE, add_per_sample, reduce_per_sample, static_scores


KEY = "mamba"
SCORE_KEYS = (KEY,)
CONFIG_FIELDS = (
    ConfigField(
        "mamba_num_heads",
        doc="""Hybrids: target number of Mamba2 heads per Mamba layer, a multiple of the B/C groups (`n_groups`): every
group keeps the same number of its own heads (Minitron-SSM, https://arxiv.org/abs/2504.11409).""",
        help="Hybrids: target Mamba2 heads per Mamba layer (a multiple of n_groups).",
    ),
    ConfigField(
        "mamba_head_dim",
        doc="Hybrids: target channels per Mamba2 head (the same channels kept in every head).",
        help="Hybrids: target channels per Mamba2 head.",
    ),
    ConfigField(
        "mamba_group_aware",
        doc="""Rank Mamba heads within each B/C group (the paper's method). `False` is the paper's group-blind baseline:
the top heads overall, reassigned to groups by position (see `structures/mamba_heads.py`).""",
        help="Rank Mamba heads within each B/C group (Minitron-SSM); false: the group-blind baseline.",
        type=bool,
        default=True,
        target=False,
    ),
)
FIELDS = target_names(CONFIG_FIELDS)
BLOCK = "mamba"
AXES = (
    # Every B/C group of a mixer keeps as many heads: head counts are multiples of n_groups.
    SearchAxis(
        "mamba_num_heads",
        "mambaheads",
        "Mamba heads",
        floor="n_groups",
        step="n_groups",
        step_reason="every B/C group keeps the same number of heads",
        cap=True,
    ),
    SearchAxis("mamba_head_dim", "mambadim", "Mamba head dim", multiple_default=8, cap=True),
)
CARD_ROWS = {"mamba_num_heads": "Mamba heads", "mamba_head_dim": "Mamba head dimension"}
SUMMARY = FIELDS
RECORD = ("mamba_heads", "mamba_head_channels")


def present(spec) -> bool:
    return spec.mamba is not None


# ---------------------------------------------------------------------------------------------- targets
def shape(model_config, spec) -> dict:
    """Heads and head dim (prunable), and the B/C groups and state size (kept) that the projections' sizes depend on,
    read from the family's own fields (its spec's `mamba_*_field`); `{}` for a family without Mamba blocks."""
    if spec is None or spec.mamba is None:
        return {}
    return {
        "mamba_num_heads": getattr(model_config, spec.mamba_num_heads_field),
        "mamba_head_dim": getattr(model_config, spec.mamba_head_dim_field),
        "n_groups": getattr(model_config, spec.mamba_groups_field),
        "ssm_state_size": getattr(model_config, spec.mamba_state_field),
    }


def check_applies(config, model_config, shape: dict, spec) -> None:
    """Refuses Mamba targets for a model without Mamba layers."""
    for name in FIELDS:
        refuse_absent_target(config, name, model_config, shape, "Mamba layers", "mamba")


def check_target(config, model_config=None, shape: dict | None = None) -> None:
    """Refuses a head count that is not a multiple of the B/C groups (stock transformers gives every group
    `heads // n_groups` heads)."""
    heads = config.mamba_num_heads
    if shape is None or heads is None:
        return
    groups = shape["n_groups"]
    if heads % groups:
        lower = max(groups, heads - heads % groups)
        raise ValueError(
            f"PrunedConfig.mamba_num_heads={heads} is not a multiple of the model's n_groups={groups}: every B/C group "
            f"keeps the same number of heads. Use a multiple of {groups}, e.g. {lower}"
            + (f" or {lower + groups}." if lower + groups <= shape["mamba_num_heads"] else ".")
        )


# ---------------------------------------------------------------------------------------------- scores
def hooks(collector, index: int, layer) -> list:
    store = collector.store(KEY, index)

    def channels_hook(module, args):
        add_per_sample(store, args[0], collector.sample_mask, collector.how)

    return [getattr(layer, collector.spec.mamba).out_proj.register_forward_pre_hook(channels_hook)]


def sites(spec) -> list[tuple[int, str, int, str]]:
    return [(1, KEY, 0, f"input of {spec.mamba}.out_proj")]


def score_shapes(shape: dict) -> dict[str, tuple]:
    """`{score key: per-layer dims}` that every statistic of the key starts with: the channels of every head."""
    return {KEY: (shape["mamba_num_heads"] * shape["mamba_head_dim"],)}


def collect(collector, shape: dict, device) -> dict[str, dict]:
    """`{score key: statistics}` of the importance pass, summed over processes."""
    return {KEY: collector.stacked(KEY, *score_shapes(shape)[KEY], 1, PER_SAMPLE, device)}


def random_scores(key: str, shape: dict, draw) -> dict:
    """The random baseline's scores (`draw(*dims)` draws `[num_layers, *dims]`)."""
    return {"score": draw(*score_shapes(shape)[KEY])}


def magnitude_scores(model, layers, spec, shape: dict) -> dict[str, dict]:
    """`{score key: {"score": ...}}` of the weight-magnitude baseline."""
    return {KEY: static_scores([magnitude(layer, spec, shape) for layer in layers])}


def scores(importance, batch_aggregation: str) -> torch.Tensor:
    """`[num_layers, mamba_num_heads * mamba_head_dim]` channel statistic (zero rows for layers without Mamba)."""
    return reduce_per_sample(importance.mamba, batch_aggregation, importance.num_samples)


def head_dim_scores(channel_scores: torch.Tensor, heads: int) -> torch.Tensor:
    """`[..., heads * head_dim]` -> `[..., head_dim]`: each head channel's L2 over the heads."""
    return channel_scores.view(*channel_scores.shape[:-1], heads, -1).norm(dim=-2)


def head_scores(channel_scores: torch.Tensor, heads: int, kept_channels: torch.Tensor | None = None) -> torch.Tensor:
    """`[..., heads * head_dim]` -> `[..., heads]`: each head's L2 over its (kept) channels."""
    per_head = channel_scores.view(*channel_scores.shape[:-1], heads, -1)
    if kept_channels is not None:
        per_head = per_head[..., kept_channels]
    return per_head.norm(dim=-1)


def magnitude(layer, spec, shape) -> torch.Tensor:
    """`[heads * head_dim]`: L2 norm of each channel's z and x rows of `in_proj`, its conv filter and `out_proj`
    column."""
    inner = shape["mamba_num_heads"] * shape["mamba_head_dim"]
    if not spec.has(layer, BLOCK):  # a layer without a Mamba mixer: a zero row, never used
        return torch.zeros(inner)
    mixer = getattr(layer, spec.mamba)
    rows = mixer.in_proj.weight.float().pow(2).sum(dim=1)
    conv = mixer.conv1d.weight.float().pow(2).flatten(1).sum(dim=1)
    out = mixer.out_proj.weight.float().pow(2).sum(dim=0)
    return (rows[:inner] + rows[inner : 2 * inner] + conv[:inner] + out).sqrt()


def hidden_weights(layer, spec) -> tuple[list, list]:
    mixer = getattr(layer, spec.mamba)
    return [mixer.in_proj.weight], [mixer.out_proj.weight]


def slice_hidden(layer, spec, kept: torch.Tensor) -> None:
    """Keeps the hidden channels `kept`: input columns of `in_proj`, output rows of `out_proj`."""
    mixer = getattr(layer, spec.mamba)
    slice_linear(mixer.in_proj, in_index=kept)
    slice_linear(mixer.out_proj, out_index=kept)


# ---------------------------------------------------------------------------------------------- selection
def select(
    channel_scores: torch.Tensor,
    heads: int,
    groups: int,
    target_heads: int,
    target_head_dim: int,
    group_aware: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(kept heads, kept head channels)` of one mixer from its `[heads * head_dim]` statistic (module docstring)."""
    kept_channels = topk_sorted(head_dim_scores(channel_scores, heads), target_head_dim)
    per_head = head_scores(channel_scores, heads, kept_channels)
    if not group_aware:
        return topk_sorted(per_head, target_heads), kept_channels
    per_group, keep = heads // groups, target_heads // groups
    kept = [topk_sorted(per_head[g * per_group : (g + 1) * per_group], keep) + g * per_group for g in range(groups)]
    return torch.cat(kept), kept_channels


# ---------------------------------------------------------------------------------------------- slicing
def slice_mamba(mixer, spec, shape: dict, kept_heads: torch.Tensor, kept_channels: torch.Tensor) -> None:
    head_dim = shape["mamba_head_dim"]
    inner = shape["mamba_num_heads"] * head_dim
    bc = 2 * shape["n_groups"] * shape["ssm_state_size"]
    kept = (kept_heads[:, None] * head_dim + kept_channels[None, :]).reshape(-1)
    b_c = torch.arange(bc)
    rows = torch.cat([kept, kept + inner, b_c + 2 * inner, kept_heads + 2 * inner + bc])
    slice_linear(mixer.in_proj, out_index=rows)
    for name in spec.mamba_projection_buffers:
        # Falcon-H1's mup_vector `[1, 1, rows]` scales in_proj's output row by row; a reload rebuilds it from the
        # pruned config, section by section, which equals these rows of the old one.
        buffer = getattr(mixer, name)
        setattr(mixer, name, buffer.index_select(-1, rows.to(buffer.device)))
    conv_channels = torch.cat([kept, b_c + inner])
    for name in ("weight", "bias"):
        if getattr(mixer.conv1d, name) is not None:
            slice_parameter(mixer.conv1d, name, conv_channels, dim=0)
    for name in ("A_log", "D", "dt_bias"):
        slice_parameter(mixer, name, kept_heads, dim=0)
    slice_norm(mixer.norm, kept)
    slice_linear(mixer.out_proj, in_index=kept)


def prune(model, layers, spec, importance, source: dict, target: dict, kept_layers, record, config) -> None:
    if all(target[name] == source[name] for name in FIELDS):
        return
    channel_scores = scores(importance, config.batch_aggregation)
    for new_idx, src_idx in enumerate(kept_layers):
        layer = layers[new_idx]
        if not spec.has(layer, BLOCK):
            continue
        kept_heads, kept_channels = select(
            channel_scores[src_idx],
            source["mamba_num_heads"],
            source["n_groups"],
            target["mamba_num_heads"],
            target["mamba_head_dim"],
            config.mamba_group_aware,
        )
        slice_mamba(getattr(layer, spec.mamba), spec, source, kept_heads, kept_channels)
        record.mamba_heads[new_idx] = kept_heads.tolist()
        record.mamba_head_channels[new_idx] = kept_channels.tolist()


def update_config(model_config, spec, source: dict, target: dict) -> None:
    """Writes the targets to the family's own fields (its spec's `mamba_*_field`), and the mixers' width
    `heads x head_dim` where the config gives it outright (`mamba_inner_field`, Falcon-H1) or as a multiple of the
    hidden size (`mamba_expand_field`, Bamba). `check_target_loads` calls this before any work: a width that the
    config cannot express is refused then."""
    heads, head_dim = target["mamba_num_heads"], target["mamba_head_dim"]
    setattr(model_config, spec.mamba_num_heads_field, heads)
    setattr(model_config, spec.mamba_head_dim_field, head_dim)
    if spec.mamba_inner_field is not None:
        # Written even when unpruned: left unset, Falcon-H1 derives it from mamba_expand x a (pruned) hidden size.
        setattr(model_config, spec.mamba_inner_field, heads * head_dim)
    if spec.mamba_expand_field is not None:
        setattr(model_config, spec.mamba_expand_field, _expand(spec, source, target))


def _expand(spec, source: dict, target: dict) -> int:
    """The integer `mamba_expand = heads x head_dim / hidden_size` of the pruned shape, or a `ValueError` naming the
    nearest shapes that have one (Bamba's config checks `mamba_n_heads x mamba_d_head == mamba_expand x hidden_size`,
    its mixers are built `mamba_expand x hidden_size` wide)."""
    heads, head_dim, hidden = target["mamba_num_heads"], target["mamba_head_dim"], target["hidden_size"]
    if not heads * head_dim % hidden:
        return heads * head_dim // hidden
    groups = source["n_groups"]
    fits = [h for h in range(groups, source["mamba_num_heads"] + 1, groups) if not h * head_dim % hidden]
    divisors = [d for d in range(1, source["hidden_size"] + 1) if not heads * head_dim % d]
    fixes = [f"hidden_size={min(divisors, key=lambda d: (abs(d - hidden), d))}"]
    if fits:
        fixes.insert(0, f"mamba_num_heads={min(fits, key=lambda h: (abs(h - heads), h))}")
    raise ValueError(
        f"The pruned shape would not load with stock transformers: its config builds every Mamba mixer "
        f"{spec.mamba_expand_field} x hidden_size wide, with an integer {spec.mamba_expand_field}, and "
        f"mamba_num_heads x mamba_head_dim = {heads} x {head_dim} = {heads * head_dim} is not a multiple of "
        f"hidden_size={hidden}. Fix PrunedConfig: prune them together so it is, e.g. {' or '.join(fixes)}."
    )


def sync_modules(model, model_config, spec) -> None:
    """The sizes every Mamba2 mixer caches at init (its conv1d's channels and its gated norm's group size too)."""
    from ...architectures import get_decoder_layers

    heads = getattr(model_config, spec.mamba_num_heads_field)
    head_dim = getattr(model_config, spec.mamba_head_dim_field)
    for layer in get_decoder_layers(model):
        if not spec.has(layer, BLOCK):
            continue
        mixer = getattr(layer, spec.mamba)
        mixer.num_heads, mixer.head_dim, mixer.intermediate_size = heads, head_dim, heads * head_dim
        mixer.conv_dim = mixer.intermediate_size + 2 * mixer.n_groups * mixer.ssm_state_size
        if hasattr(mixer.norm, "group_size"):  # Falcon-H1's norm splits by n_groups at each call (or is an Identity)
            mixer.norm.group_size = mixer.intermediate_size // mixer.n_groups
        mixer.conv1d.in_channels = mixer.conv1d.out_channels = mixer.conv1d.groups = mixer.conv_dim


# ---------------------------------------------------------------------------------------------- counting
def count_roles(spec, layer) -> dict[str, tuple]:
    """`mh` heads, `mi` heads x head_dim, `mconv` conv channels `[x, B, C]`, `mproj` in_proj rows `[z, x, B, C, dt]`,
    `h` the hidden size."""
    path = spec.mamba
    kernel = getattr(layer, path).conv1d.weight.shape[-1]
    roles = {
        f"{path}.in_proj": ("mproj", "h"),
        f"{path}.conv1d.weight": ("mconv", 1, kernel),
        f"{path}.conv1d": ("mconv",),
        f"{path}.norm": ("mi",),
        f"{path}.out_proj": ("h", "mi"),
    }
    for name in ("A_log", "D", "dt_bias"):
        roles[f"{path}.{name}"] = ("mh",)
    return roles


def count_sizes(shape: dict) -> dict[str, int]:
    heads = shape["mamba_num_heads"]
    inner = heads * shape["mamba_head_dim"]
    bc = 2 * shape["n_groups"] * shape["ssm_state_size"]
    return {"mh": heads, "mi": inner, "mconv": inner + bc, "mproj": 2 * inner + bc + heads}
