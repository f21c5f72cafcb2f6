"""The Gated DeltaNet hybrids of transformers: Qwen3-Next and Qwen3.5's text models (dense and MoE).

Each layer holds a Gated DeltaNet mixer (`linear_attention`) or gated attention (`full_attention`, q_proj rows
`[query; gate]` per head), then Qwen3-Next's and Qwen3.5-MoE's routed experts with a gated shared expert, or Qwen3.5's SwiGLU MLP. Every
axis is pruned end to end with `prune_model`; the output reloads with stock transformers, without missing or unexpected
keys, computes the same logits, has as many parameters as `count_parameters` says and a fresh model of its config has,
and generates the same with and without its cache (KV cache and DeltaNet conv / recurrent states).
"""

import copy

import pytest
import torch
from conftest import DELTANET_PATTERN, random_samples, tiny_model
from transformers import AutoModelForCausalLM

from hf_minitron import (
    PrunedConfig,
    SearchConfig,
    count_parameters,
    estimate_importance,
    prune_model,
    random_importance,
)
from hf_minitron.architectures import get_decoder_layers
from hf_minitron.pruning.candidates import enumerate_candidates


IDS = torch.arange(3, 19)[None]
CALIBRATION = dict(calibration_samples=8, calibration_batch_size=4, depth_calibration_samples=4)
COMMON = {
    "deltanet_values": {"linear_num_value_heads": 2},
    "deltanet_keys": {"linear_num_value_heads": 2, "linear_num_key_heads": 1},
    "heads": {"num_attention_heads": 2, "num_key_value_heads": 1},
    "hidden": {"hidden_size": 24},
    "depth_by_type": {"num_layers_by_type": {"linear_attention": 1}, "depth_method": "block_influence"},
    "depth": {"layers_to_drop": [2]},
}
AXES = {
    "qwen3_next": COMMON
    | {
        "experts": {"num_experts": 3},
        "expert_width": {"moe_intermediate_size": 16},
        "shared_expert": {"shared_expert_intermediate_size": 24},
        "all": {
            "linear_num_value_heads": 2,
            "linear_num_key_heads": 1,
            "num_attention_heads": 2,
            "hidden_size": 24,
            "num_experts": 3,
            "moe_intermediate_size": 16,
            "num_layers_by_type": {"linear_attention": 1},
            "depth_method": "block_influence",
        },
    },
    # Qwen3.5's DeltaNet layout with Qwen3-Next's MoE block: the axes each already has elsewhere, once together.
    "qwen3_5_moe_text": {
        "deltanet_keys": COMMON["deltanet_keys"],
        "shared_expert": {"shared_expert_intermediate_size": 24},
        "all": {
            "linear_num_value_heads": 2,
            "linear_num_key_heads": 1,
            "num_attention_heads": 2,
            "hidden_size": 24,
            "num_experts": 3,
            "moe_intermediate_size": 16,
            "num_layers_by_type": {"full_attention": 1},
            "depth_method": "block_influence",
        },
    },
    "qwen3_5_text": COMMON
    | {
        "mlp": {"intermediate_size": 40},
        "all": {
            "linear_num_value_heads": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "hidden_size": 24,
            "intermediate_size": 40,
            "num_layers_by_type": {"full_attention": 1},
            "depth_method": "block_influence",
        },
    },
}
CASES = [(family, axis) for family, axes in AXES.items() for axis in axes]


