"""The Mamba2 hybrids of transformers besides Nemotron-H (issue 13 §1): Bamba and Falcon-H1.

Bamba's layers hold a Mamba2 mixer or attention (`attn_layer_indices`) and a gated MLP in every layer; its mixers are
`mamba_expand x hidden_size` wide. Falcon-H1 runs attention and a Mamba2 mixer side by side in every layer, with muP
multipliers and a `mup_vector` over the rows of `in_proj`. Both name their Mamba fields `mamba_n_heads`,
`mamba_d_head`, `mamba_n_groups`, `mamba_d_state`.
"""

import copy

import pytest
import torch
from conftest import random_samples, tiny_model
from transformers import AutoModelForCausalLM

from hf_minitron import PrunedConfig, count_parameters, estimate_importance, prune_model
from hf_minitron.architectures import get_decoder_layers, model_shape


IDS = torch.arange(3, 19)[None]
BAMBA_PATTERN = ["linear_attention", "full_attention", "linear_attention", "linear_attention", "full_attention"]
# 8 Mamba heads in 2 B/C groups. Bamba: heads x head_dim = 64 = mamba_expand (2) x hidden (32). Falcon-H1: its own
# mamba_d_ssm (32), its gated norm on, and muP multipliers away from 1 so that slicing them wrongly shows.
FAMILIES = {
    "bamba": dict(
        num_hidden_layers=len(BAMBA_PATTERN),
        attn_layer_indices=[i for i, kind in enumerate(BAMBA_PATTERN) if kind == "full_attention"],
        mamba_n_heads=8,
        mamba_d_head=8,
        mamba_n_groups=2,
        mamba_d_state=8,
        mamba_chunk_size=8,
    ),
    "falcon_h1": dict(
        num_hidden_layers=4,
        mamba_n_heads=8,
        mamba_d_head=4,
        mamba_d_ssm=32,
        mamba_n_groups=2,
        mamba_d_state=8,
        mamba_chunk_size=8,
        mamba_rms_norm=True,
        ssm_multipliers=[0.5, 1.5, 0.8, 1.2, 0.7],
        mlp_multipliers=[0.9, 1.1],
        attention_in_multiplier=0.9,
        attention_out_multiplier=1.1,
        ssm_in_multiplier=1.2,
        ssm_out_multiplier=0.8,
        key_multiplier=0.7,
        embedding_multiplier=1.3,
        lm_head_multiplier=0.6,
    ),
}
# Each family's own config fields for PrunedConfig's Mamba names.
MAMBA_FIELDS = {"mamba_num_heads": "mamba_n_heads", "mamba_head_dim": "mamba_d_head"}


def _model(family, **overrides):
    return tiny_model(family, **{**FAMILIES[family], **overrides})


def _calibration():
    return dict(calibration_samples=8, calibration_batch_size=4, depth_calibration_samples=4)


def _pattern(model):
    return list(model.config.layers_block_type)


AXES = {
    "bamba": {
        "mamba_heads": {"mamba_num_heads": 4},  # 4 x 8 = 32 = 1 x hidden
        "mamba_head_dim": {"mamba_head_dim": 4},
        "mamba_group_blind": {"mamba_num_heads": 4, "mamba_group_aware": False},
        "hidden": {"hidden_size": 16},  # 64 = 4 x 16
        "mlp": {"intermediate_size": 40},
        "heads": {"num_attention_heads": 2, "num_key_value_heads": 1},
        "depth": {"layers_to_drop": [2, 3]},
        "depth_by_type": {"num_layers_by_type": {"mamba": 2}, "depth_method": "block_influence"},
        "all": {
            "mamba_num_heads": 4,
            "mamba_head_dim": 4,
            "hidden_size": 16,  # 16 = 1 x 16
            "intermediate_size": 40,
            "num_attention_heads": 2,
            "num_hidden_layers": 4,
            "depth_method": "block_influence",
        },
    },
    "falcon_h1": {
        "mamba_heads": {"mamba_num_heads": 4},
        "mamba_head_dim": {"mamba_head_dim": 2},
        "mamba_group_blind": {"mamba_num_heads": 6, "mamba_group_aware": False},
        "hidden": {"hidden_size": 24},  # the mixers keep their own width (mamba_d_ssm)
        "mlp": {"intermediate_size": 40},
        "heads": {"num_attention_heads": 2, "num_key_value_heads": 1},
        "depth": {"num_hidden_layers": 3},  # contiguous, by LM loss: skipped layers stand in as tuples
        "all": {
            "mamba_num_heads": 6,
            "mamba_head_dim": 3,
            "hidden_size": 24,
            "intermediate_size": 40,
            "num_attention_heads": 2,
            "num_hidden_layers": 3,
            "depth_method": "block_influence",
        },
    },
}
CASES = [(family, axis) for family, axes in AXES.items() for axis in axes]


