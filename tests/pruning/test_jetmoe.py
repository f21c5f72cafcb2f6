"""JetMoE: a mixture of attention experts (per-expert query/output projections around a shared kv_proj) and MoE experts
in the ScatterMoE layout, one expert count for both. Every axis prunes, reloads with stock transformers, generates."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import random_samples, tiny_model
from transformers import AutoModelForCausalLM

from hf_minitron import (
    ImportanceScores,
    PrunedConfig,
    count_parameters,
    estimate_importance,
    magnitude_importance,
    prune_model,
    random_importance,
)
from hf_minitron.architectures import get_decoder_layers


IDS = torch.arange(3, 19)[None]
CALIBRATION = dict(calibration_samples=8, calibration_batch_size=4, depth_calibration_samples=4)
# The tiny JetMoE: hidden 32, 4 layers, 4 attention experts and 4 MoE experts of width 24, 2 per token, 2 KV heads of
# dim 8 (so 4 query heads: 2 KV heads x 2 selected attention experts).
AXES = {
    "experts": {"num_experts": 3},
    "expert_width": {"moe_intermediate_size": 16},
    "hidden": {"hidden_size": 24},
    "kv_heads": {"num_key_value_heads": 1, "num_attention_heads": 2},
    "depth": {"num_hidden_layers": 2},
    "all": {
        "num_experts": 2,
        "moe_intermediate_size": 16,
        "hidden_size": 24,
        "num_key_value_heads": 1,
        "num_attention_heads": 2,
        "num_hidden_layers": 3,
    },
}


def _per_expert_parameters(model) -> int:
    """Parameters of one MoE expert plus one attention expert (weights `[E, out, in]`), in one layer."""
    layer = get_decoder_layers(model)[0]
    blocks = (layer.mlp, layer.self_attention.experts)
    return sum(block.input_linear.weight[0].numel() + block.output_linear.weight[0].numel() for block in blocks)


def _reload_exactly(model, path):
    """Stock `from_pretrained`, checked weight for weight and logit for logit against `model`.

    `from_pretrained` leaves the weights in the safetensors memory map, at whatever alignment the file gives them;
    for some shapes the CPU GEMM then sums in another order than for the same weights in aligned memory (~1e-8 apart,
    for an unpruned model too). The logits are compared exactly once the weights are in fresh (aligned) memory.
    """
    reloaded = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    expected, actual = model.state_dict(), reloaded.state_dict()
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    logits = model(IDS).logits
    torch.testing.assert_close(reloaded(IDS).logits, logits, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        for p in reloaded.parameters():
            p.data = p.data.clone()
    torch.testing.assert_close(reloaded(IDS).logits, logits, rtol=0, atol=0)
    return reloaded


@pytest.mark.parametrize("axis", list(AXES))
def test_prune_axis_reloads_with_stock_transformers_and_generates(axis, tmp_path):
    model = tiny_model("jetmoe")
    source = copy.deepcopy(model.config)
    config = PrunedConfig(**AXES[axis], **CALIBRATION)
    prune_model(model, config, random_samples(8), show_progress=False)

    n = sum(p.numel() for p in model.parameters())
    assert n == count_parameters(source, config) < count_parameters(source)
    fresh = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
    assert sum(p.numel() for p in fresh.parameters()) == n
    # Active: each token runs through num_experts_per_tok of the experts of each block (the routers score all).
    inactive = (model.config.num_local_experts - 2) * _per_expert_parameters(model) * model.config.num_hidden_layers
    assert count_parameters(source, config, count="active") == n - inactive

    target = {**AXES[axis]}
    assert model.config.num_local_experts == target.get("num_experts", 4)
    assert model.config.intermediate_size == target.get("moe_intermediate_size", 24)
    assert model.config.num_key_value_heads == target.get("num_key_value_heads", 2)
    assert model.config.num_attention_heads == 2 * model.config.num_key_value_heads

    model.save_pretrained(tmp_path)
    reloaded = _reload_exactly(model, tmp_path)
    assert reloaded.config.num_attention_heads == model.config.num_attention_heads
    cached = reloaded.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = reloaded.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)

    record = model.pruning_record
    layers = model.config.num_hidden_layers
    if "num_experts" in target:  # both blocks keep as many experts, each its own
        for kept in (record.experts, record.attention_experts):
            assert len(kept) == layers and all(len(e) == target["num_experts"] for e in kept.values())
    if "num_key_value_heads" in target:
        assert all(len(kv) == 1 for kv in record.kv_heads.values())
        # JetMoE's query head k x kv_heads + j reads KV head j: the kept query heads follow the kept KV head.
        assert all(record.heads[i] == [kv[0], kv[0] + 2] for i, kv in record.kv_heads.items())


def test_identity_pruning_keeps_logits_exactly():
    model = tiny_model("jetmoe")
    before = model(IDS).logits
    same = dict(
        num_experts=4,
        moe_intermediate_size=24,
        hidden_size=32,
        num_key_value_heads=2,
        num_attention_heads=4,
        num_hidden_layers=4,
    )
    prune_model(model, PrunedConfig(**same, **CALIBRATION), random_samples(8), show_progress=False)
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)


def _rotate_half(x):
    return torch.cat([-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]], dim=-1)


def test_expert_and_head_scores_equal_a_direct_computation():
    """Routing, attention and both expert blocks of layer 1 recomputed here from the weights with plain torch."""
    model = tiny_model("jetmoe")
    samples = random_samples(8, ragged=True)
    scores = estimate_importance(model, samples, PrunedConfig(**CALIBRATION), show_progress=False)
    layer = get_decoder_layers(model)[1]
    moa, moe = layer.self_attention.experts, layer.mlp
    inputs = {}
    handles = [
        layer.input_layernorm.register_forward_hook(lambda m, a, out: inputs.__setitem__("attention", out[0])),
        layer.post_attention_layernorm.register_forward_hook(lambda m, a, out: inputs.__setitem__("mlp", out[0])),
    ]
    zeros = dict(dtype=torch.float64)
    attention = {"norm": torch.zeros(4, **zeros), "reap": torch.zeros(4, **zeros), "count": torch.zeros(4, **zeros)}
    mlp = {"norm": torch.zeros(4, **zeros), "reap": torch.zeros(4, **zeros), "count": torch.zeros(4, **zeros)}
    neuron_sums, heads_sumsq = torch.zeros(4, 24, **zeros), torch.zeros(4, **zeros)

    def route(x, router):
        top_logits, top_experts = torch.topk(F.linear(x, router.layer.weight).float(), 2, dim=-1)
        return top_experts, torch.softmax(top_logits, dim=-1)

    def add(stats, e, out, gates):
        norms = out.norm(dim=-1).double()
        stats["norm"][e] += norms.sum()
        stats["reap"][e] += (norms * gates.double()).sum()
        stats["count"][e] += len(out)

    with torch.no_grad():
        for sample in samples:  # one sample at a time: no padding to exclude
            ids = sample["input_ids"][None]
            model(input_ids=ids)
            x, length = inputs["attention"], ids.shape[1]
            # Attention experts: queries from each token's 2 experts, keys/values from the shared kv_proj.
            experts, gates = route(x, moa.router)
            queries = torch.stack([moa.input_linear.weight[experts[:, k]] @ x[:, :, None] for k in range(2)], dim=1)
            queries = queries.view(length, 4, 8)  # query head k x 2 + j: slot k, KV head j
            keys, values = F.linear(x, layer.self_attention.kv_proj.weight).view(length, 2, 2, 8).unbind(1)
            cos, sin = model.model.rotary_emb(x, torch.arange(length)[None])
            cos, sin = cos[0][:, None], sin[0][:, None]
            queries, keys = queries * cos + _rotate_half(queries) * sin, keys * cos + _rotate_half(keys) * sin
            keys, values = keys.repeat(1, 2, 1), values.repeat(1, 2, 1)  # query head h reads KV head h % 2
            logits = torch.einsum("qhd,khd->hqk", queries, keys) * 8**-0.5
            logits = logits.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf"))
            heads = torch.einsum("hqk,khd->qhd", torch.softmax(logits, dim=-1), values)  # [tokens, 4 heads, 8]
            heads_sumsq += heads.norm(dim=-1).double().mean(dim=0) ** 2  # sequence mean, batch L2
            per_slot = heads.reshape(length, 2, 16)
            for e in range(4):
                token, slot = torch.where(experts == e)
                add(attention, e, F.linear(per_slot[token, slot], moa.output_linear.weight[e]), gates[token, slot])
            # MoE experts.
            x = inputs["mlp"]
            experts, gates = route(x, moe.router)
            for e in range(4):
                token, slot = torch.where(experts == e)
                gate, up = F.linear(x[token], moe.input_linear.weight[e]).chunk(2, dim=-1)
                act = F.silu(gate) * up
                add(mlp, e, F.linear(act, moe.output_linear.weight[e]), gates[token, slot])
                neuron_sums[e] += act.abs().double().sum(0)
    for handle in handles:
        handle.remove()

    torch.testing.assert_close(
        scores.attention_expert_scores("output_norm")[1], attention["norm"] / attention["count"]
    )
    torch.testing.assert_close(scores.attention_expert_scores("reap")[1], attention["reap"] / attention["count"])
    torch.testing.assert_close(scores.attention_expert_scores("frequency")[1], attention["count"])
    torch.testing.assert_close(scores.expert_scores("output_norm")[1], mlp["norm"] / mlp["count"])
    torch.testing.assert_close(scores.expert_scores("reap")[1], mlp["reap"] / mlp["count"])
    torch.testing.assert_close(scores.expert_scores("frequency")[1], mlp["count"])
    torch.testing.assert_close(scores.expert_neuron_scores()[1], neuron_sums / mlp["count"][:, None])
    torch.testing.assert_close(scores.head_scores("l2")[1], heads_sumsq.sqrt())
    torch.testing.assert_close(scores.kv_group_scores("l2")[1], heads_sumsq.view(2, 2).sum(0).sqrt())
    assert attention["count"].sum() == mlp["count"].sum() == 2 * scores.num_tokens


def test_padding_is_excluded_from_attention_expert_and_head_statistics():
    model = tiny_model("jetmoe")
    samples = random_samples(4, ragged=False)
    padded = [
        {
            "input_ids": torch.cat([s["input_ids"], torch.full((5,), 7)]),
            "attention_mask": torch.cat([s["attention_mask"], torch.zeros(5, dtype=torch.long)]),
        }
        for s in samples
    ]
    config = PrunedConfig(calibration_samples=4, calibration_batch_size=4)
    a = estimate_importance(model, samples, config, show_progress=False)
    b = estimate_importance(model, padded, config, show_progress=False)
    for name in ("frequency", "output_norm", "reap"):
        torch.testing.assert_close(a.attention_expert_scores(name), b.attention_expert_scores(name))
        torch.testing.assert_close(a.expert_scores(name), b.expert_scores(name))
    torch.testing.assert_close(a.head_scores(), b.head_scores())


def test_each_block_keeps_its_top_experts_and_the_top_kv_head_as_sliced_originals():
    model = tiny_model("jetmoe")
    original = copy.deepcopy(model)
    scores = estimate_importance(model, random_samples(8), PrunedConfig(**CALIBRATION), show_progress=False)
    target = PrunedConfig(num_experts=2, moe_intermediate_size=16, num_key_value_heads=1, num_attention_heads=2)
    prune_model(model, target, scores=scores)
    record = model.pruning_record

    def top(values, k):
        return torch.sort(torch.topk(values, k).indices).values

    for i in range(4):
        src, dst = get_decoder_layers(original)[i], get_decoder_layers(model)[i]
        # MoE block: its own experts, and each kept expert its own neurons ([gate; up] rows, down columns).
        kept = top(scores.expert_scores()[i], 2)
        assert record.experts[i] == kept.tolist()
        torch.testing.assert_close(dst.mlp.router.layer.weight, src.mlp.router.layer.weight[kept])
        for j, e in enumerate(kept.tolist()):
            neurons = top(scores.expert_neuron_scores()[i, e], 16)
            assert record.expert_neurons[i][j] == neurons.tolist()
            rows = torch.cat([neurons, neurons + 24])
            torch.testing.assert_close(dst.mlp.input_linear.weight[j], src.mlp.input_linear.weight[e][rows])
            torch.testing.assert_close(dst.mlp.output_linear.weight[j], src.mlp.output_linear.weight[e][:, neurons])
        # Attention experts: their own kept set, and the kept KV head in kv_proj (k and v) and in every expert.
        kept = top(scores.attention_expert_scores()[i], 2)
        assert record.attention_experts[i] == kept.tolist()
        kv = int(scores.kv_group_scores()[i].argmax())
        assert record.kv_heads[i] == [kv]
        head = torch.arange(8) + 8 * kv
        moa_src, moa_dst = src.self_attention.experts, dst.self_attention.experts
        torch.testing.assert_close(moa_dst.router.layer.weight, moa_src.router.layer.weight[kept])
        torch.testing.assert_close(moa_dst.input_linear.weight, moa_src.input_linear.weight[kept][:, head])
        torch.testing.assert_close(moa_dst.output_linear.weight, moa_src.output_linear.weight[kept][:, :, head])
        kv_rows = torch.cat([head, head + 16])
        torch.testing.assert_close(dst.self_attention.kv_proj.weight, src.self_attention.kv_proj.weight[kv_rows])
        torch.testing.assert_close(moa_dst.bias, moa_src.bias)
        torch.testing.assert_close(dst.mlp.bias, src.mlp.bias)


@pytest.mark.parametrize(
    "options",
    [
        {"expert_importance": "reap"},
        {"expert_importance": "frequency"},
        {"importance": "magnitude"},
        {"importance": "random"},
    ],
    ids=["reap", "frequency", "magnitude", "random"],
)
def test_every_expert_estimator_and_baseline_prunes_jetmoe(options, tmp_path):
    model = tiny_model("jetmoe")
    source = copy.deepcopy(model.config)
    config = PrunedConfig(**AXES["all"], **CALIBRATION, depth_method="block_influence", **options)
    prune_model(model, config, random_samples(8), show_progress=False)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(source, config)
    assert len(model.pruning_record.attention_experts) == len(model.pruning_record.experts) == 3
    model.save_pretrained(tmp_path)
    _reload_exactly(model, tmp_path)


def test_baseline_scores_cover_the_attention_experts_and_heads():
    model = tiny_model("jetmoe")
    magnitude = magnitude_importance(model)
    layer = get_decoder_layers(model)[2]
    moa, kv_proj = layer.self_attention.experts, layer.self_attention.kv_proj.weight
    expected = (moa.input_linear.weight.pow(2).sum((1, 2)) + moa.output_linear.weight.pow(2).sum((1, 2))).sqrt()
    torch.testing.assert_close(magnitude.attention_expert_scores()[2], expected.double())
    per_kv = [
        moa.input_linear.weight[:, 8 * j : 8 * j + 8].pow(2).sum()
        + moa.output_linear.weight[:, :, 8 * j : 8 * j + 8].pow(2).sum()
        + kv_proj[8 * j : 8 * j + 8].pow(2).sum()
        + kv_proj[16 + 8 * j : 16 + 8 * j + 8].pow(2).sum()
        for j in range(2)
    ]
    torch.testing.assert_close(magnitude.kv_group_scores()[2], torch.stack(per_kv).sqrt().double())
    rand = random_importance(model.config, seed=3)
    assert rand.attention_experts["score"].shape == (4, 4) and rand.heads["score"].shape == (4, 4)
    assert torch.equal(rand.heads["score"], random_importance(model.config, seed=3).heads["score"])


def test_jetmoe_scores_save_and_load(tmp_path):
    model = tiny_model("jetmoe")
    scores = estimate_importance(model, random_samples(8), PrunedConfig(**CALIBRATION), show_progress=False)
    scores.save(tmp_path)
    loaded = ImportanceScores.load(tmp_path)
    for name in ("output_norm", "reap", "frequency"):
        torch.testing.assert_close(loaded.attention_expert_scores(name), scores.attention_expert_scores(name))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    target = PrunedConfig(num_experts=2, num_key_value_heads=1, num_attention_heads=2)
    prune_model(a, target, scores=scores)
    prune_model(b, target, scores=loaded)
    torch.testing.assert_close(a(IDS).logits, b(IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"num_attention_heads": 2}, r"num_key_value_heads=2 means num_attention_heads=4"),
        ({"num_key_value_heads": 1}, "use num_attention_heads <= 2"),
        ({"num_key_value_heads": 1, "num_attention_heads": 1}, "num_key_value_heads=1 means num_attention_heads=2"),
        ({"num_experts": 1}, "num_experts_per_tok=2"),
        ({"intermediate_size": 16}, "moe_intermediate_size"),
    ],
)
def test_bad_jetmoe_targets_are_refused_before_any_work(fields, message):
    model = tiny_model("jetmoe")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        prune_model(model, PrunedConfig(**fields), calibration_data=None)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
