"""MiniMax-M2 and Llama 4 (text): MoE families whose routing differs from the others'.

MiniMax-M2 keeps its routing bias on the MoE block rather than the router. Llama 4 scales the experts' input by the
router score and runs every expert on every token, sizes its shared expert with the routed experts' field, skips RoPE
in some layers, attends in chunks and may interleave dense layers (whose MLP width is `intermediate_size_mlp`) with
its MoE layers. The parametrised tests of `test_moe.py` prune both along every axis; these
check what is particular to them.
"""

import copy

import pytest
import torch
from conftest import random_samples, tiny_model
from transformers import AutoModelForCausalLM

from hf_minitron import PrunedConfig, count_parameters, prune_model
from hf_minitron.architectures import get_architecture, get_decoder_layers
from hf_minitron.pruning.structures.routed_experts import expert_tensors, instrument


IDS = torch.arange(3, 19)[None]


def _calibration():
    return dict(calibration_samples=8, calibration_batch_size=4, depth_calibration_samples=4)


def _reload(model, tmp_path):
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return reloaded.eval()


def _check_counts(model, source, config):
    fresh = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
    n = sum(p.numel() for p in model.parameters())
    assert n == sum(p.numel() for p in fresh.parameters()) == count_parameters(source, config)
    active = count_parameters(model.config, count="active")
    assert active == count_parameters(source, config, count="active") < n


def test_minimax_m2_dead_expert_is_removed_and_its_routing_bias_follows(tmp_path):
    model = tiny_model("minimax_m2")
    source = copy.deepcopy(model.config)
    with torch.no_grad():
        for layer in get_decoder_layers(model):
            layer.mlp.experts.gate_up_proj[1].zero_()
            layer.mlp.experts.down_proj[1].zero_()
            layer.mlp.e_score_correction_bias.copy_(torch.tensor([0.001, 0.002, 0.003, 0.004]))
    config = PrunedConfig(num_experts=3, expert_importance="output_norm", **_calibration())
    prune_model(model, config, random_samples(8), show_progress=False)

    assert all(kept == [0, 2, 3] for kept in model.pruning_record.experts.values())
    for layer in get_decoder_layers(model):
        torch.testing.assert_close(layer.mlp.e_score_correction_bias, torch.tensor([0.001, 0.003, 0.004]))
    _check_counts(model, source, config)
    reloaded = _reload(model, tmp_path)
    torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)
    cached = reloaded.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(cached, reloaded.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=False))


def test_minimax_m2_heads_slice_the_qk_norms_over_all_heads(tmp_path):
    model = tiny_model("minimax_m2")
    source = copy.deepcopy(model.config)
    config = PrunedConfig(num_attention_heads=2, num_key_value_heads=1, **_calibration())
    prune_model(model, config, random_samples(8), show_progress=False)
    attn = get_decoder_layers(model)[0].self_attn
    assert attn.q_norm.weight.shape == (2 * 8,) and attn.k_norm.weight.shape == (1 * 8,)
    _check_counts(model, source, config)
    torch.testing.assert_close(_reload(model, tmp_path)(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_llama4_instrumented_experts_compute_what_the_block_does():
    model = tiny_model("llama4_text", num_experts_per_tok=2)  # top-2: tokens reach several experts
    layers = get_decoder_layers(model)
    before = model(IDS).logits
    routed = [torch.zeros(4) for _ in layers]
    handles = [
        instrument(layer, expert_tensors(layer, get_architecture(model.config)), _counter(routed[i]))
        for i, layer in enumerate(layers)
    ]
    logits = model(IDS).logits
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(logits, before, rtol=1e-5, atol=1e-6)
    assert all(counts.sum() == 2 * IDS.numel() for counts in routed)  # each token reached its top-2 experts
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)  # the forward is restored


def _counter(counts):
    def observe(e, token_idx, weights, act, out):
        assert (weights > 0).all()
        counts[e] += token_idx.numel()

    return observe


def test_llama4_dead_expert_and_dead_shared_neuron_are_removed(tmp_path):
    model = tiny_model("llama4_text")
    source = copy.deepcopy(model.config)
    with torch.no_grad():
        for layer in get_decoder_layers(model):
            layer.feed_forward.experts.gate_up_proj[2].zero_()
            layer.feed_forward.experts.down_proj[2].zero_()
            layer.feed_forward.shared_expert.up_proj.weight[5].zero_()
    config = PrunedConfig(
        num_experts=3,
        expert_importance="output_norm",
        moe_intermediate_size=23,
        shared_expert_intermediate_size=23,
        **_calibration(),
    )
    prune_model(model, config, random_samples(8), show_progress=False)

    record = model.pruning_record
    assert all(kept == [0, 1, 3] for kept in record.experts.values())
    assert all(5 not in kept and len(kept) == 23 for kept in record.shared_neurons.values())
    assert model.config.intermediate_size == 23
    _check_counts(model, source, config)
    reloaded = _reload(model, tmp_path)
    torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_llama4_per_layer_lists_follow_depth_pruning(tmp_path):
    model = tiny_model("llama4_text")
    source = copy.deepcopy(model.config)
    assert source.no_rope_layers == [1, 1, 1, 0] and source.layer_types[3] == "full_attention"
    config = PrunedConfig(layers_to_drop=[1])
    prune_model(model, config, calibration_data=None, show_progress=False)
    assert model.config.no_rope_layers == [1, 1, 0]
    assert model.config.layer_types == ["chunked_attention", "chunked_attention", "full_attention"]
    assert model.config.moe_layers == [0, 1, 2]
    _check_counts(model, source, config)
    reloaded = _reload(model, tmp_path)
    ids = torch.arange(3, 23)[None]  # longer than two attention chunks
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    cached = reloaded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(cached, reloaded.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False))


