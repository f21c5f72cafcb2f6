"""The embedded MoE (`hf_minitron/embedded/moe.py`): pure helpers on tiny tensors, and (slow) the real model."""

import copy
import itertools
import math

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM, Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from hf_minitron.embedded.moe import (
    balanced_kmeans,
    best_expert_sets,
    convert_block,
    moe_config,
    ridge_solve,
    split_mlp,
)


def _block_config(num_experts=4, top_k=2, shared=16, width=8, hidden=32):
    return Qwen2MoeConfig(
        hidden_size=hidden,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=width,
        shared_expert_intermediate_size=shared,
        norm_topk_prob=True,
    )


def _dense_mlp(hidden=32, neurons=48, seed=0):
    model = tiny_model("llama", seed=seed, hidden_size=hidden, intermediate_size=neurons)
    return model.model.layers[0].mlp


def _fill(block, weights):
    with torch.no_grad():
        block.shared_expert.gate_proj.weight.copy_(weights["shared_gate_proj"])
        block.shared_expert.up_proj.weight.copy_(weights["shared_up_proj"])
        block.shared_expert.down_proj.weight.copy_(weights["shared_down_proj"])
        block.shared_expert_gate.weight.zero_()
        block.experts.gate_up_proj.copy_(weights["gate_up_proj"])
        block.experts.down_proj.copy_(weights["down_proj"])
        block.gate.weight.zero_()


@pytest.mark.parametrize("shared_size", [16, 0])
def test_split_with_all_experts_active_is_the_dense_mlp(shared_size):
    """top_k = num_experts and a zero router (uniform weights 1/E): shared + routed experts = the dense MLP."""
    mlp = _dense_mlp()
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(1))
    shared, groups = perm[:shared_size], perm[shared_size:].view(4, -1)
    weights = split_mlp(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, shared, groups, top_k=4)
    block = Qwen2MoeSparseMoeBlock(_block_config(top_k=4, shared=max(shared_size, 1), width=groups.shape[1]))
    if shared_size == 0:  # no shared neurons: an all-zero one-neuron shared expert
        weights = weights | {
            "shared_gate_proj": torch.zeros(1, 32),
            "shared_up_proj": torch.zeros(1, 32),
            "shared_down_proj": torch.zeros(32, 1),
        }
    _fill(block, weights)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(block(x), mlp(x), rtol=1e-5, atol=1e-6)


def test_split_weights_layout():
    mlp = _dense_mlp()
    shared, groups = torch.arange(16), torch.arange(16, 48).view(4, 8)
    w = split_mlp(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, shared, groups, top_k=2)
    assert w["gate_up_proj"].shape == (4, 16, 32) and w["down_proj"].shape == (4, 32, 8)
    torch.testing.assert_close(w["gate_up_proj"][1, :8], mlp.gate_proj.weight[24:32])
    torch.testing.assert_close(w["gate_up_proj"][1, 8:], mlp.up_proj.weight[24:32])
    torch.testing.assert_close(w["down_proj"][3], 2 * mlp.down_proj.weight[:, 40:48])
    torch.testing.assert_close(w["shared_down_proj"], 2 * mlp.down_proj.weight[:, :16])


def test_balanced_kmeans_partitions_into_equal_clusters_and_finds_planted_ones():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 64, generator=g) * 3
    features = centres.repeat_interleave(6, 0) + 0.1 * torch.randn(24, 64, generator=g)
    assignment = balanced_kmeans(features[torch.randperm(24, generator=g)], 4, seed=0)
    assert sorted(torch.bincount(assignment, minlength=4).tolist()) == [6, 6, 6, 6]
    planted = balanced_kmeans(features, 4, seed=3)
    for c in range(4):  # each planted group of 6 lands in one cluster
        assert planted[c * 6 : (c + 1) * 6].unique().numel() == 1
    with pytest.raises(ValueError, match="must divide"):
        balanced_kmeans(features[:23], 4)
    torch.testing.assert_close(balanced_kmeans(features, 4, seed=5), balanced_kmeans(features, 4, seed=5))


def test_best_expert_sets_equals_brute_force():
    y = torch.randn(7, 5, 3, generator=torch.Generator().manual_seed(0))
    for k in (1, 2, 3):
        best = best_expert_sets(y, k)
        for t in range(7):
            errors = {
                s: (y[t].sum(0) - y[t, list(s)].sum(0)).norm().item() for s in itertools.combinations(range(5), k)
            }
            assert tuple(best[t].tolist()) == min(errors, key=errors.get)


