"""Nemotron-H's MoE blocks (issue 13): routed experts behind a grouped sigmoid router, expert width and the shared
expert, and the hidden and depth axes through MoE layers, in a hybrid of mamba / attention / mlp / moe blocks."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import random_samples, tiny_model
from transformers import AutoModelForCausalLM

from hf_minitron import PrunedConfig, count_parameters, estimate_importance, prune_model, random_importance
from hf_minitron.architectures import get_decoder_layers


IDS = torch.arange(3, 19)[None]
PATTERN = ["linear_attention", "moe", "full_attention", "mlp", "moe"]
MOE_LAYERS = [1, 4]
# 8 routed experts in 2 groups of 4; a token picks 2 experts in its best group (topk_group=1).
MOE = dict(
    layers_block_type=PATTERN,
    num_hidden_layers=len(PATTERN),
    n_routed_experts=8,
    n_group=2,
    topk_group=1,
    num_experts_per_tok=2,
    moe_intermediate_size=24,
    moe_shared_expert_intermediate_size=40,
)


def _model(seed: int = 0, **overrides):
    model = tiny_model("nemotron_h", seed, **{**MOE, **overrides})
    # The correction bias is a buffer (tiny_model perturbs parameters only): make it matter, so that a bias left
    # unsliced or sliced with other indices changes the routing.
    g = torch.Generator().manual_seed(seed)
    for layer in get_decoder_layers(model):
        if layer.block_type != "moe":
            continue
        gate = layer.mixer.gate
        gate.e_score_correction_bias.copy_(torch.rand(gate.e_score_correction_bias.shape, generator=g) * 0.1)
    return model


def _calibration():
    return dict(calibration_samples=8, calibration_batch_size=4, depth_calibration_samples=4)


def _per_expert_parameters(model) -> int:
    """Parameters of one routed expert (in the first MoE layer)."""
    layer = next(layer for layer in get_decoder_layers(model) if layer.block_type == "moe")
    return sum(p[0].numel() for p in layer.mixer.experts.parameters())


AXES = {
    "experts": {"num_experts": 4},
    "expert_width": {"moe_intermediate_size": 16},
    "shared_expert": {"shared_expert_intermediate_size": 24},
    "hidden": {"hidden_size": 24},
    "depth": {"layers_to_drop": [1]},  # one of the two MoE layers
    "all": {
        "num_experts": 6,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 24,
        "hidden_size": 24,
        "intermediate_size": 40,
        "mamba_num_heads": 4,
        "num_hidden_layers": 4,
        "depth_method": "block_influence",
    },
}


@pytest.mark.parametrize("axis", list(AXES))
def test_prune_axis_reloads_with_stock_transformers_and_generates(axis, tmp_path):
    model = _model()
    source = copy.deepcopy(model.config)
    config = PrunedConfig(**AXES[axis], **_calibration())
    prune_model(model, config, random_samples(8), show_progress=False)
    record = model.pruning_record

    # Exact counts, total and active: the layers that depth pruning dropped decide the block types that remain.
    target = PrunedConfig(**{**AXES[axis], "num_hidden_layers": None, "layers_to_drop": record.dropped_layers or None})
    n = sum(p.numel() for p in model.parameters())
    assert n == count_parameters(source, target) < count_parameters(source)
    fresh = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
    assert sum(p.numel() for p in fresh.parameters()) == n
    moe_layers = [new for new, src in enumerate(record.kept_layers) if PATTERN[src] == "moe"]
    inactive = (model.config.n_routed_experts - 2) * _per_expert_parameters(model) * len(moe_layers)
    assert count_parameters(source, target, "active") == n - inactive == count_parameters(fresh.config, count="active")
    assert model.config.layers_block_type == [PATTERN[i] for i in record.kept_layers]
    names = {
        "num_experts": "n_routed_experts",
        "shared_expert_intermediate_size": "moe_shared_expert_intermediate_size",
    }
    for name, value in AXES[axis].items():
        if name not in ("num_hidden_layers", "depth_method", "layers_to_drop"):
            assert getattr(model.config, names.get(name, name)) == value

    logits = model(IDS).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(reloaded(IDS).logits, logits, rtol=0, atol=0)
    cached = reloaded.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = reloaded.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)

    # The record lists, per kept MoE layer, its kept experts (as many from each of the 2 router groups).
    if config.num_experts:
        assert sorted(record.experts) == moe_layers
        for kept in record.experts.values():
            assert len(kept) == config.num_experts
            assert sum(e < 4 for e in kept) == sum(e >= 4 for e in kept)
    if config.moe_intermediate_size:
        assert sorted(record.expert_neurons) == moe_layers
        assert all(len(k) == config.moe_intermediate_size for v in record.expert_neurons.values() for k in v)
    if config.shared_expert_intermediate_size:
        assert sorted(record.shared_neurons) == moe_layers
    if config.intermediate_size:
        assert sorted(record.neurons) == [new for new, src in enumerate(record.kept_layers) if PATTERN[src] == "mlp"]


def test_identity_pruning_keeps_logits_exactly():
    model = _model()
    before = model(IDS).logits
    c = model.config
    same = PrunedConfig(
        num_experts=c.n_routed_experts,
        moe_intermediate_size=c.moe_intermediate_size,
        shared_expert_intermediate_size=c.moe_shared_expert_intermediate_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        **_calibration(),
    )
    prune_model(model, same, random_samples(8), show_progress=False)
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)


def _route(gate, x):
    """Nemotron-H's grouped sigmoid routing, written out: `(top-k experts, their weights)` of tokens `x` `[T, H]`."""
    scores = F.linear(x.float(), gate.weight.float()).sigmoid()
    choice = scores + gate.e_score_correction_bias
    groups = choice.view(-1, 2, 4).topk(2, dim=-1).values.sum(-1)  # each group scored by its 2 best experts
    best = groups.topk(1, dim=-1).indices  # topk_group=1
    allowed = torch.zeros_like(groups).scatter(1, best, 1).repeat_interleave(4, dim=1).bool()
    top_i = choice.masked_fill(~allowed, float("-inf")).topk(2, dim=-1).indices
    top_w = scores.gather(1, top_i)
    return top_i, top_w / (top_w.sum(-1, keepdim=True) + 1e-20)