@pytest.mark.parametrize(
    "overrides,fields,message",
    [
        ({}, {"moe_intermediate_size": 16}, "without shared_expert_intermediate_size=16: .* one config field"),
        ({}, {"shared_expert_intermediate_size": 16}, "Set moe_intermediate_size=16 too"),
        ({}, {"intermediate_size": 16}, "moe_intermediate_size"),
        ({}, {"num_experts": 0}, "positive integer"),
    ],
)
def test_llama4_impossible_targets_are_refused_before_any_work(overrides, fields, message):
    model = tiny_model("llama4_text", **overrides)
    with pytest.raises(ValueError, match=message):
        prune_model(model, PrunedConfig(**fields), calibration_data=None)


def test_llama4_interleaved_dense_layers_prune_their_own_width(tmp_path):
    # interleave_moe_layer_step=2: layers 1 and 3 are MoE, layers 0 and 2 dense MLPs of width intermediate_size_mlp.
    model = tiny_model("llama4_text", interleave_moe_layer_step=2)
    assert model.config.moe_layers == [1, 3] and model.config.intermediate_size_mlp == 40
    before = model(IDS).logits
    same = PrunedConfig(intermediate_size=40, num_experts=4, **_calibration())
    identity = copy.deepcopy(model)
    prune_model(identity, same, random_samples(8), show_progress=False)
    torch.testing.assert_close(identity(IDS).logits, before, rtol=0, atol=0)

    source = copy.deepcopy(model.config)
    layers = get_decoder_layers(model)
    with torch.no_grad():
        for i in (0, 2):
            layers[i].feed_forward.up_proj.weight[7].zero_()
        for i in (1, 3):
            layers[i].feed_forward.experts.gate_up_proj[0].zero_()
            layers[i].feed_forward.experts.down_proj[0].zero_()
    config = PrunedConfig(
        intermediate_size=39, num_experts=3, expert_importance="output_norm", layers_to_drop=[2], **_calibration()
    )
    prune_model(model, config, random_samples(8), show_progress=False)
    record = model.pruning_record
    assert sorted(record.neurons) == [0] and 7 not in record.neurons[0]  # the dense layers left: 0
    assert sorted(record.experts) == [1, 2] and all(0 not in kept for kept in record.experts.values())
    assert model.config.moe_layers == [1, 2] and model.config.intermediate_size_mlp == 39
    assert model.config.intermediate_size == 24  # the experts' width, untouched
    _check_counts(model, source, config)
    reloaded = _reload(model, tmp_path)
    torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)
    cached = reloaded.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(cached, reloaded.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=False))
    # Which layers a depth target drops decides the size of an interleaved model: counted from layers_to_drop only.
    with pytest.raises(ValueError, match="dense layers differ in size.*layers_to_drop"):
        count_parameters(source, PrunedConfig(num_hidden_layers=3))


def test_llama4_depth_by_layer_type_and_the_search_count_exactly():
    from hf_minitron import SearchConfig, enumerate_candidates, magnitude_importance

    model = tiny_model("llama4_text", interleave_moe_layer_step=2)
    source = copy.deepcopy(model.config)
    config = PrunedConfig(num_layers_by_type={"mlp": 1}, **_calibration())
    pruned = prune_model(copy.deepcopy(model), config, random_samples(8), show_progress=False)
    assert pruned.config.moe_layers == [1, 2] and pruned.pruning_record.dropped_layers in ([0], [2])
    _check_counts(pruned, source, config)

    widths = ("hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size")
    space = {f"{name}_multiple": 8 for name in widths} | dict(max_width_pruning=0.5, max_depth_pruning=0.25)
    search = SearchConfig(target_ratio=0.7, tolerance=0.1, count="active", **space)
    candidates = enumerate_candidates(source, search)
    assert candidates and all("mlplayers" in c.name and "moelayers" in c.name for c in candidates)
    # One config field sizes the shared and the routed experts: candidates where they differ are refused.
    assert all(c.shape["moe_intermediate_size"] == c.shape["shared_expert_intermediate_size"] for c in candidates)
    scores = magnitude_importance(model)
    for candidate in (candidates[0], candidates[-1]):
        pruned = prune_model(copy.deepcopy(model), candidate.pruned_config, scores=scores)
        assert candidate.num_parameters == sum(p.numel() for p in pruned.parameters())
        assert candidate.budget_value == count_parameters(source, candidate.pruned_config, "active")
    # Every layer MoE: no dense-MLP axis, the depth counts MoE layers.
    all_moe = enumerate_candidates(tiny_model("llama4_text").config, search)
    assert all("-mlp" not in c.name and "moelayers" in c.name for c in all_moe)