def test_ridge_solve_is_least_squares_and_shrinks_to_prior():
    g = torch.Generator().manual_seed(0)
    f, w = torch.randn(200, 6, generator=g), torch.randn(6, 2, generator=g)
    torch.testing.assert_close(ridge_solve(f, f @ w, 1e-9).float(), w, atol=1e-5, rtol=1e-5)
    prior = torch.randn(6, 2, generator=g)
    torch.testing.assert_close(ridge_solve(f, f @ w, 1e9, prior=prior).float(), prior, atol=1e-4, rtol=1e-4)


def test_convert_block_routes_sparsely_and_approximates_the_dense_mlp():
    mlp = _dense_mlp(neurons=48)
    block = Qwen2MoeSparseMoeBlock(_block_config(num_experts=4, top_k=2, shared=16, width=8)).eval()
    x = torch.randn(400, 32, generator=torch.Generator().manual_seed(0))
    stats = convert_block(block, mlp, x, top_k=2, iterations=5, ridge=1e-2, seed=0)
    assert stats["relative_error"] <= stats["relative_error_before_refit"] + 1e-6
    assert abs(sum(stats["expert_load"]) - 1) < 1e-3
    with torch.no_grad():
        dense, sparse = mlp(x), block(x[None])[0]
    assert (sparse - dense).pow(2).sum() / dense.pow(2).sum() < 0.5
    assert block.shared_expert_gate.weight.abs().sum() == 0


def test_moe_config_mirrors_the_dense_config():
    dense = tiny_model("llama", intermediate_size=48).config
    config = moe_config(dense, num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=16)
    assert (config.model_type, config.moe_intermediate_size, config.qkv_bias) == ("qwen2_moe", 8, False)
    assert config.num_key_value_heads == dense.num_key_value_heads
    assert config.hidden_size // config.num_attention_heads == dense.head_dim  # qwen2_moe derives head_dim
    with pytest.raises(ValueError, match="head_dim"):
        moe_config(tiny_model("llama", head_dim=16).config, 4, 2, 16)
    with pytest.raises(ValueError, match="must divide"):
        moe_config(dense, num_experts=5, num_experts_per_tok=2, shared_expert_intermediate_size=16)


# ---------------------------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_embedded_moe_is_a_stock_sparse_moe_that_models_text_and_prunes(tmp_path):
    from hf_minitron import PrunedConfig, prune_model
    from hf_minitron.data import embedded_datasets
    from hf_minitron.embedded.moe import embedded_moe_info, embedded_moe_path, load_embedded_moe
    from hf_minitron.evaluation import lm_loss

    model, tokenizer = load_embedded_moe()
    model.eval()
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and type(model).__module__.startswith("transformers.")
    config = model.config
    assert config.num_experts == 8 and config.num_experts_per_tok == 2 < config.num_experts
    reloaded = AutoModelForCausalLM.from_pretrained(embedded_moe_path(), trust_remote_code=False)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name

    data = embedded_datasets(tokenizer, 128)
    validation = [
        {"input_ids": torch.tensor(r["input_ids"]), "attention_mask": torch.tensor(r["attention_mask"])}
        for r in data["validation"].select(range(6))
    ]
    calibration = data["train"].select(range(8))
    loss = lm_loss(model, validation)
    assert loss < 0.6 * math.log(config.vocab_size), (loss, math.log(config.vocab_size))
    info = embedded_moe_info()
    assert info["moe_loss"] < info["teacher_loss"] + 2

    # Sparse routing that uses every expert: each layer's router sends tokens to more than 2 distinct experts.
    ids = validation[0]["input_ids"][None]
    with torch.no_grad():
        logits = model(input_ids=ids, output_router_logits=True).router_logits
    for layer_logits in logits:
        chosen = layer_logits.topk(2, dim=-1).indices
        assert chosen.unique().numel() > 2

    # The routing statistics carry signal: keeping the 4 experts per layer the router used most costs less than keeping
    # the 4 it used least. Beating random selection is not asserted, and neither is output_norm: on the build of
    # 2026-12-07 (bit-identical only at a fixed thread count) keeping output_norm's top 4 experts gave 4.027 and its
    # bottom 4 gave 4.001, against 3.938 for the better of 2 random seeds; docs/moe.md's benchmark also has random
    # selection ahead of output_norm at 8 -> 4.
    from hf_minitron import estimate_importance
    from hf_minitron.pruning.structures.routed_experts import reduce_stats

    target = PrunedConfig(
        num_experts=4, calibration_samples=8, calibration_batch_size=4, expert_importance="frequency"
    )
    scores = estimate_importance(model, calibration, target, show_progress=False)
    ranked = reduce_stats(scores.experts, "frequency")

    def loss_keeping(expert_scores):
        scores.experts = {"score": expert_scores}
        return lm_loss(prune_model(copy.deepcopy(model), target, scores=scores, show_progress=False), validation)

    highest, lowest = loss_keeping(ranked), loss_keeping(-ranked)
    assert highest < lowest, (highest, lowest)
