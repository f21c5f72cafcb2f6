"""`structures/attention_experts.py`: JetMoE's mixture of attention experts (per-expert query and output projections
around one shared `kv_proj`, query heads = KV heads x top-k, in JetMoE's `[top_k, kv_heads]` order): statistics,
magnitude scores, KV-head and expert slicing, the config fields (and the refusal of head counts JetMoE cannot
express), the sizes its modules cache, and the parameter-count terms, each called directly on a tiny JetMoE."""

import copy

import pytest
import torch
from conftest import _static_scores, logits, n_params, tiny_model
from structure_helpers import collect, prune_steps
from structure_helpers import samples as _samples

from hf_minitron import ImportanceScores, PrunedConfig, count_parameters
from hf_minitron.architectures import ARCHITECTURES, get_architecture, get_decoder_layers, model_shape
from hf_minitron.pruning.structures import attention_experts, attention_heads, routed_experts, structures_of


def _collect(model, batch, how: str = "mean"):
    return collect(model, attention_experts, batch, how)


# The tiny JetMoE: hidden 32, 4 layers, 4 attention experts (2 per token), 2 KV heads of dim 8, so 4 query heads.
HEAD_DIM, KV, TOP_K, EXPERTS, HIDDEN = 8, 2, 2, 4, 32


def _importance(model, heads: dict, experts: dict) -> ImportanceScores:
    scores = _static_scores(model)
    scores.heads, scores.attention_experts, scores.experts = heads, experts, experts
    return scores


