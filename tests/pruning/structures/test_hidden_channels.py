"""`structures/hidden_channels.py`: the residual stream's channels: statistics from the norms feeding each block (or
the blocks' inputs in post-norm families, one slot per block type in hybrids), the one global ranking, magnitude
scores, slicing through every block, norm, the embedding and the LM head (tied or not, Gemma's embedding scale),
the config field and cached sizes (JetMoE's expert blocks excepted), and the parameter-count terms, each called
directly on tiny models."""

import copy

import pytest
import torch
from conftest import (
    ARCHITECTURE_NAMES,
    HYBRID_PATTERN,
    MOE_ARCHITECTURE_NAMES,
    _static_scores,
    logits,
    n_params,
    tiny_model,
)
from structure_helpers import collect, prune_steps
from structure_helpers import samples as _samples

from hf_minitron import PrunedConfig, count_parameters, prune_model, random_importance
from hf_minitron.architectures import ARCHITECTURES, get_architecture, get_decoder_layers
from hf_minitron.pruning.structures import hidden_channels, structures_of


def _collect(model, batch, how: str = "mean"):
    return collect(model, hidden_channels, batch, how)


HIDDEN = 32
# OLMoE derives head_dim from hidden / heads: its hidden size is pruned only together with its heads (test_moe.py).
FAMILIES = (
    ARCHITECTURE_NAMES
    + [m for m in MOE_ARCHITECTURE_NAMES if m != "olmoe"]
    + ["nemotron_h", "qwen3_next", "qwen3_5_text", "qwen3_5_moe_text"]
)


