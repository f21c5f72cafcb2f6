"""MiniMax-M2 and Llama 4 (text): the MoE families whose routers or layer patterns differ from the others'.

MiniMax-M2 keeps its routing bias on the MoE block rather than the router; the parametrised tests of `test_moe.py`
prune it along every axis, these check what is particular to it.
"""

import copy

import torch
from conftest import random_samples, tiny_model
from transformers import AutoModelForCausalLM

from hf_minitron import PrunedConfig, count_parameters, prune_model
from hf_minitron.architectures import get_decoder_layers


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
