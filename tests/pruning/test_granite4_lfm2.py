"""Granite 4 (`granitemoehybrid`) and LFM2 (`lfm2`), two hybrids of transformers 5.

Granite 4's layers hold a Mamba2 mixer (Bamba's, `mamba_expand x hidden_size` wide) or attention, then routed experts
and an always-active gated MLP beside the MoE block (`shared_mlp`, its shared expert). LFM2's layers hold a gated
short convolution or attention, then a SwiGLU MLP that `block_auto_adjust_ff_dim` builds wider or narrower than the
config's `intermediate_size`. Their tiny configs are `HYBRID_OVERRIDES` of `tests/conftest.py`.
"""

import copy

import pytest
import torch
from conftest import random_samples, tiny_model
from transformers import AutoModelForCausalLM

from hf_minitron import PrunedConfig, count_parameters, prune_model
from hf_minitron.architectures import get_decoder_layers


IDS = torch.arange(3, 19)[None]
CALIBRATION = dict(calibration_samples=8, calibration_batch_size=4, depth_calibration_samples=4)

AXES = {
    "granitemoehybrid": {
        "experts": {"num_experts": 3, "moe_intermediate_size": 16},
        "shared_mlp": {"shared_expert_intermediate_size": 24},
        "heads": {"num_attention_heads": 2, "num_key_value_heads": 1},
        "mamba": {"mamba_num_heads": 4},  # 4 x 8 = 32 = 1 x hidden: mamba_expand written 1
        "hidden": {"hidden_size": 16, "mamba_num_heads": 4},  # 32 = 2 x 16
        "depth_by_type": {"num_layers_by_type": {"mamba": 2}, "depth_method": "block_influence"},
        "all": {
            "num_experts": 3,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 24,
            "num_attention_heads": 2,
            "hidden_size": 24,
            "mamba_num_heads": 6,  # 6 x 8 = 48 = 2 x 24
            "layers_to_drop": [2],
        },
    },
    "lfm2": {
        "mlp": {"intermediate_size": 40},
        "heads": {"num_attention_heads": 2, "num_key_value_heads": 1},
        "hidden": {"hidden_size": 16},  # the conv operators keep 16 of their own channels
        "depth_by_type": {"num_layers_by_type": {"conv": 1}, "depth_method": "block_influence"},
        "depth": {"layers_to_drop": [0, 4]},
        "all": {
            "intermediate_size": 48,
            "num_attention_heads": 2,
            "hidden_size": 24,
            "num_layers_by_type": {"short_conv": 2},
        },
    },
}
CASES = [(family, axis) for family, axes in AXES.items() for axis in axes]


def _count_target(fields, record) -> PrunedConfig:
    """The target counted from the config alone: the layers depth pruning dropped decide the block types left."""
    target = {**fields, "num_layers_by_type": None, "depth_method": "contiguous"}
    target["layers_to_drop"] = record.dropped_layers or None
    return PrunedConfig(**target)


