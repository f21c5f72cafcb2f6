"""`structures/deltanet_heads.py`: Gated DeltaNet value heads within their key heads, and whole key heads (Qwen3-Next,
Qwen3.5): the statistic (each value head's output through `out_proj`), the grouped selection, slicing of both projection layouts (Qwen3-Next's fused
per key head, Qwen3.5's separate), `conv1d`, `A_log` / `dt_bias` and `out_proj`, the config fields, the sizes a mixer
caches, the parameter-count terms and the refused targets, each called directly on tiny hybrids."""

import copy

import pytest
import torch
from conftest import DELTANET_PATTERN, _static_scores, logits, n_params, tiny_model
from structure_helpers import collect, prune_steps
from structure_helpers import samples as _samples

from hf_minitron import PrunedConfig, count_parameters
from hf_minitron.architectures import ARCHITECTURES, get_architecture, get_decoder_layers, model_shape
from hf_minitron.pruning.structures import deltanet_heads


FAMILIES = ["qwen3_next", "qwen3_5_text"]  # the two projection layouts
ALL_FAMILIES = [*FAMILIES, "qwen3_5_moe_text"]  # Qwen3.5's layout, with experts (in test_gated_deltanet_families.py)
KEYS, VALUES, DK, DV = 2, 4, 8, 8  # conftest's tiny mixers: 2 key heads, each read by 2 value heads
PER_KEY = VALUES // KEYS
DELTANET_LAYERS = [i for i, kind in enumerate(DELTANET_PATTERN) if kind == "linear_attention"]


def _mixers(model) -> dict:
    spec = get_architecture(model.config)
    layers = get_decoder_layers(model)
    return {i: getattr(layer, spec.deltanet) for i, layer in enumerate(layers) if spec.has(layer, "deltanet")}


def _importance(model, values: dict):
    scores = _static_scores(model)
    setattr(scores, deltanet_heads.KEY, values)
    return scores