@pytest.mark.parametrize("family,axis", CASES, ids=[f"{family}-{axis}" for family, axis in CASES])
def test_prune_axis_reloads_with_stock_transformers_and_generates(family, axis, tmp_path):
    model = _model(family)
    source = copy.deepcopy(model.config)
    source_pattern = _pattern(model)
    fields = AXES[family][axis]
    config = PrunedConfig(**fields, **_calibration())
    prune_model(model, config, random_samples(8), show_progress=False)
    record = model.pruning_record

    # Exact counts: for Bamba, the layers that depth pruning dropped decide the block types that remain.
    n = sum(p.numel() for p in model.parameters())
    target = {**fields, "num_hidden_layers": None, "num_layers_by_type": None}
    target["layers_to_drop"] = record.dropped_layers or None
    assert n == count_parameters(source, PrunedConfig(**target)) < count_parameters(source)
    assert count_parameters(source) == sum(p.numel() for p in _model(family).parameters())
    fresh = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
    assert sum(p.numel() for p in fresh.parameters()) == n
    # The layer-type pattern of the kept layers (Bamba: attn_layer_indices renumbered).
    assert _pattern(model) == [source_pattern[i] for i in record.kept_layers]
    if family == "bamba":
        assert [layer.block_type for layer in get_decoder_layers(model)] == _pattern(model)
    assert model.config.num_hidden_layers == len(record.kept_layers)
    for name, value in fields.items():
        if name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
            assert getattr(model.config, name) == value
        if name in MAMBA_FIELDS:
            assert getattr(model.config, MAMBA_FIELDS[name]) == value
            assert model_shape(model.config)[name] == value
    # The mixers' width as each config gives it: mamba_expand x hidden (Bamba), mamba_d_ssm (Falcon-H1).
    width = model.config.mamba_n_heads * model.config.mamba_d_head
    if family == "bamba":
        assert model.config.mamba_expand * model.config.hidden_size == width
    else:
        assert model.config.mamba_d_ssm == width

    logits = model(IDS).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(reloaded(IDS).logits, logits, rtol=0, atol=0)
    # The Mamba cache (conv and SSM states) of the pruned mixers and the KV cache: cached generation equals uncached.
    cached = reloaded.generate(IDS, max_new_tokens=4, do_sample=False, use_cache=True)
    uncached = reloaded.generate(IDS, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    if family == "falcon_h1":
        # The mup_vector a reload rebuilds from the pruned config equals the rows slicing kept.
        for ours, theirs in zip(get_decoder_layers(model), get_decoder_layers(reloaded)):
            torch.testing.assert_close(ours.mamba.mup_vector, theirs.mamba.mup_vector, rtol=0, atol=0)

    mamba_layers = [new for new, src in enumerate(record.kept_layers) if source_pattern[src] != "full_attention"]
    if config.mamba_num_heads or config.mamba_head_dim:
        assert sorted(record.mamba_heads) == mamba_layers
        assert all(len(kept) == model.config.mamba_n_heads for kept in record.mamba_heads.values())
        assert all(len(kept) == model.config.mamba_d_head for kept in record.mamba_head_channels.values())
    if config.intermediate_size:
        assert sorted(record.neurons) == list(range(len(record.kept_layers)))  # an MLP in every layer


@pytest.mark.parametrize("family", list(FAMILIES))
def test_identity_pruning_keeps_logits_exactly(family):
    model = _model(family)
    before = model(IDS).logits
    c = model.config
    same = PrunedConfig(
        mamba_num_heads=c.mamba_n_heads,
        mamba_head_dim=c.mamba_d_head,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_attention_heads=c.num_attention_heads,
        **_calibration(),
    )
    prune_model(model, same, random_samples(8), show_progress=False)
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)


def test_falcon_h1_without_the_gated_norm_prunes_mamba_heads(tmp_path):
    """Falcon-H1's default `mamba_rms_norm=False` makes the mixer's norm an `Identity`: nothing to slice there."""
    model = _model("falcon_h1", mamba_rms_norm=False)
    prune_model(model, PrunedConfig(mamba_num_heads=4, mamba_head_dim=2, **_calibration()), random_samples(8))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_statistics_follow_the_blocks_of_each_layer(family):
    """Bamba: Mamba or attention statistics by layer type, MLP and both hidden slots in every layer (its MLP is not
    a block type). Falcon-H1: every block in every layer."""
    model = _model(family)
    scores = estimate_importance(model, random_samples(8), PrunedConfig(**_calibration()), show_progress=False)
    for i, kind in enumerate(_pattern(model)):
        assert bool(scores.mamba["sum"][i].any()) == (kind != "full_attention")
        assert bool(scores.heads["sum"][i].any()) == (kind != "linear_attention")
        assert scores.neurons["sum"][i].any()
        assert scores.hidden["sum"][i, 0].any() and scores.hidden["sum"][i, 1].any()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_magnitude_baseline_prunes_every_axis(family, tmp_path):
    model = _model(family)
    config = PrunedConfig(
        mamba_num_heads=4,
        mamba_head_dim=4 if family == "bamba" else 2,
        hidden_size=16,
        num_hidden_layers=3,
        intermediate_size=40,
        importance="magnitude",
    )
    prune_model(model, config, show_progress=False)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "family,fields,message",
    [
        # Bamba builds its mixers mamba_expand x hidden_size wide, mamba_expand an integer.
        ("bamba", {"mamba_num_heads": 6}, r"6 x 8 = 48 is not a multiple of hidden_size=32.*mamba_num_heads=4 or "),
        ("bamba", {"hidden_size": 24}, r"8 x 8 = 64 is not a multiple of hidden_size=24.*mamba_num_heads=6 or "),
        ("bamba", {"mamba_num_heads": 5}, "not a multiple of the model's n_groups=2"),
        ("bamba", {"layers_to_drop": [1, 4]}, r"removes every attention layer \(\[1, 4\]\)"),
        ("bamba", {"num_layers_by_type": {"attention": 0}}, "removes every attention layer"),
        ("falcon_h1", {"mamba_num_heads": 10}, "larger than the source model's mamba_num_heads=8"),
        ("falcon_h1", {"mamba_head_dim": 5}, "larger than the source model's mamba_head_dim=4"),
        ("falcon_h1", {"num_layers_by_type": {"mamba": 2}}, "does not apply: the layers .* are all alike"),
    ],
)
def test_bad_targets_are_refused_before_any_work(family, fields, message):
    with pytest.raises(ValueError, match=message):
        prune_model(_model(family), PrunedConfig(**fields), calibration_data=None)
