"""`structures/mamba_heads.py`: Mamba2 heads and head channels of the hybrids (Nemotron-H, Bamba, Falcon-H1): the
`out_proj`-input statistic, channel and head scores, group-aware and group-blind selection, slicing of every per-head
tensor (`in_proj` rows, `conv1d` channels, `A_log` / `D` / `dt_bias`, the gated norm, `out_proj`, Falcon-H1's
`mup_vector`), each family's config fields, the sizes a mixer caches, and the parameter-count terms, each called
directly on tiny hybrids."""

import copy

import pytest
import torch
from conftest import HYBRID_PATTERN, _static_scores, logits, n_params, tiny_model
from structure_helpers import collect, prune_steps

from hf_minitron import PrunedConfig, count_parameters
from hf_minitron.architectures import ARCHITECTURES, get_architecture, get_decoder_layers, model_shape
from hf_minitron.pruning.structures import mamba_heads


def _collect(model, batch):
    return collect(model, mamba_heads, batch)


# The tiny hybrids: 8 Mamba heads in 2 B/C groups, state 8 (Bamba and Falcon-H1 as in test_hybrid_families.py).
HYBRIDS = {
    "nemotron_h": {},
    "bamba": dict(
        num_hidden_layers=3,
        attn_layer_indices=[1],
        mamba_n_heads=8,
        mamba_d_head=8,
        mamba_n_groups=2,
        mamba_d_state=8,
        mamba_chunk_size=8,
    ),
    "falcon_h1": dict(
        num_hidden_layers=2,
        mamba_n_heads=8,
        mamba_d_head=4,
        mamba_d_ssm=32,
        mamba_n_groups=2,
        mamba_d_state=8,
        mamba_chunk_size=8,
        mamba_rms_norm=True,
        ssm_multipliers=[0.5, 1.5, 0.8, 1.2, 0.7],
    ),
    "granitemoehybrid": {},  # Bamba's mixers, mamba_expand x hidden wide (HYBRID_OVERRIDES)
}
HEADS, GROUPS, STATE = 8, 2, 8
EXPANDED = ("bamba", "granitemoehybrid")  # mixers mamba_expand x hidden_size wide (8 x 8 = 2 x 32)
MAMBA_LAYERS = [i for i, kind in enumerate(HYBRID_PATTERN) if kind == "linear_attention"]  # Nemotron-H's


def _model(model_type: str = "nemotron_h"):
    return tiny_model(model_type, **HYBRIDS[model_type])


def _mixers(model) -> dict:
    spec = get_architecture(model.config)
    layers = get_decoder_layers(model)
    return {i: getattr(layer, spec.mamba) for i, layer in enumerate(layers) if spec.has(layer, mamba_heads.BLOCK)}


def _head_dim(model) -> int:
    return model_shape(model.config)["mamba_head_dim"]


def _importance(model, mamba: dict):
    scores = _static_scores(model)
    scores.mamba = mamba
    return scores


def _random_scores(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    channels = torch.rand(model.config.num_hidden_layers, HEADS * _head_dim(model), generator=g, dtype=torch.float64)
    return channels, _importance(model, {"score": channels})


def _prune(model, scores, **targets):
    return prune_steps(model, scores, (mamba_heads,), None, None, **targets)


# ---------------------------------------------------------------------------------------------- which families
def test_present_exactly_for_the_hybrids():
    assert {name for name, spec in ARCHITECTURES.items() if mamba_heads.present(spec)} == set(HYBRIDS)


# ---------------------------------------------------------------------------------------------- scores
def test_channel_and_head_scores_are_l2_norms_of_the_statistic_viewed_as_heads_by_channels():
    channels = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 5.0]], dtype=torch.float64).reshape(-1)  # 2 heads of 3
    torch.testing.assert_close(mamba_heads.head_dim_scores(channels, 2), torch.tensor([3.0, 4.0, 5.0]).double())
    torch.testing.assert_close(mamba_heads.head_scores(channels, 2), torch.tensor([5.0, 5.0]).double())
    kept = torch.tensor([0, 1])  # a head scores over the KEPT channels only
    torch.testing.assert_close(mamba_heads.head_scores(channels, 2, kept), torch.tensor([5.0, 0.0]).double())
    batched = torch.stack([channels, 2 * channels])  # per layer
    assert mamba_heads.head_scores(batched, 2).tolist() == [[5.0, 5.0], [10.0, 10.0]]


def test_group_aware_selection_keeps_as_many_heads_in_every_group_and_group_blind_the_best_overall():
    per_head = torch.tensor([9.0, 8.0, 7.0, 6.0, 1.0, 2.0, 3.0, 4.0])  # group 0 = heads 0-3, group 1 = heads 4-7
    channels = (per_head[:, None] * torch.tensor([1.0, 0.5])).reshape(-1)  # 2 channels per head, channel 0 better
    heads, kept_channels = mamba_heads.select(channels, 8, 2, target_heads=4, target_head_dim=1)
    assert heads.tolist() == [0, 1, 6, 7] and kept_channels.tolist() == [0]
    heads, _ = mamba_heads.select(channels, 8, 2, target_heads=4, target_head_dim=1, group_aware=False)
    assert heads.tolist() == [0, 1, 2, 3]
    heads, kept_channels = mamba_heads.select(channels, 8, 2, target_heads=8, target_head_dim=2)
    assert heads.tolist() == list(range(8)) and kept_channels.tolist() == [0, 1]