def test_expert_scores_equal_a_direct_computation():
    """Output norms, REAP, frequencies, expert and shared-expert neurons, computed here with plain torch."""
    model = _model()
    samples = random_samples(8)
    scores = estimate_importance(model, samples, PrunedConfig(**_calibration()), show_progress=False)
    for layer in MOE_LAYERS:
        moe = get_decoder_layers(model)[layer].mixer
        inputs = []
        handle = moe.register_forward_pre_hook(lambda m, args, seen=inputs: seen.append(args[0].flatten(0, -2)))
        norms, weighted, counts = (torch.zeros(8, dtype=torch.float64) for _ in range(3))
        neuron_sums = torch.zeros(8, 24, dtype=torch.float64)
        shared_l2 = torch.zeros(40, dtype=torch.float64)
        with torch.no_grad():
            for sample in samples:  # one sample at a time: no padding to exclude
                inputs.clear()
                model(input_ids=sample["input_ids"][None])
                x = inputs[0]
                top_i, top_w = _route(moe.gate, x)
                for e in range(8):
                    token, slot = torch.where(top_i == e)
                    act = F.relu(F.linear(x[token], moe.experts.up_proj[e])).pow(2)
                    out = F.linear(act, moe.experts.down_proj[e]).norm(dim=-1).double()
                    norms[e] += out.sum()
                    weighted[e] += (out * top_w[token, slot].double()).sum()
                    counts[e] += len(token)
                    neuron_sums[e] += act.abs().double().sum(0)
                shared = F.relu(moe.shared_experts.up_proj(x)).pow(2)
                shared_l2 += shared.abs().mean(0).double().pow(2)  # per-sample mean over tokens, L2 over samples
        handle.remove()
        torch.testing.assert_close(scores.expert_scores("output_norm")[layer], norms / counts)
        torch.testing.assert_close(scores.expert_scores("reap")[layer], weighted / counts)
        torch.testing.assert_close(scores.expert_scores("frequency")[layer], counts)
        torch.testing.assert_close(scores.expert_neuron_scores()[layer], neuron_sums / counts[:, None].clamp_min(1))
        torch.testing.assert_close(scores.shared_neuron_scores()[layer], shared_l2.sqrt(), rtol=1e-5, atol=1e-8)
        assert counts.sum() == 2 * scores.num_tokens  # every token went to 2 experts
    for layer in (0, 2, 3):  # the statistics rows of layers without an MoE block stay zero
        assert not scores.experts["count"][layer].any() and not scores.shared_neurons["sum"][layer].any()