def _random_scores(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    heads = torch.rand(4, KV * TOP_K, generator=g, dtype=torch.float64)
    experts = torch.rand(4, EXPERTS, generator=g, dtype=torch.float64)
    return heads, experts, _importance(model, {"score": heads}, {"score": experts})


def _prune(model, scores, **targets):
    return prune_steps(model, scores, (attention_experts, routed_experts), None, None, **targets)


def _moa(layer):
    return layer.self_attention.experts


def _rows(heads) -> torch.Tensor:
    return torch.cat([torch.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in heads])


# ---------------------------------------------------------------------------------------------- which families
def test_present_only_for_a_mixture_of_attention_experts():
    assert [name for name, spec in ARCHITECTURES.items() if attention_experts.present(spec)] == ["jetmoe"]
    spec = ARCHITECTURES["jetmoe"]
    assert attention_experts in structures_of(spec) and attention_heads not in structures_of(spec)


def test_expert_tensors_are_the_query_and_output_projections_of_every_expert():
    model = tiny_model("jetmoe")
    spec = get_architecture(model.config)
    layer = get_decoder_layers(model)[0]
    t = attention_experts.expert_tensors(spec)
    assert (t.first, t.second) == (
        "self_attention.experts.input_linear.weight",
        "self_attention.experts.output_linear.weight",
    )
    assert routed_experts.get_tensor(layer, t.first).shape == (EXPERTS, KV * HEAD_DIM, HIDDEN)
    assert routed_experts.get_tensor(layer, t.second).shape == (EXPERTS, HIDDEN, KV * HEAD_DIM)
    assert not t.gated and t.output_bias == "self_attention.experts.bias"
    assert layer.get_submodule(t.router).weight.shape == (EXPERTS, HIDDEN)


# ---------------------------------------------------------------------------------------------- scores
def test_hooks_record_query_head_norms_in_jetmoes_order_and_expert_statistics():
    model = tiny_model("jetmoe")
    samples = _samples()
    collector = _collect(model, samples)
    heads = collector.stats[(attention_heads.KEY, 1, 0)]
    experts = collector.stats[(attention_experts.KEY, 1, 0)]
    tokens = sum(len(s["input_ids"]) for s in samples)
    assert experts["count"].sum() == TOP_K * tokens  # every unmasked token reaches top_k attention experts
    seen = []  # each token's attention output per selected expert, [tokens, top_k, kv_heads x head_dim]
    moa = _moa(get_decoder_layers(model)[1])
    reduce = moa.reduce  # the MoA's output step, a method (no module to hook): its input in JetMoE's own order

    def spy(layer_input, topo_info):
        seen.append(layer_input[0])
        return reduce(layer_input, topo_info)

    moa.reduce = spy
    try:
        with torch.no_grad():
            for s in samples:  # one unpadded sample at a time
                model(input_ids=s["input_ids"][None])
    finally:
        del moa.reduce
    per_sample = torch.stack([x.reshape(len(x), TOP_K * KV, HEAD_DIM).double().norm(dim=-1).mean(0) for x in seen])
    torch.testing.assert_close(heads["sum"], per_sample.sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(heads["sumsq"], per_sample.pow(2).sum(0), rtol=1e-5, atol=1e-6)
    sites = attention_experts.sites(get_architecture(model.config))
    assert [site[1] for site in sites] == [attention_heads.KEY, attention_experts.KEY]


def test_a_dead_kv_head_scores_zero_and_removing_it_keeps_the_logits():
    model = tiny_model("jetmoe")
    with torch.no_grad():
        for layer in get_decoder_layers(model):
            layer.self_attention.kv_proj.weight[KV * HEAD_DIM : (KV + 1) * HEAD_DIM] = 0  # KV head 0's values
    before = logits(model)
    collector = _collect(model, _samples())
    heads = collector.stacked(attention_heads.KEY, KV * TOP_K, 1, ("sum", "sumsq"), "cpu")
    experts = collector.stacked(attention_experts.KEY, EXPERTS, 1, routed_experts.STATISTICS, "cpu")
    importance = _importance(model, heads, experts)
    importance.num_samples = 4
    kv_scores = attention_heads.group_scores(importance, "l2")
    assert kv_scores.shape == (4, KV) and (kv_scores[:, 0] == 0).all() and (kv_scores[:, 1] > 0).all()
    assert (attention_heads.scores(importance, "l2")[:, [0, KV]] == 0).all()  # query heads 0 and 2 read KV head 0
    record = _prune(model, importance, num_key_value_heads=1, num_attention_heads=TOP_K)
    assert record.kv_heads == {i: [1] for i in range(4)} and record.heads == {i: [1, 3] for i in range(4)}
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)


def test_expert_magnitude_and_a_zeroed_expert_is_dropped():
    model = tiny_model("jetmoe")
    spec, shape = get_architecture(model.config), model_shape(model.config)
    layer = get_decoder_layers(model)[2]
    moa = _moa(layer)
    first, second = moa.input_linear.weight, moa.output_linear.weight
    expected = (first.pow(2).sum((1, 2)) + second.pow(2).sum((1, 2))).sqrt().detach()
    torch.testing.assert_close(attention_experts.magnitude(layer, spec, shape), expected)
    with torch.no_grad():
        first[3], second[3] = 0, 0
    magnitude = attention_experts.magnitude(layer, spec, shape)
    assert magnitude[3] == 0 and 3 not in routed_experts.select_experts(magnitude, 3).tolist()


def test_head_magnitude_shares_each_kv_heads_norm_evenly_among_the_query_heads_reading_it():
    model = tiny_model("jetmoe")
    spec, shape = get_architecture(model.config), model_shape(model.config)
    layer = get_decoder_layers(model)[0]
    moa, kv_proj = _moa(layer), layer.self_attention.kv_proj.weight
    per_kv = []
    for j in range(KV):
        rows = _rows([j])
        squares = moa.input_linear.weight[:, rows].pow(2).sum() + moa.output_linear.weight[:, :, rows].pow(2).sum()
        squares = squares + kv_proj[rows].pow(2).sum() + kv_proj[rows + KV * HEAD_DIM].pow(2).sum()
        per_kv.append(squares.detach())
    per_kv = torch.stack(per_kv)
    magnitude = attention_experts.head_magnitude(layer, spec, shape)
    torch.testing.assert_close(magnitude, (per_kv / TOP_K).sqrt().repeat(TOP_K))  # `[top_k, kv_heads]` order
    # So that a KV head's score (the L2 norm over its query heads) is its own norm.
    importance = _importance(model, {"score": magnitude[None].double()}, {"score": torch.ones(1, EXPERTS)})
    torch.testing.assert_close(attention_heads.group_scores(importance, "l2")[0], per_kv.sqrt().double())


# ---------------------------------------------------------------------------------------------- slicing
def test_prune_keeps_exactly_the_selected_kv_heads_and_experts():
    model = tiny_model("jetmoe")
    original = copy.deepcopy(model)
    head_scores, expert_scores, scores = _random_scores(model)
    record = _prune(model, scores, num_experts=2, num_key_value_heads=1, num_attention_heads=TOP_K)
    kv_scores = head_scores.view(4, TOP_K, KV).norm(dim=1)
    for i in range(4):
        kept_kv = int(kv_scores[i].argmax())
        kept_experts = torch.sort(torch.topk(expert_scores[i], 2).indices).values
        assert record.kv_heads[i] == [kept_kv] and record.heads[i] == [kept_kv, kept_kv + KV]
        assert record.attention_experts[i] == kept_experts.tolist()
        src, dst = get_decoder_layers(original)[i].self_attention, get_decoder_layers(model)[i].self_attention
        rows = _rows([kept_kv])
        assert torch.equal(dst.kv_proj.weight, src.kv_proj.weight[torch.cat([rows, rows + KV * HEAD_DIM])])
        assert torch.equal(dst.experts.input_linear.weight, src.experts.input_linear.weight[kept_experts][:, rows])
        assert torch.equal(
            dst.experts.output_linear.weight, src.experts.output_linear.weight[kept_experts][:, :, rows]
        )
        assert torch.equal(dst.experts.router.layer.weight, src.experts.router.layer.weight[kept_experts])
        assert torch.equal(dst.experts.bias, src.experts.bias)


def test_slicing_every_kv_head_and_expert_keeps_the_logits_exactly():
    model = tiny_model("jetmoe")
    spec = get_architecture(model.config)
    before = logits(model)
    with torch.no_grad():
        for layer in get_decoder_layers(model):
            attention_experts.slice_kv_heads(layer, spec, torch.arange(KV), KV, HEAD_DIM)
            routed_experts.slice_experts(layer, attention_experts.expert_tensors(spec), torch.arange(EXPERTS))
            attention_experts.slice_hidden(layer, spec, torch.arange(HIDDEN))
    assert torch.equal(logits(model), before)


def test_slice_hidden_keeps_the_channels_of_kv_proj_every_expert_the_router_and_the_bias():
    model = tiny_model("jetmoe")
    spec = get_architecture(model.config)
    layer = get_decoder_layers(model)[0]
    src = copy.deepcopy(layer.self_attention)
    kept = torch.tensor([0, 7, 8, 20, 31])
    reads, writes = attention_experts.hidden_weights(layer, spec)
    assert reads[0] is layer.self_attention.kv_proj.weight and len(reads) == 3 and len(writes) == 1
    with torch.no_grad():
        attention_experts.slice_hidden(layer, spec, kept)
    dst = layer.self_attention
    assert torch.equal(dst.kv_proj.weight, src.kv_proj.weight[:, kept])
    assert torch.equal(dst.experts.input_linear.weight, src.experts.input_linear.weight[:, :, kept])
    assert torch.equal(dst.experts.output_linear.weight, src.experts.output_linear.weight[:, kept])
    assert torch.equal(dst.experts.router.layer.weight, src.experts.router.layer.weight[:, kept])
    assert torch.equal(dst.experts.bias, src.experts.bias[kept])


# ---------------------------------------------------------------------------------------------- config, counts
def test_update_config_refuses_query_heads_other_than_kv_heads_times_top_k():
    config = copy.deepcopy(tiny_model("jetmoe").config)
    spec = get_architecture(config)
    with pytest.raises(ValueError, match=r"num_attention_heads=3 .*num_key_value_heads=1 means num_attention_heads=2"):
        attention_experts.update_config(config, spec, {}, {"num_attention_heads": 3, "num_key_value_heads": 1})
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)  # unchanged
    attention_experts.update_config(config, spec, {}, {"num_attention_heads": 2, "num_key_value_heads": 1})
    assert (config.num_attention_heads, config.num_key_value_heads) == (2, 1)