def _random_scores(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.rand(model.config.num_hidden_layers, HIDDEN, generator=g, dtype=torch.float64)
    return hidden, _static_scores(model, hidden=hidden)


def _prune(model, scores, **targets):
    return prune_steps(model, scores, (hidden_channels,), (hidden_channels,), None, **targets)


# ---------------------------------------------------------------------------------------------- which families
def test_present_for_every_family():
    assert all(hidden_channels.present(spec) for spec in ARCHITECTURES.values())
    assert all(structures_of(spec)[-1] is hidden_channels for spec in ARCHITECTURES.values())  # sliced last


# ---------------------------------------------------------------------------------------------- statistics
def test_post_norm_families_score_the_blocks_inputs():
    model = tiny_model("olmo2")  # no norm before attention or the MLP
    samples = _samples()
    collector = _collect(model, samples)
    layer = get_decoder_layers(model)[1]
    seen = {"attention": [], "mlp": []}
    handles = [
        layer.self_attn.register_forward_pre_hook(
            lambda m, a, k: seen["attention"].append(k["hidden_states"][0]), with_kwargs=True
        ),
        layer.mlp.register_forward_pre_hook(lambda m, a: seen["mlp"].append(a[0][0])),
    ]
    with torch.no_grad():
        for s in samples:  # one unpadded sample at a time
            model(input_ids=s["input_ids"][None])
    for handle in handles:
        handle.remove()
    for slot, name in enumerate(("attention", "mlp")):
        per_sample = torch.stack([x.double().abs().mean(0) for x in seen[name]])
        stats = collector.stats[(hidden_channels.KEY, 1, slot)]
        torch.testing.assert_close(stats["sum"], per_sample.sum(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats["sumsq"], per_sample.pow(2).sum(0), rtol=1e-5, atol=1e-6)
    spec = get_architecture(model.config)
    assert hidden_channels.sites(spec) == [(0, "hidden", 0, "input of self_attn"), (2, "hidden", 1, "input of mlp")]


def test_a_hybrid_layer_fills_the_slot_of_its_one_block():
    model = tiny_model("nemotron_h")  # layers: mamba, attention, mlp, mamba, mlp
    collector = _collect(model, _samples())
    slots = sorted(key[1:] for key in collector.stats)
    expected = [
        (i, 0 if kind in ("linear_attention", "full_attention") else 1) for i, kind in enumerate(HYBRID_PATTERN)
    ]
    assert slots == expected


def test_per_layer_scores_reduce_each_slot_then_add_and_the_ranking_sums_the_given_layers():
    g = torch.Generator().manual_seed(0)
    values = torch.rand(5, 3, 2, 4, generator=g, dtype=torch.float64)  # 5 samples' values, [layers, slots, hidden]
    scores = _static_scores(tiny_model("llama"))
    scores.hidden, scores.num_samples = {"sum": values.sum(0), "sumsq": values.pow(2).sum(0)}, 5
    per_layer = hidden_channels.scores_per_layer(scores, "var")
    torch.testing.assert_close(per_layer, values.var(0, unbiased=False).sum(1))  # not the variance of the sum
    torch.testing.assert_close(hidden_channels.scores(scores, "l2"), values.norm(dim=0).sum(1).sum(0))
    torch.testing.assert_close(
        hidden_channels.scores(scores, "mean", layers=[0, 2]), values.mean(0).sum(1)[[0, 2]].sum(0)
    )


def test_a_dead_channel_scores_zero_and_is_the_one_removed():
    model = tiny_model("llama")
    dead = 13
    with torch.no_grad():  # nothing writes channel 13 and the norms zero it: every norm output is 0 there
        model.model.embed_tokens.weight[:, dead] = 0
        for layer in get_decoder_layers(model):
            layer.self_attn.o_proj.weight[dead] = 0
            layer.mlp.down_proj.weight[dead] = 0
            layer.input_layernorm.weight[dead] = 0
            layer.post_attention_layernorm.weight[dead] = 0
    stats = _collect(model, _samples()).stacked(hidden_channels.KEY, HIDDEN, 2, ("sum", "sumsq"), "cpu")
    scores = _static_scores(model)
    scores.hidden, scores.num_samples = stats, 4
    ranking = hidden_channels.scores(scores, "l2")
    assert ranking[dead] == 0 and (ranking.sum() > 0) and int(ranking.argmin()) == dead
    record = _prune(model, scores, hidden_size=HIDDEN - 1)
    assert record.hidden == [c for c in range(HIDDEN) if c != dead]


@pytest.mark.parametrize("model_type", ["llama", "phi3"])
def test_magnitude_is_the_norm_of_every_column_reading_and_row_writing_a_channel_plus_the_embedding(model_type):
    model = tiny_model(model_type)
    spec = get_architecture(model.config)
    layers = get_decoder_layers(model)
    magnitude = hidden_channels.magnitude_all(model, spec, layers)
    assert magnitude.shape == (4, 2, HIDDEN) and not magnitude[:, 1].any()
    embed = model.model.embed_tokens.weight.detach().pow(2).sum(0).sqrt() / 4
    for i, layer in enumerate(layers):
        reads = [
            m.weight for name, m in layer.named_modules() if name.split(".")[-1] in ("q_proj", "k_proj", "v_proj")
        ]
        reads += [m.weight for name, m in layer.named_modules() if name.split(".")[-1] in ("qkv_proj", "gate_proj")]
        reads += [m.weight for name, m in layer.named_modules() if name.split(".")[-1] in ("up_proj", "gate_up_proj")]
        writes = [layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight]
        squares = sum(w.detach().pow(2).sum(0) for w in reads) + sum(w.detach().pow(2).sum(1) for w in writes)
        torch.testing.assert_close(magnitude[i, 0], (squares.sqrt() + embed).double())


# ---------------------------------------------------------------------------------------------- slicing
@pytest.mark.parametrize("model_type", ["llama", "gemma", "qwen2_moe", "gpt_oss", "jetmoe", "nemotron_h", "cohere2"])
def test_every_hidden_axis_keeps_exactly_the_selected_channels(model_type):
    model = tiny_model(model_type)
    original = copy.deepcopy(model)
    hidden, scores = _random_scores(model)
    record = _prune(model, scores, hidden_size=24)
    kept = torch.sort(torch.topk(hidden.sum(0), 24).indices).values
    assert record.hidden == kept.tolist()
    params = dict(model.named_parameters())
    for name, src in original.named_parameters():
        expected = src.detach()
        for dim, (old, new) in enumerate(zip(src.shape, params[name].shape)):
            if old != new:  # only hidden axes change, and each keeps exactly the selected channels
                assert (old, new) == (HIDDEN, 24), name
                expected = expected.index_select(dim, kept)
        assert torch.equal(params[name], expected), name
    assert model.config.hidden_size == 24
    assert model.get_input_embeddings().embedding_dim == 24
    out = logits(model)
    assert out.shape == (2, 10, 96) and torch.isfinite(out).all()


def test_tied_embeddings_stay_tied_and_gemmas_embedding_scale_follows_the_hidden_size():
    model = tiny_model("gemma")
    _prune(model, _random_scores(model)[1], hidden_size=24)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.scalar_embed_scale == 24**0.5
    assert model.model.embed_tokens.embed_scale.item() == pytest.approx(24**0.5)


def test_jetmoes_expert_blocks_keep_their_own_hidden_size():
    model = tiny_model("jetmoe")  # its expert blocks call their expert width `hidden_size`
    _prune(model, _random_scores(model)[1], hidden_size=24)
    for layer in get_decoder_layers(model):
        assert layer.self_attention.experts.hidden_size == 16  # 2 KV heads x head_dim 8
        assert layer.self_attention.experts.input_size == 24
        assert layer.mlp.input_size == 24
    assert torch.isfinite(logits(model)).all()


def test_nothing_to_prune_leaves_the_model_untouched():
    model = tiny_model("llama")
    weights = dict(model.named_parameters())
    record = _prune(model, _random_scores(model)[1])
    assert record.hidden is None and all(p is weights[n] for n, p in model.named_parameters())


# ---------------------------------------------------------------------------------------------- config, counts
@pytest.mark.parametrize("model_type", FAMILIES)
def test_pruned_hidden_size_runs_caches_and_matches_the_count_terms(model_type):
    model = tiny_model(model_type)
    source_config = copy.deepcopy(model.config)
    spec = get_architecture(model.config)
    _prune(model, _random_scores(model)[1], hidden_size=24)
    skip = {id(m) for m in model.modules() if m.__class__.__name__ in ("JetMoeMoA", "JetMoeMoE")}
    for module in model.modules():
        if isinstance(getattr(module, "hidden_size", None), int) and id(module) not in skip:
            assert module.hidden_size == 24, type(module).__name__
    out = logits(model)
    assert out.shape == (2, 10, 96) and torch.isfinite(out).all()
    for layer in get_decoder_layers(model):
        for path, dims in hidden_channels.count_roles(spec, layer).items():
            assert dims == ("h",) and layer.get_submodule(path).weight.shape == (24,)
    assert hidden_channels.count_sizes({"hidden_size": 24}) == {"h": 24}
    assert count_parameters(source_config, PrunedConfig(hidden_size=24)) == n_params(model)


def test_an_moe_hidden_size_grouped_mm_cannot_run_is_refused_before_any_work():
    model = tiny_model("mixtral")
    assert model.config._experts_implementation == "grouped_mm"  # transformers' default for these experts
    before = logits(model)
    with pytest.raises(ValueError, match=r"PrunedConfig.hidden_size=30 would give a model that cannot run"):
        prune_model(model, PrunedConfig(hidden_size=30, num_attention_heads=2), scores=random_importance(model.config))
    assert torch.equal(logits(model), before)  # nothing was sliced