def test_a_head_with_a_zero_gate_scores_zero_and_is_removed_from_its_group():
    model = _model()
    dead = 5  # in group 1 (heads 4-7)
    with torch.no_grad():
        for mixer in _mixers(model).values():
            mixer.in_proj.weight[dead * 4 : (dead + 1) * 4] = 0  # z rows: y x silu(0) = 0 for every token
    collector = _collect(model, [{"input_ids": torch.arange(3, 13)}, {"input_ids": torch.arange(20, 27)}])
    stats = collector.stacked(mamba_heads.KEY, HEADS * 4, 1, ("sum", "sumsq"), "cpu")
    importance = _importance(model, stats)
    importance.num_samples = 2
    channel_scores = mamba_heads.scores(importance, "l2")
    assert sorted({key[1] for key in collector.stats}) == MAMBA_LAYERS  # the other layers' rows stay zero
    assert not channel_scores[[1, 2, 4]].any()
    per_head = mamba_heads.head_scores(channel_scores[MAMBA_LAYERS], HEADS)
    assert (per_head[:, dead] == 0).all() and (per_head.sum(1) > 0).all()
    record = _prune(model, importance, mamba_num_heads=6)
    for i in MAMBA_LAYERS:
        assert dead not in record.mamba_heads[i]
        assert sum(h < 4 for h in record.mamba_heads[i]) == sum(h >= 4 for h in record.mamba_heads[i]) == 3


@pytest.mark.parametrize("model_type", list(HYBRIDS))
def test_magnitude_is_the_norm_of_each_channels_z_and_x_rows_conv_filter_and_out_proj_column(model_type):
    model = _model(model_type)
    spec, shape = get_architecture(model.config), model_shape(model.config)
    index, mixer = next(iter(_mixers(model).items()))
    inner = HEADS * _head_dim(model)
    rows = mixer.in_proj.weight.pow(2).sum(1)
    expected = (
        rows[:inner] + rows[inner : 2 * inner] + mixer.conv1d.weight[:inner].pow(2).sum((1, 2))
    ) + mixer.out_proj.weight.pow(2).sum(0)
    magnitude = mamba_heads.magnitude(get_decoder_layers(model)[index], spec, shape)
    torch.testing.assert_close(magnitude, expected.sqrt().detach())
    others = [layer for layer in get_decoder_layers(model) if not spec.has(layer, mamba_heads.BLOCK)]
    for layer in others:  # a layer without a Mamba mixer: zeros
        assert torch.equal(mamba_heads.magnitude(layer, spec, shape), torch.zeros(inner))