def test_pruned_attention_experts_run_cache_their_sizes_and_match_the_count_terms():
    model = tiny_model("jetmoe")
    source_config = copy.deepcopy(model.config)
    spec = get_architecture(model.config)
    targets = dict(num_experts=2, num_key_value_heads=1, num_attention_heads=TOP_K)
    _prune(model, _random_scores(model)[2], **targets)
    for layer in get_decoder_layers(model):
        attn = layer.self_attention
        assert (attn.num_heads, attn.num_key_value_heads, attn.kv_projection_size) == (TOP_K, 1, HEAD_DIM)
        assert (attn.experts.num_experts, attn.experts.hidden_size, attn.experts.router.num_experts) == (
            2,
            HEAD_DIM,
            2,
        )
        assert (attn.experts.input_linear.output_size, attn.experts.output_linear.input_size) == (HEAD_DIM, HEAD_DIM)
    out = logits(model)
    assert out.shape == (2, 10, 96) and torch.isfinite(out).all()

    sizes = attention_experts.count_sizes(model_shape(model.config)) | {"h": HIDDEN}
    assert (sizes["kv"], sizes["2kv"], sizes["E"], sizes["R"]) == (HEAD_DIM, 2 * HEAD_DIM, 2, 2)
    for layer in get_decoder_layers(model):
        for path, dims in attention_experts.count_roles(spec, layer).items():
            try:
                tensor = layer.get_submodule(path).weight
            except AttributeError:
                owner, _, name = path.rpartition(".")
                tensor = getattr(layer.get_submodule(owner), name, None)
            if isinstance(tensor, torch.nn.Parameter):
                assert tuple(tensor.shape) == tuple(sizes[d] for d in dims), path
    counted = count_parameters(source_config, PrunedConfig(**targets))
    assert counted == n_params(model) < count_parameters(source_config)