def _check_reload(model, tmp_path):
    logits = model(IDS).logits
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reloaded.eval()
    torch.testing.assert_close(reloaded(IDS).logits, logits, rtol=0, atol=0)
    cached = reloaded.generate(IDS, max_new_tokens=4, do_sample=False, use_cache=True)
    uncached = reloaded.generate(IDS, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("family,axis", CASES, ids=[f"{family}-{axis}" for family, axis in CASES])
def test_prune_axis_reloads_with_stock_transformers_and_generates(family, axis, tmp_path):
    model = tiny_model(family)
    source = copy.deepcopy(model.config)
    fields = AXES[family][axis]
    prune_model(model, PrunedConfig(**fields, **CALIBRATION), random_samples(8), show_progress=False)
    record = model.pruning_record

    n = sum(p.numel() for p in model.parameters())
    assert n == count_parameters(source, PrunedConfig(**fields)) < count_parameters(source)
    fresh = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
    assert sum(p.numel() for p in fresh.parameters()) == n
    # The layer types of the kept layers, in the config and on the layers.
    assert model.config.layer_types == [DELTANET_PATTERN[i] for i in record.kept_layers]
    assert [layer.block_type for layer in get_decoder_layers(model)] == model.config.layer_types
    for name, value in fields.items():
        if name not in ("num_layers_by_type", "layers_to_drop", "depth_method"):
            assert getattr(model.config, name) == value
    deltanet_layers = [i for i, kind in enumerate(model.config.layer_types) if kind == "linear_attention"]
    if "linear_num_value_heads" in fields:
        assert sorted(record.deltanet_value_heads) == deltanet_layers
    _check_reload(model, tmp_path)


@pytest.mark.parametrize("family", list(AXES))
def test_identity_pruning_keeps_logits_exactly(family):
    model = tiny_model(family)
    before = model(IDS).logits
    c = model.config
    same = PrunedConfig(
        linear_num_value_heads=c.linear_num_value_heads,
        linear_num_key_heads=c.linear_num_key_heads,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        hidden_size=c.hidden_size,
        **CALIBRATION,
    )
    prune_model(model, same, random_samples(8), show_progress=False)
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("family", list(AXES))
def test_statistics_follow_the_block_of_each_layer(family):
    model = tiny_model(family)
    scores = estimate_importance(model, random_samples(8), PrunedConfig(**CALIBRATION), show_progress=False)
    for i, kind in enumerate(DELTANET_PATTERN):
        assert bool(scores.deltanet["sum"][i].any()) == (kind == "linear_attention")
        assert bool(scores.heads["sum"][i].any()) == (kind == "full_attention")
        assert scores.hidden["sum"][i, 0].any() and scores.hidden["sum"][i, 1].any()


@pytest.mark.parametrize("family", list(AXES))
@pytest.mark.parametrize("importance", ["magnitude", "random"])
def test_baselines_prune_the_deltanet_and_attention_heads(family, importance, tmp_path):
    model = tiny_model(family)
    config = PrunedConfig(
        linear_num_value_heads=2,
        linear_num_key_heads=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        hidden_size=24,
        importance=importance,
    )
    prune_model(model, config, show_progress=False)
    assert (model.config.linear_num_value_heads, model.config.linear_num_key_heads) == (2, 1)
    _check_reload(model, tmp_path)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"linear_num_value_heads": 3}, r"linear_num_value_heads=3 is not a multiple of the 2 key heads.*e\.g\. 2"),
        ({"linear_num_value_heads": 4, "linear_num_key_heads": 1}, r"keeps 4 value heads per key head"),
        ({"num_attention_heads": 3}, "not a multiple of the number of KV heads"),
        ({"layers_to_drop": [1, 3]}, r"removes every attention layer \(\[1, 3\]\)"),
        ({"num_layers_by_type": {"full_attention": 0}}, "removes every attention layer"),
        ({"num_layers_by_type": {"mamba": 1}}, "names the block type 'mamba'"),
    ],
)
def test_bad_targets_are_refused_before_any_work(fields, message):
    with pytest.raises(ValueError, match=message):
        prune_model(tiny_model("qwen3_next"), PrunedConfig(**fields), calibration_data=None)


@pytest.mark.parametrize("family", list(AXES))
def test_search_enumerates_deltanet_heads_and_layers_by_type_with_exact_counts(family):
    model = tiny_model(family)
    grids = dict(
        hidden_size_grid=[32],
        linear_num_value_heads_grid=[2, 4],
        linear_num_key_heads_grid=[1, 2],
        num_deltanet_layers_grid=[1, 2],
    )
    search = SearchConfig(target_ratio=0.8, tolerance=0.3, pruning={"depth_method": "block_influence"}, **grids)
    candidates = enumerate_candidates(model.config, search)
    # 4 value heads in 1 key head would move value heads between key heads: no candidate.
    pairs = {(c.shape["linear_num_value_heads"], c.shape["linear_num_key_heads"]) for c in candidates}
    assert pairs == {(2, 1), (2, 2), (4, 2)}
    assert "dnvalues" in candidates[0].name and "dnlayers" in candidates[0].name
    scores = random_importance(model.config)
    for candidate in candidates[:3]:
        pruned = prune_model(copy.deepcopy(model), candidate.pruned_config, scores=scores)
        assert sum(p.numel() for p in pruned.parameters()) == candidate.num_parameters
        kinds = pruned.config.layer_types
        assert kinds.count("linear_attention") == candidate.shape["num_deltanet_layers"]
    # Generated: value heads in multiples of the key heads, key heads kept unless a grid gives others.
    generated = enumerate_candidates(
        model.config, SearchConfig(target_ratio=0.9, tolerance=0.2, max_width_pruning=0.5)
    )
    assert {(c.shape["linear_num_value_heads"], c.shape["linear_num_key_heads"]) for c in generated} <= {
        (2, 2),
        (4, 2),
    }


@pytest.mark.parametrize(
    "family,fields", [("qwen3_next", {"mlp_only_layers": [1]}), ("qwen2_moe", {"decoder_sparse_step": 2})]
)
def test_moe_families_with_dense_layers_are_refused_naming_them(family, fields):
    with pytest.raises(
        ValueError, match=r"dense MLP layers \[(1|0, 2)\].*mlp_only_layers=\[\] and decoder_sparse_step=1"
    ):
        prune_model(tiny_model(family, **fields), PrunedConfig(num_experts=3), calibration_data=None)


@pytest.mark.parametrize("family", list(AXES))
def test_the_parameter_breakdown_counts_the_deltanet_mixers_as_attention(family):
    from hf_minitron.pruning.summary import parameter_breakdown

    model = tiny_model(family)
    breakdown = parameter_breakdown(model)
    assert breakdown["norms"] == (2 * len(DELTANET_PATTERN) + 1) * 32  # two per layer and the final norm
    mixers = [layer.linear_attn for layer in get_decoder_layers(model) if layer.block_type == "linear_attention"]
    attention = [layer.self_attn for layer in get_decoder_layers(model) if layer.block_type == "full_attention"]
    assert breakdown["attention"] == sum(p.numel() for m in mixers + attention for p in m.parameters())