# ---------------------------------------------------------------------------------------------- slicing
@pytest.mark.parametrize("model_type", list(HYBRIDS))
def test_prune_keeps_exactly_the_rows_channels_and_per_head_values_of_the_selection(model_type):
    model = _model(model_type)
    original = copy.deepcopy(model)
    spec = get_architecture(model.config)
    head_dim = _head_dim(model)
    inner, bc = HEADS * head_dim, 2 * GROUPS * STATE
    channels, scores = _random_scores(model)
    # Bamba's mixers stay a multiple of the hidden size wide (8 x 4 = 32): its heads are all kept, its channels halved.
    target_heads = HEADS if model_type in EXPANDED else 4
    record = _prune(model, scores, mamba_num_heads=target_heads, mamba_head_dim=head_dim // 2)
    source_mixers = _mixers(original)
    assert sorted(record.mamba_heads) == sorted(source_mixers)
    for i, dst in _mixers(model).items():
        src = source_mixers[i]
        heads, kept_channels = mamba_heads.select(channels[i], HEADS, GROUPS, target_heads, head_dim // 2)
        assert record.mamba_heads[i] == heads.tolist()
        assert record.mamba_head_channels[i] == kept_channels.tolist()
        kept = (heads[:, None] * head_dim + kept_channels[None, :]).reshape(-1)
        rows = torch.cat([kept, inner + kept, 2 * inner + torch.arange(bc), 2 * inner + bc + heads])
        assert torch.equal(dst.in_proj.weight, src.in_proj.weight[rows])
        conv = torch.cat([kept, inner + torch.arange(bc)])  # [x, B, C]: B and C are never pruned
        assert torch.equal(dst.conv1d.weight, src.conv1d.weight[conv])
        assert torch.equal(dst.conv1d.bias, src.conv1d.bias[conv])
        for name in ("A_log", "D", "dt_bias"):
            assert torch.equal(getattr(dst, name), getattr(src, name)[heads])
        assert torch.equal(dst.norm.weight, src.norm.weight[kept])
        assert torch.equal(dst.out_proj.weight, src.out_proj.weight[:, kept])
        for name in spec.mamba_projection_buffers:  # Falcon-H1's mup_vector follows in_proj's rows
            assert torch.equal(getattr(dst, name), getattr(src, name)[..., rows])
    assert torch.isfinite(logits(model)).all()


@pytest.mark.parametrize("model_type", list(HYBRIDS))
def test_slicing_every_head_and_channel_keeps_the_logits_exactly(model_type):
    model = _model(model_type)
    spec, shape = get_architecture(model.config), model_shape(model.config)
    before = logits(model)
    with torch.no_grad():
        for mixer in _mixers(model).values():
            mamba_heads.slice_mamba(mixer, spec, shape, torch.arange(HEADS), torch.arange(_head_dim(model)))
    assert torch.equal(logits(model), before)


def test_nothing_to_prune_leaves_the_model_untouched():
    model = _model()
    weights = dict(model.named_parameters())
    record = _prune(model, _random_scores(model)[1])
    assert record.mamba_heads == {} and all(p is weights[n] for n, p in model.named_parameters())


# ---------------------------------------------------------------------------------------------- config, sizes, counts
def test_update_config_writes_each_familys_own_fields():
    source = {"mamba_num_heads": 8, "n_groups": 2, "hidden_size": 32}
    nemotron_h = copy.deepcopy(_model("nemotron_h").config)
    target = {"mamba_num_heads": 4, "mamba_head_dim": 2, "hidden_size": 32}
    mamba_heads.update_config(nemotron_h, get_architecture(nemotron_h), source, target)
    assert (nemotron_h.mamba_num_heads, nemotron_h.mamba_head_dim) == (4, 2)
    falcon = copy.deepcopy(_model("falcon_h1").config)
    mamba_heads.update_config(falcon, get_architecture(falcon), source, target)
    assert (falcon.mamba_n_heads, falcon.mamba_d_head, falcon.mamba_d_ssm) == (4, 2, 8)
    bamba = copy.deepcopy(_model("bamba").config)  # mixers are mamba_expand x hidden_size wide
    mamba_heads.update_config(bamba, get_architecture(bamba), source, {**target, "mamba_head_dim": 8})
    assert (bamba.mamba_n_heads, bamba.mamba_d_head, bamba.mamba_expand) == (4, 8, 1)
    with pytest.raises(ValueError, match=r"mamba_expand x hidden_size.*4 x 4 = 16.*hidden_size=32.*mamba_num_heads=8"):
        mamba_heads.update_config(bamba, get_architecture(bamba), source, {**target, "mamba_head_dim": 4})


@pytest.mark.parametrize("model_type", list(HYBRIDS))
def test_pruned_mixers_cache_their_sizes_and_match_the_count_terms(model_type):
    model = _model(model_type)
    source_config = copy.deepcopy(model.config)
    spec = get_architecture(model.config)
    head_dim = _head_dim(model) // 2 if model_type not in EXPANDED else _head_dim(model)  # 4 x 8 = 1 x hidden
    targets = dict(mamba_num_heads=4, mamba_head_dim=head_dim)
    _prune(model, _random_scores(model)[1], **targets)
    inner = 4 * head_dim
    for mixer in _mixers(model).values():
        assert (mixer.num_heads, mixer.head_dim, mixer.intermediate_size) == (4, head_dim, inner)
        assert mixer.conv_dim == mixer.conv1d.in_channels == mixer.conv1d.groups == inner + 2 * GROUPS * STATE
        if hasattr(mixer.norm, "group_size"):
            assert mixer.norm.group_size == inner // GROUPS
    out = logits(model)
    assert out.shape == (2, 10, 96) and torch.isfinite(out).all()

    sizes = mamba_heads.count_sizes(model_shape(model.config)) | {"h": 32}
    bc = 2 * GROUPS * STATE
    assert sizes == {"mh": 4, "mi": inner, "mconv": inner + bc, "mproj": 2 * inner + bc + 4, "h": 32}
    for index in _mixers(model):
        layer = get_decoder_layers(model)[index]
        roles = mamba_heads.count_roles(spec, layer)
        described = 0
        for name, param in layer.get_submodule(spec.mamba).named_parameters():
            # A parameter's own path names its dims; a module's path those of its weight (a bias: the first axis).
            full, module = f"{spec.mamba}.{name}", f"{spec.mamba}.{name.rpartition('.')[0]}"
            dims = roles.get(full) or roles[module if "." in name else full]
            dims = dims[:1] if name.endswith("bias") or len(dims) == 1 else dims
            assert tuple(param.shape) == tuple(sizes[d] if isinstance(d, str) else d for d in dims), name
            described += 1
        assert described == 8  # in_proj, conv1d weight and bias, A_log, D, dt_bias, norm, out_proj
    counted = count_parameters(source_config, PrunedConfig(**targets))
    assert counted == n_params(model) < count_parameters(source_config)
