"""DeepSeek-V3's MoE side: the grouped sigmoid router (experts kept per group, its correction bias sliced with
them), a silenced expert removed, the dense first layers pruned as MLPs and counted by depth, the shared MLP tied to
the expert width; the targets it cannot take are refused before any work. Its heads: test_latent_attention_heads.py;
every axis through stock reloads: test_moe.py."""

import copy

import pytest
import torch
from conftest import logits, n_params, random_samples, tiny_model
from transformers import AutoModelForCausalLM

from hf_minitron import PrunedConfig, count_parameters, prune_model
from hf_minitron.architectures import get_decoder_layers


# 8 experts in 2 groups; a token picks its 2 experts in its best group.
GROUPED = dict(n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2)


def _calibration():
    return dict(calibration_samples=4, calibration_batch_size=4)


def _moe_layers(model):
    return [layer for layer in get_decoder_layers(model) if hasattr(layer.mlp, "experts")]


def _grouped_model():
    model = tiny_model("deepseek_v3", **GROUPED)
    g = torch.Generator().manual_seed(0)
    for layer in _moe_layers(model):  # a buffer (tiny_model perturbs parameters only): make it matter
        layer.mlp.gate.e_score_correction_bias.copy_(torch.rand(8, generator=g) * 0.1)
    return model


def test_grouped_router_keeps_as_many_experts_per_group_and_slices_its_correction_bias(tmp_path):
    model = _grouped_model()
    biases = [layer.mlp.gate.e_score_correction_bias.clone() for layer in _moe_layers(model)]
    source = copy.deepcopy(model.config)
    config = PrunedConfig(num_experts=6, **_calibration())
    prune_model(model, config, random_samples(4), show_progress=False)

    record = model.pruning_record.experts
    assert sorted(record) == [1, 2, 3]  # the MoE layers; layer 0 is dense
    for (index, kept), bias, layer in zip(sorted(record.items()), biases, _moe_layers(model)):
        assert sum(e < 4 for e in kept) == sum(e >= 4 for e in kept) == 3, index
        torch.testing.assert_close(layer.mlp.gate.e_score_correction_bias, bias[kept])
    assert n_params(model) == count_parameters(source, config)
    assert count_parameters(model.config, count="active") == count_parameters(source, config, count="active")

    before = logits(model)
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (reloaded.config.n_routed_experts, reloaded.config.n_group) == (6, 2)
    torch.testing.assert_close(logits(reloaded.eval()), before, rtol=0, atol=0)


def test_a_silenced_expert_is_the_one_removed():
    model = tiny_model("deepseek_v3")
    with torch.no_grad():
        for layer in _moe_layers(model):
            layer.mlp.experts.down_proj[1] = 0  # expert 1 outputs zeros
    prune_model(model, PrunedConfig(num_experts=3, **_calibration()), random_samples(4), show_progress=False)
    assert all(kept == [0, 2, 3] for kept in model.pruning_record.experts.values())


def test_dense_layers_are_pruned_as_mlps_and_depth_rewrites_their_count(tmp_path):
    model = tiny_model("deepseek_v3")  # layer 0 dense (MLP 64), layers 1-3 MoE (shared MLP 48)
    source = copy.deepcopy(model.config)
    config = PrunedConfig(intermediate_size=40, layers_to_drop=[2], depth_method="explicit", **_calibration())
    prune_model(model, config, random_samples(4), show_progress=False)

    layers = get_decoder_layers(model)
    assert layers[0].mlp.down_proj.in_features == 40 and list(model.pruning_record.neurons) == [0]
    assert all(layer.mlp.shared_experts.down_proj.in_features == 48 for layer in layers[1:])
    assert (model.config.first_k_dense_replace, model.config.num_hidden_layers) == (1, 3)
    assert n_params(model) == count_parameters(source, config)

    dense_dropped = tiny_model("deepseek_v3")
    prune_model(dense_dropped, PrunedConfig(layers_to_drop=[0], depth_method="explicit"), show_progress=False)
    assert dense_dropped.config.first_k_dense_replace == 0  # the first layer left is an MoE layer
    dense_dropped.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert all(hasattr(layer.mlp, "experts") for layer in get_decoder_layers(reloaded))
    torch.testing.assert_close(logits(reloaded), logits(dense_dropped), rtol=0, atol=0)


def test_the_shared_mlp_follows_the_expert_width(tmp_path):
    model = tiny_model("deepseek_v3")  # shared MLP: n_shared_experts (2) x moe_intermediate_size (24)
    config = PrunedConfig(moe_intermediate_size=16, shared_expert_intermediate_size=16, **_calibration())
    prune_model(model, config, random_samples(4), show_progress=False)
    assert (model.config.moe_intermediate_size, model.config.n_shared_experts) == (16, 1)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert get_decoder_layers(reloaded)[1].mlp.shared_experts.down_proj.in_features == 16
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)


@pytest.mark.parametrize(
    "targets,match",
    [
        (dict(num_experts=5), r"not a multiple of the model's n_group=2.*\[4, 6, 8\]"),
        (dict(num_experts=2), r"leaves 1 experts in each of the n_group=2 groups.*\[4, 6, 8\]"),
        (dict(moe_intermediate_size=20), r"shared_expert_intermediate_size=48 is not a multiple.*\[20, 40\]"),
        (dict(shared_expert_intermediate_size=30), r"shared_expert_intermediate_size=30.*\[24, 48\]"),
    ],
)
def test_targets_the_config_cannot_express_are_refused_before_any_forward_pass(targets, match):
    model = _grouped_model()

    def no_forward(module, args):
        raise AssertionError("a forward pass ran before the target was refused")

    model.register_forward_pre_hook(no_forward)
    with pytest.raises(ValueError, match=match):
        prune_model(model, PrunedConfig(**targets, **_calibration()), random_samples(4), show_progress=False)