def _random_scores(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(model.config.num_hidden_layers, VALUES, generator=g, dtype=torch.float64)
    return values, _importance(model, {"score": values})


def _prune(model, scores, **targets):
    return prune_steps(model, scores, (deltanet_heads,), None, None, **targets)


def _rows(fused: bool, keys, values) -> dict[str, torch.Tensor]:
    """The rows a pruned mixer keeps of each input projection, written out per layout."""

    def span(start, n):
        return torch.arange(start, start + n)

    if not fused:
        q = torch.cat([span(k * DK, DK) for k in keys])
        v = torch.cat([span(j * DV, DV) for j in values])
        return {
            "in_proj_qkv": torch.cat([q, q + KEYS * DK, v + 2 * KEYS * DK]),
            "in_proj_z": v,
            "in_proj_b": torch.tensor(values),
            "in_proj_a": torch.tensor(values),
        }
    block = 2 * DK + 2 * PER_KEY * DV  # per key head: [q, k, v of its value heads, z of its value heads]
    qkvz, ba = [], []
    for k in keys:
        local = [j % PER_KEY for j in values if j // PER_KEY == k]
        qkvz += [span(k * block, 2 * DK)]
        qkvz += [span(k * block + 2 * DK + i * DV, DV) for i in local]
        qkvz += [span(k * block + 2 * DK + PER_KEY * DV + i * DV, DV) for i in local]
        ba += [
            torch.tensor([k * 2 * PER_KEY + i for i in local]),
            torch.tensor([k * 2 * PER_KEY + PER_KEY + i for i in local]),
        ]
    return {"in_proj_qkvz": torch.cat(qkvz), "in_proj_ba": torch.cat(ba)}


def _z_rows(fused: bool, value: int) -> torch.Tensor:
    """The gate (z) rows of one value head: zero, they make its output exactly 0 (silu(0) = 0)."""
    if not fused:
        return torch.arange(value * DV, (value + 1) * DV)
    key, local = divmod(value, PER_KEY)
    start = key * (2 * DK + 2 * PER_KEY * DV) + 2 * DK + PER_KEY * DV + local * DV
    return torch.arange(start, start + DV)


def _z_proj(mixer, fused: bool):
    return mixer.in_proj_qkvz if fused else mixer.in_proj_z


# ---------------------------------------------------------------------------------------------- which families
def test_present_exactly_for_the_gated_deltanet_families():
    assert {name for name, spec in ARCHITECTURES.items() if deltanet_heads.present(spec)} == set(ALL_FAMILIES)
    assert deltanet_heads.shape(tiny_model("llama").config, ARCHITECTURES["llama"]) == {}
    config = tiny_model("qwen3_5_text").config
    assert deltanet_heads.shape(config, get_architecture(config)) == {
        "linear_num_value_heads": VALUES,
        "linear_num_key_heads": KEYS,
        "linear_key_head_dim": DK,
        "linear_value_head_dim": DV,
    }


# ---------------------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("family", FAMILIES)
def test_dead_value_heads_score_zero_are_removed_within_their_key_heads_and_the_logits_stay(family):
    model = tiny_model(family)
    fused = get_architecture(model.config).deltanet_fused
    with torch.no_grad():
        for mixer in _mixers(model).values():
            for dead in (1, 2):  # one in each key head
                _z_proj(mixer, fused).weight[_z_rows(fused, dead)] = 0
    before = logits(model)
    collector = collect(model, deltanet_heads, _samples())
    stats = collector.stacked(deltanet_heads.KEY, VALUES, 1, ("sum", "sumsq"), "cpu")
    assert sorted({key[1] for key in collector.stats}) == DELTANET_LAYERS  # the attention layers' rows stay zero
    importance = _importance(model, stats)
    for agg in ("l2", "mean"):
        value_scores = deltanet_heads.scores(importance, agg)
        assert (value_scores[DELTANET_LAYERS][:, [1, 2]] == 0).all()
        assert (value_scores[DELTANET_LAYERS][:, [0, 3]] > 0).all()
    record = _prune(model, importance, linear_num_value_heads=2)
    assert record.deltanet_value_heads == {i: [0, 3] for i in DELTANET_LAYERS}
    assert record.deltanet_key_heads == {i: [0, 1] for i in DELTANET_LAYERS}
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_dead_key_head_is_removed_whole_and_the_logits_stay(family):
    model = tiny_model(family)
    fused = get_architecture(model.config).deltanet_fused
    with torch.no_grad():
        for mixer in _mixers(model).values():
            for dead in (0, 1):  # both value heads of key head 0
                _z_proj(mixer, fused).weight[_z_rows(fused, dead)] = 0
    before = logits(model)
    stats = collect(model, deltanet_heads, _samples()).stacked(deltanet_heads.KEY, VALUES, 1, ("sum", "sumsq"), "cpu")
    record = _prune(model, _importance(model, stats), linear_num_value_heads=2, linear_num_key_heads=1)
    assert record.deltanet_key_heads == {i: [1] for i in DELTANET_LAYERS}
    assert record.deltanet_value_heads == {i: [2, 3] for i in DELTANET_LAYERS}
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)
    assert (model.config.linear_num_value_heads, model.config.linear_num_key_heads) == (2, 1)


def test_the_statistic_is_each_value_heads_output_through_out_proj():
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(2, 5, VALUES * DV, generator=g), torch.randn(16, VALUES * DV, generator=g)
    expected = torch.stack(
        [(x[..., j * DV : (j + 1) * DV] @ weight[:, j * DV : (j + 1) * DV].T).norm(dim=-1) for j in range(VALUES)], -1
    )
    torch.testing.assert_close(deltanet_heads.head_output_norms(x, weight, DV), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_out_proj_ignores_score_zero_though_their_gated_outputs_do_not(family):
    # The gated norm's output (out_proj's input) of such a head is as large as any other's: a statistic of it alone
    # would keep the head; its output through out_proj is exactly zero.
    model = tiny_model(family)
    with torch.no_grad():
        for mixer in _mixers(model).values():
            for dead in (1, 3):  # one in each key head
                mixer.out_proj.weight[:, dead * DV : (dead + 1) * DV] = 0
    before = logits(model)
    stats = collect(model, deltanet_heads, _samples()).stacked(deltanet_heads.KEY, VALUES, 1, ("sum", "sumsq"), "cpu")
    value_scores = deltanet_heads.scores(_importance(model, stats), "l2")[DELTANET_LAYERS]
    assert (value_scores[:, [1, 3]] == 0).all() and (value_scores[:, [0, 2]] > 0).all()
    record = _prune(model, _importance(model, stats), linear_num_value_heads=2)
    assert record.deltanet_value_heads == {i: [0, 2] for i in DELTANET_LAYERS}
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)


def test_key_scores_are_the_l2_norm_of_their_value_heads():
    values = torch.tensor([[3.0, 4.0, 0.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(deltanet_heads.key_scores(values, 2), torch.tensor([[5.0, 2.0]], dtype=torch.float64))


@pytest.mark.parametrize("family", FAMILIES)
def test_magnitude_is_the_norm_of_each_value_heads_rows_conv_filters_and_out_proj_columns(family):
    model = tiny_model(family)
    spec, shape = get_architecture(model.config), model_shape(model.config)
    index, mixer = next(iter(_mixers(model).items()))
    expected = []
    for j in range(VALUES):
        rows = _rows(spec.deltanet_fused, [j // PER_KEY], [j])
        total = 0.0
        for name, index_rows in rows.items():
            weight = getattr(mixer, name).weight
            own = index_rows[2 * DK :] if name in ("in_proj_qkvz", "in_proj_qkv") else index_rows  # not q/k rows
            total = total + weight[own].pow(2).sum()
        channels = torch.arange(2 * KEYS * DK + j * DV, 2 * KEYS * DK + (j + 1) * DV)
        total = total + mixer.conv1d.weight[channels].pow(2).sum()
        total = total + mixer.out_proj.weight[:, j * DV : (j + 1) * DV].pow(2).sum()
        expected.append(total.sqrt())
    layers = get_decoder_layers(model)
    magnitude = deltanet_heads.magnitude(layers[index], spec, shape)
    torch.testing.assert_close(magnitude, torch.stack(expected).detach())
    assert torch.equal(deltanet_heads.magnitude(layers[1], spec, shape), torch.zeros(VALUES))  # an attention layer


# ---------------------------------------------------------------------------------------------- slicing
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "targets", [dict(linear_num_value_heads=2), dict(linear_num_value_heads=2, linear_num_key_heads=1)]
)
def test_prune_keeps_exactly_the_rows_channels_and_per_head_values_of_the_selection(family, targets):
    model = tiny_model(family)
    original = copy.deepcopy(model)
    spec = get_architecture(model.config)
    value_scores, scores = _random_scores(model)
    record = _prune(model, scores, **targets)
    source = _mixers(original)
    assert sorted(record.deltanet_value_heads) == DELTANET_LAYERS
    keep_keys = targets.get("linear_num_key_heads", KEYS)
    for i, dst in _mixers(model).items():
        src = source[i]
        keys, values = deltanet_heads.select(
            value_scores[i], KEYS, 2, keep_keys, deltanet_heads.key_scores(value_scores[i], KEYS)
        )
        assert record.deltanet_key_heads[i] == keys.tolist() and record.deltanet_value_heads[i] == values.tolist()
        assert len(keys) == keep_keys and all(
            len([j for j in values.tolist() if j // PER_KEY == k]) == 2 // keep_keys for k in keys.tolist()
        )
        for name, rows in _rows(spec.deltanet_fused, keys.tolist(), values.tolist()).items():
            assert torch.equal(getattr(dst, name).weight, getattr(src, name).weight[rows]), name
        q = torch.cat([torch.arange(k * DK, (k + 1) * DK) for k in keys.tolist()])
        v = torch.cat([torch.arange(j * DV, (j + 1) * DV) for j in values.tolist()])
        assert torch.equal(dst.conv1d.weight, src.conv1d.weight[torch.cat([q, q + KEYS * DK, v + 2 * KEYS * DK])])
        for name in ("A_log", "dt_bias"):
            assert torch.equal(getattr(dst, name), getattr(src, name)[values])
        assert torch.equal(dst.norm.weight, src.norm.weight)  # over one value head's channels: kept
        assert torch.equal(dst.out_proj.weight, src.out_proj.weight[:, v])
    assert torch.isfinite(logits(model)).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_slicing_every_head_keeps_the_logits_exactly(family):
    model = tiny_model(family)
    spec, shape = get_architecture(model.config), model_shape(model.config)
    before = logits(model)
    with torch.no_grad():
        for mixer in _mixers(model).values():
            deltanet_heads.slice_deltanet(mixer, spec, shape, torch.arange(KEYS), torch.arange(VALUES))
    assert torch.equal(logits(model), before)


def test_nothing_to_prune_leaves_the_model_untouched():
    model = tiny_model("qwen3_next")
    weights = dict(model.named_parameters())
    record = _prune(model, _random_scores(model)[1], linear_num_value_heads=VALUES, linear_num_key_heads=KEYS)
    assert record.deltanet_value_heads == {} and all(p is weights[n] for n, p in model.named_parameters())


# ---------------------------------------------------------------------------------------------- config, sizes, counts
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_mixers_cache_their_sizes_and_match_the_count_terms(family):
    model = tiny_model(family)
    source_config = copy.deepcopy(model.config)
    spec = get_architecture(model.config)
    targets = dict(linear_num_value_heads=2, linear_num_key_heads=1)
    _prune(model, _random_scores(model)[1], **targets)
    for mixer in _mixers(model).values():
        assert (mixer.num_v_heads, mixer.num_k_heads, mixer.key_dim, mixer.value_dim) == (2, 1, DK, 2 * DV)
        assert mixer.conv_dim == mixer.conv1d.in_channels == mixer.conv1d.groups == 2 * DK + 2 * DV
    out = logits(model)
    assert out.shape == (2, 10, 96) and torch.isfinite(out).all()

    sizes = deltanet_heads.count_sizes(model_shape(model.config)) | {"h": 32}
    assert sizes == {"dnh": 2, "dnv": 16, "dnqkv": 32, "dnqkvz": 48, "dnba": 4, "h": 32}
    for index in _mixers(model):
        layer = get_decoder_layers(model)[index]
        roles = deltanet_heads.count_roles(spec, layer)
        for name, param in layer.get_submodule(spec.deltanet).named_parameters():
            full, module = f"{spec.deltanet}.{name}", f"{spec.deltanet}.{name.rpartition('.')[0]}"
            if name == "norm.weight":  # over one value head's channels, never pruned: no role
                assert full not in roles and module not in roles
                continue
            dims = roles.get(full) or roles[module]
            assert tuple(param.shape) == tuple(sizes[d] if isinstance(d, str) else d for d in dims), name
    counted = count_parameters(source_config, PrunedConfig(**targets))
    assert counted == n_params(model) < count_parameters(source_config)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"linear_num_value_heads": 3}, r"linear_num_value_heads=3 is not a multiple of the 2 key heads.* e\.g\. 2"),
        ({"linear_num_value_heads": 4, "linear_num_key_heads": 1}, r"keeps 4 value heads per key head.*hold 2.*<= 2"),
        ({"linear_num_value_heads": 1}, r"keeps 2 key heads .* and 1 value heads.*linear_num_value_heads >= 2"),
        ({"linear_num_value_heads": 6}, "larger than the source model's linear_num_value_heads=4"),
    ],
)
def test_impossible_targets_are_refused_against_the_model(fields, message):
    model = tiny_model("qwen3_5_text")
    with pytest.raises(ValueError, match=message):
        PrunedConfig(**fields).validate_for(model.config)


def test_a_value_head_count_off_the_key_heads_is_refused_with_the_config_alone():
    with pytest.raises(ValueError, match=r"linear_num_value_heads=5 is not a multiple of linear_num_key_heads=2.* 4"):
        PrunedConfig(linear_num_value_heads=5, linear_num_key_heads=2)


def test_targets_for_a_model_without_gated_deltanet_are_refused():
    with pytest.raises(ValueError, match=r"linear_num_value_heads=2 does not apply.*qwen3_5_text, qwen3_next"):
        PrunedConfig(linear_num_value_heads=2).validate_for(tiny_model("llama").config)