def test_experts_are_kept_per_router_group_and_every_expert_tensor_follows():
    """The best experts of EACH group, not overall: group 0 holds the 4 best experts of layer 1, yet 2 of group 1 stay,
    so that the router's groups (by position) keep their members."""
    model = _model()
    original = copy.deepcopy(model)
    scores = random_importance(model.config)
    ranking = torch.tensor([8.0, 7.0, 6.0, 5.0, 1.0, 4.0, 2.0, 3.0], dtype=torch.float64)
    scores.experts = {"score": ranking.expand(5, 8).clone()}
    prune_model(model, PrunedConfig(num_experts=4, moe_intermediate_size=16), scores=scores)
    record = model.pruning_record
    assert record.experts == {1: [0, 1, 5, 7], 4: [0, 1, 5, 7]}
    neuron_scores = scores.expert_neuron_scores()
    for layer in MOE_LAYERS:
        src, dst = get_decoder_layers(original)[layer].mixer, get_decoder_layers(model)[layer].mixer
        kept = torch.tensor(record.experts[layer])
        torch.testing.assert_close(dst.gate.weight, src.gate.weight[kept], rtol=0, atol=0)
        bias = src.gate.e_score_correction_bias[kept]
        torch.testing.assert_close(dst.gate.e_score_correction_bias, bias, rtol=0, atol=0)
        assert "mixer.gate.e_score_correction_bias" in dict(get_decoder_layers(model)[layer].named_buffers())
        for j, e in enumerate(kept.tolist()):
            neurons = torch.sort(torch.topk(neuron_scores[layer][e], 16).indices).values
            assert record.expert_neurons[layer][j] == neurons.tolist()
            torch.testing.assert_close(dst.experts.up_proj[j], src.experts.up_proj[e][neurons], rtol=0, atol=0)
            torch.testing.assert_close(dst.experts.down_proj[j], src.experts.down_proj[e][:, neurons], rtol=0, atol=0)
        assert dst.gate.num_experts == dst.experts.num_experts == 4 and dst.experts.intermediate_dim == 16
    assert torch.isfinite(model(IDS).logits).all()


@pytest.mark.parametrize("importance", ["magnitude", "random"])
def test_baselines_prune_hybrid_moe(importance, tmp_path):
    model = _model()
    config = PrunedConfig(
        num_experts=4,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        hidden_size=24,
        num_hidden_layers=4,
        importance=importance,
    )
    prune_model(model, config, show_progress=False)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides,fields,message",
    [
        (
            {},
            {"num_experts": 5},
            r"num_experts=5 is not a multiple of the model's n_group=2.*Choose one of \[4, 6, 8\]",
        ),
        ({}, {"num_experts": 2}, "leaves 1 experts in each of the n_group=2 groups.*its 2 best experts"),
        ({}, {"num_experts": 10}, "larger than the source model's num_experts=8"),
        ({}, {"moe_intermediate_size": 32}, "larger than the source model's moe_intermediate_size=24"),
        (
            {},
            {"shared_expert_intermediate_size": 48},
            "larger than the source model's shared_expert_intermediate_size",
        ),
        (
            dict(n_routed_experts=16, n_group=4, topk_group=1, num_experts_per_tok=3),
            {"num_experts": 8},
            r"topk_group=1 groups must hold its num_experts_per_tok=3 experts.*Choose one of \[12, 16\]",
        ),
        (
            dict(layers_block_type=["linear_attention", "full_attention", "mlp"], num_hidden_layers=3),
            {"num_experts": 4},
            "has no 'moe' blocks in layers_block_type",
        ),
    ],
)
def test_bad_moe_targets_are_refused_before_any_work(overrides, fields, message):
    with pytest.raises(ValueError, match=message):
        prune_model(_model(**overrides), PrunedConfig(**fields), calibration_data=None)


def test_latent_moe_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="moe_latent_size=16 .*latent MoE.*moe_latent_size=None"):
        prune_model(_model(moe_latent_size=16), PrunedConfig(num_experts=4), calibration_data=None)