@pytest.mark.parametrize("family,axis", CASES, ids=[f"{family}-{axis}" for family, axis in CASES])
def test_prune_axis_reloads_with_stock_transformers_and_generates(family, axis, tmp_path):
    model = tiny_model(family)
    source = copy.deepcopy(model.config)
    fields = AXES[family][axis]
    prune_model(model, PrunedConfig(**fields, **CALIBRATION), random_samples(8), show_progress=False)
    record = model.pruning_record

    n = sum(p.numel() for p in model.parameters())
    fresh = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
    assert sum(p.numel() for p in fresh.parameters()) == n < count_parameters(source)
    target = _count_target(fields, record)
    assert count_parameters(source, target) == n == count_parameters(model.config)
    assert count_parameters(source, target, "active") == count_parameters(fresh.config, count="active")
    kept_types = [source.layer_types[i] for i in record.kept_layers]
    assert list(model.config.layer_types) == kept_types
    if family == "granitemoehybrid":
        # The mixers are built mamba_expand x hidden_size wide: the config says so after pruning.
        assert model.config.mamba_expand * model.config.hidden_size == model.config.mamba_n_heads * 8
        assert count_parameters(source, target, "active") < n  # 2 of the routed experts per token
    else:
        conv_layers = [i for i, kind in enumerate(kept_types) if kind == "conv"]
        assert sorted(record.conv_channels) == (conv_layers if "hidden_size" in fields else [])
        assert model.config.full_attn_idxs is None or model.config.full_attn_idxs == [
            i for i, kind in enumerate(kept_types) if kind == "full_attention"
        ]

    logits = model(IDS).logits
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reloaded.eval()
    torch.testing.assert_close(reloaded(IDS).logits, logits, rtol=0, atol=0)
    # The Mamba / conv states and the KV cache of the pruned layers: cached generation equals uncached.
    cached = reloaded.generate(IDS, max_new_tokens=4, do_sample=False, use_cache=True)
    uncached = reloaded.generate(IDS, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


SAME = {
    "granitemoehybrid": lambda c: dict(
        hidden_size=c.hidden_size,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        num_experts=c.num_local_experts,
        moe_intermediate_size=c.intermediate_size,
        shared_expert_intermediate_size=c.shared_intermediate_size,
        mamba_num_heads=c.mamba_n_heads,
        mamba_head_dim=c.mamba_d_head,
    ),
    "lfm2": lambda c: dict(intermediate_size=96, num_attention_heads=c.num_attention_heads, hidden_size=c.hidden_size),
}


@pytest.mark.parametrize("family", list(SAME))
def test_identity_pruning_keeps_logits_exactly(family, tmp_path):
    model = tiny_model(family)
    before = model(IDS).logits
    prune_model(model, PrunedConfig(**SAME[family](model.config), **CALIBRATION), random_samples(8))
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(reloaded(IDS).logits, before, rtol=0, atol=0)


def test_lfm2_saves_the_width_it_built():
    """`intermediate_size=90` with `block_auto_adjust_ff_dim` builds 96 neurons (2/3, x 1.5, rounded up to 8): the
    source's width is 96, and the pruned config says the width outright, with the adjustment off."""
    model = tiny_model("lfm2")
    assert get_decoder_layers(model)[0].feed_forward.w1.out_features == 96
    assert count_parameters(model.config) == sum(p.numel() for p in model.parameters())
    prune_model(model, PrunedConfig(intermediate_size=40, **CALIBRATION), random_samples(8))
    assert (model.config.intermediate_size, model.config.block_auto_adjust_ff_dim) == (40, False)
    fresh = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
    assert get_decoder_layers(fresh)[0].feed_forward.w1.out_features == 40


def _kill_neuron(mlp_rows, down, neuron: int, width: int, fused: bool) -> None:
    with torch.no_grad():
        if fused:  # [gate; up]
            mlp_rows.weight[neuron].zero_()
            mlp_rows.weight[width + neuron].zero_()
        else:
            for rows in mlp_rows:
                rows.weight[neuron].zero_()
        down.weight[:, neuron].zero_()


def test_dead_units_are_the_ones_removed():
    """A neuron zeroed on purpose in every layer (LFM2's MLP, Granite 4's shared MLP) and a KV group of zeroed heads
    (LFM2) are what pruning one of each removes."""
    lfm2 = tiny_model("lfm2")
    for layer in get_decoder_layers(lfm2):
        mlp = layer.feed_forward
        _kill_neuron((mlp.w1, mlp.w3), mlp.w2, 5, 96, fused=False)
        if hasattr(layer, "self_attn"):  # heads 2 and 3 read KV group 1 (head_dim 8): zero values, zero outputs
            layer.self_attn.v_proj.weight[8:16].data.zero_()
    target = PrunedConfig(intermediate_size=95, num_attention_heads=2, num_key_value_heads=1, **CALIBRATION)
    prune_model(lfm2, target, random_samples(8))
    record = lfm2.pruning_record
    assert all(5 not in kept and len(kept) == 95 for kept in record.neurons.values())
    assert sorted(record.neurons) == list(range(5))
    assert record.heads and all(kept == [0, 1] for kept in record.heads.values())

    granite = tiny_model("granitemoehybrid")
    for layer in get_decoder_layers(granite):
        _kill_neuron(layer.shared_mlp.input_linear, layer.shared_mlp.output_linear, 7, 40, fused=True)
    prune_model(granite, PrunedConfig(shared_expert_intermediate_size=39, **CALIBRATION), random_samples(8))
    kept = granite.pruning_record.shared_neurons
    assert sorted(kept) == list(range(5)) and all(7 not in k and len(k) == 39 for k in kept.values())


@pytest.mark.parametrize(
    "family,fields,overrides,message",
    [
        ("lfm2", {"hidden_size": 40}, {}, "larger than the source model's hidden_size=32"),
        ("lfm2", {"num_layers_by_type": {"attention": 0}}, {}, "removes every attention layer"),
        ("lfm2", {"num_layers_by_type": {"mamba": 1}}, {}, "names the block type 'mamba'"),
        ("lfm2", {"num_experts": 2}, {}, "num_experts=2 does not apply"),
        ("lfm2", {"intermediate_size": 100}, {}, "larger than the source model's intermediate_size=96"),
        # Granite 4 builds its mixers mamba_expand x hidden_size wide, mamba_expand an integer.
        ("granitemoehybrid", {"mamba_num_heads": 6}, {}, r"6 x 8 = 48 is not a multiple of hidden_size=32"),
        ("granitemoehybrid", {"hidden_size": 24}, {}, r"8 x 8 = 64 is not a multiple of hidden_size=24"),
        ("granitemoehybrid", {"intermediate_size": 16}, {}, "every feed-forward block .* is a mixture of experts"),
        ("granitemoehybrid", {"num_experts": 1}, {}, "num_experts"),
        ("granitemoehybrid", {"num_hidden_layers": 4}, {"num_local_experts": 0}, "num_local_experts=0"),
    ],
)
def test_bad_targets_are_refused_before_any_work(family, fields, overrides, message):
    with pytest.raises(ValueError, match=message):
        prune_model(tiny_model(family, **overrides), PrunedConfig(**fields), calibration_data=None)


def test_granite4_breakdown_counts_the_shared_mlp_as_mlp():
    from hf_minitron.pruning.summary import parameter_breakdown

    model = tiny_model("granitemoehybrid")
    blocks = [m for layer in get_decoder_layers(model) for m in (layer.block_sparse_moe, layer.shared_mlp)]
    assert parameter_breakdown(model)["mlp"] == sum(p.numel() for m in blocks for p in m.parameters())
