"""`structures/attention_heads.py`: head statistics from the `o_proj` input, magnitude scores, grouped-query selection,
the residual-merge pairs, slicing of q/k/v (or fused qkv), `o_proj`, q/k norms over heads and attention sinks, the
config fields and cached head counts, and the parameter-count terms, each called directly on tiny models."""

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import ARCHITECTURE_NAMES, MOE_ARCHITECTURE_NAMES, _static_scores, logits, n_params, tiny_model
from structure_helpers import collect as _collect
from structure_helpers import samples as _samples

from hf_minitron import ImportanceScores, PrunedConfig, count_parameters
from hf_minitron.architectures import ARCHITECTURES, get_architecture, get_decoder_layers, model_shape
from hf_minitron.pruning.prune import PruningRecord
from hf_minitron.pruning.structures import attention_heads, structures_of


HEAD_DIM = 8
# Every family with grouped-query heads (JetMoE's belong to its attention experts, DeepSeek-V3's are MLA's:
# test_latent_attention_heads.py); OLMoE derives head_dim from hidden / heads, so its heads are pruned only together
# with the hidden size (tested in test_moe.py).
HEAD_FAMILIES = ARCHITECTURE_NAMES + [m for m in MOE_ARCHITECTURE_NAMES if m not in ("jetmoe", "olmoe", "deepseek_v3")]
HEAD_FAMILIES += ["nemotron_h", "qwen3_next", "qwen3_5_text", "qwen3_5_moe_text"]
GATED = ["qwen3_next", "qwen3_5_text"]  # q_proj rows [query; gate] per head


def _prune(model, scores, **targets):
    """This structure's steps of `prune_model`: select and slice, then its config fields and its modules' sizes."""
    spec = get_architecture(model.config)
    source = model_shape(model.config)
    config = PrunedConfig(**targets)
    target = config.resolve(model.config)
    kept_layers = list(range(source["num_hidden_layers"]))
    record = PruningRecord({}, source, target, kept_layers, [])
    layers = get_decoder_layers(model)
    with torch.no_grad():
        attention_heads.prune(model, layers, spec, scores, source, target, kept_layers, record, config)
    attention_heads.update_config(model.config, spec, source, target)
    # Every structure's cached sizes, in order, as `prune_model` does: `num_heads` is also the name of a Mamba mixer's
    # head count, which this module's `sync_modules` sets and `mamba_heads.sync_modules` sets back.
    for structure in structures_of(spec):
        structure.sync_modules(model, model.config, spec)
    return record


def _random_head_scores(model, seed: int = 1):
    shape = model_shape(model.config)
    g = torch.Generator().manual_seed(seed)
    heads = torch.rand(shape["num_hidden_layers"], shape["num_attention_heads"], generator=g, dtype=torch.float64)
    return heads, _static_scores(model, heads=heads)


def _tensor(layer, path: str) -> torch.Tensor:
    """The weight of the module at `path`, or the parameter at `path`."""
    try:
        return layer.get_submodule(path).weight
    except AttributeError:
        owner, _, name = path.rpartition(".")
        return getattr(layer.get_submodule(owner), name)


# ---------------------------------------------------------------------------------------------- which families
def test_present_exactly_for_families_with_their_own_query_heads():
    present = {name for name, spec in ARCHITECTURES.items() if attention_heads.present(spec)}
    assert present == set(ARCHITECTURES) - {"jetmoe", "deepseek_v3"}  # attention experts; latent attention heads
    assert attention_heads in structures_of(ARCHITECTURES["llama"])
    assert attention_heads not in structures_of(ARCHITECTURES["jetmoe"])


# ---------------------------------------------------------------------------------------------- scores
def test_hooks_record_each_samples_mean_head_norm_over_its_unmasked_tokens():
    model = tiny_model("llama")
    samples = _samples()
    collector = _collect(model, attention_heads, samples, how="mean")
    stats = collector.stats[(attention_heads.KEY, 2, 0)]
    seen = []
    o_proj = get_decoder_layers(model)[2].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0][0]))
    with torch.no_grad():
        for s in samples:  # one unpadded sample at a time
            model(input_ids=s["input_ids"][None])
    handle.remove()
    per_sample = torch.stack([x.view(len(x), 4, HEAD_DIM).double().norm(dim=-1).mean(0) for x in seen])
    torch.testing.assert_close(stats["sum"], per_sample.sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["sumsq"], per_sample.pow(2).sum(0), rtol=1e-5, atol=1e-6)
    assert attention_heads.sites(get_architecture(model.config)) == [(1, "heads", 0, "input of self_attn.o_proj")]


def test_a_dead_head_scores_lowest_and_removing_it_keeps_the_logits():
    model = tiny_model("llama", num_key_value_heads=4)  # MHA: each head owns its value rows
    with torch.no_grad():
        for layer in get_decoder_layers(model):
            layer.self_attn.v_proj.weight[1 * HEAD_DIM : 3 * HEAD_DIM] = 0  # heads 1 and 2 output nothing
    before = logits(model)
    collector = _collect(model, attention_heads, _samples())
    stacked = collector.stacked(attention_heads.KEY, 4, 1, ("sum", "sumsq"), "cpu")
    importance = ImportanceScores("activation", "mean", 4, 0, model_shape(model.config), heads=stacked)
    for agg in ("l2", "mean"):
        head_scores = attention_heads.scores(importance, agg)
        assert head_scores.shape == (4, 4)
        assert (head_scores[:, [1, 2]] == 0).all() and (head_scores[:, [0, 3]] > 0).all()
    record = _prune(model, importance, num_attention_heads=2, num_key_value_heads=2)
    assert record.heads == {i: [0, 3] for i in range(4)} and record.kv_heads == record.heads
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)


def test_group_scores_are_the_l2_norm_of_each_groups_query_heads():
    heads = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0, 2.0]], dtype=torch.float64)  # 6 query heads, 3 KV groups
    importance = SimpleNamespace(
        heads={"score": heads}, num_samples=1, model_shape={"num_key_value_heads": 3}, attention_experts={}
    )
    grouped = attention_heads.group_scores(importance, "l2")
    torch.testing.assert_close(grouped, torch.tensor([[5**0.5, 5.0, 2.0]], dtype=torch.float64))
    # JetMoE's order `[top_k, kv_heads]`: query head k x kv_heads + j reads KV head j.
    importance.attention_experts = {"count": torch.ones(1, 4)}
    repeated = attention_heads.group_scores(importance, "l2")
    torch.testing.assert_close(repeated, torch.tensor([[17**0.5, 2.0, 13**0.5]], dtype=torch.float64))


@pytest.mark.parametrize("model_type", ["llama", "phi3", "qwen2"])
def test_magnitude_is_the_norm_of_each_heads_query_rows_and_output_columns(model_type):
    model = tiny_model(model_type)
    spec = get_architecture(model.config)
    layer = get_decoder_layers(model)[1]
    attn = layer.self_attn
    q = attn.qkv_proj.weight[: 4 * HEAD_DIM] if spec.qkv_proj else attn.q_proj.weight
    o = attn.o_proj.weight
    expected = torch.stack(
        [
            (q[h * HEAD_DIM : (h + 1) * HEAD_DIM].pow(2).sum() + o[:, h * HEAD_DIM : (h + 1) * HEAD_DIM].pow(2).sum())
            for h in range(4)
        ]
    ).sqrt()
    magnitude = attention_heads.magnitude(layer, spec, model_shape(model.config))
    torch.testing.assert_close(magnitude, expected.detach())
    with torch.no_grad():  # a head with neither query rows nor output columns scores 0
        q[2 * HEAD_DIM : 3 * HEAD_DIM] = 0
        o[:, 2 * HEAD_DIM : 3 * HEAD_DIM] = 0
    magnitude = attention_heads.magnitude(layer, spec, model_shape(model.config))
    assert magnitude[2] == 0 and int(magnitude.argmin()) == 2


def test_magnitude_of_a_hybrid_layer_without_attention_is_zero():
    model = tiny_model("nemotron_h")
    spec, shape = get_architecture(model.config), model_shape(model.config)
    layers = get_decoder_layers(model)
    assert torch.equal(attention_heads.magnitude(layers[0], spec, shape), torch.zeros(4))  # a Mamba layer
    assert (attention_heads.magnitude(layers[1], spec, shape) > 0).all()  # the attention layer


# ---------------------------------------------------------------------------------------------- selection
def test_select_keeps_whole_groups_then_the_best_heads_in_each():
    heads = torch.tensor([0.1, 0.2, 0.9, 0.8, 0.3, 0.7])  # 3 KV groups of 2: norms 0.22, 1.20, 0.76
    groups, kept = attention_heads.select(heads, num_kv=3, target_heads=2, target_kv=2)
    assert groups.tolist() == [1, 2] and kept.tolist() == [2, 5]
    groups, kept = attention_heads.select(heads, num_kv=3, target_heads=4, target_kv=2)
    assert groups.tolist() == [1, 2] and kept.tolist() == [2, 3, 4, 5]
    # Given KV scores (e.g. JetMoE's) decide the groups, whatever the query heads' norms say.
    groups, kept = attention_heads.select(heads, 3, 2, 2, kv_scores=torch.tensor([3.0, 0.0, 1.0]))
    assert groups.tolist() == [0, 2] and kept.tolist() == [1, 5]


def test_merge_pairs_mirror_around_the_cut_within_each_group():
    scores = torch.tensor([0.4, 0.9, 0.1, 0.7])  # ranks h1 > h3 > h0 > h2
    assert attention_heads.merge_pairs(scores, torch.tensor([1, 3]), num_kv=1) == [(1, 2), (3, 0)]
    assert attention_heads.merge_pairs(scores, torch.tensor([0, 1, 3]), num_kv=1) == [(0, 2)]
    assert attention_heads.merge_pairs(scores, torch.tensor([0, 1, 2, 3]), num_kv=1) == []
    # Two KV groups of two: each kept head absorbs the pruned head of its own group.
    assert attention_heads.merge_pairs(scores, torch.tensor([1, 3]), num_kv=2) == [(1, 0), (3, 2)]
    # MHA (one head per group, kept or removed whole): the layer is the group.
    assert attention_heads.merge_pairs(scores, torch.tensor([1, 3]), num_kv=4) == [(1, 2), (3, 0)]


# ---------------------------------------------------------------------------------------------- slicing
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "phi3", "olmo2", "gpt_oss"])
def test_prune_keeps_exactly_the_selected_rows_columns_norms_and_sinks(model_type):
    model = tiny_model(model_type)
    original = copy.deepcopy(model)
    spec = get_architecture(model.config)
    head_scores, scores = _random_head_scores(model)
    record = _prune(model, scores, num_attention_heads=2, num_key_value_heads=1)
    for i in range(4):
        groups, heads = attention_heads.select(head_scores[i], 2, 2, 1, head_scores[i].view(2, 2).norm(dim=-1))
        assert record.heads[i] == heads.tolist() and record.kv_heads[i] == groups.tolist()
        q_rows = torch.cat([torch.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in heads.tolist()])
        kv_rows = torch.cat([torch.arange(g * HEAD_DIM, (g + 1) * HEAD_DIM) for g in groups.tolist()])
        src = getattr(get_decoder_layers(original)[i], spec.attention)
        dst = getattr(get_decoder_layers(model)[i], spec.attention)
        if spec.qkv_proj:
            rows = torch.cat([q_rows, kv_rows + 4 * HEAD_DIM, kv_rows + 6 * HEAD_DIM])
            assert torch.equal(dst.qkv_proj.weight, src.qkv_proj.weight[rows])
        else:
            assert torch.equal(dst.q_proj.weight, src.q_proj.weight[q_rows])
            for name in ("k_proj", "v_proj"):
                assert torch.equal(getattr(dst, name).weight, getattr(src, name).weight[kv_rows])
                if getattr(src, name).bias is not None:
                    assert torch.equal(getattr(dst, name).bias, getattr(src, name).bias[kv_rows])
        assert torch.equal(dst.o_proj.weight, src.o_proj.weight[:, q_rows])
        if spec.qk_norm_over_heads:
            assert torch.equal(dst.q_norm.weight, src.q_norm.weight[q_rows])
            assert torch.equal(dst.k_norm.weight, src.k_norm.weight[kv_rows])
        for name in spec.attention_head_parameters:
            assert torch.equal(getattr(dst, name), getattr(src, name)[heads])


@pytest.mark.parametrize("model_type", GATED)
def test_a_gated_heads_query_and_gate_rows_go_with_it_and_a_dead_one_is_removed(model_type):
    model = tiny_model(model_type, num_key_value_heads=4)  # MHA: each head owns its value rows
    spec = get_architecture(model.config)
    attention = [i for i, layer in enumerate(get_decoder_layers(model)) if spec.has(layer, attention_heads.BLOCK)]
    with torch.no_grad():
        for i in attention:
            get_decoder_layers(model)[i].self_attn.v_proj.weight[1 * HEAD_DIM : 3 * HEAD_DIM] = 0  # heads 1, 2 dead
    original = copy.deepcopy(model)
    before = logits(model)
    stacked = _collect(model, attention_heads, _samples()).stacked(attention_heads.KEY, 4, 1, ("sum", "sumsq"), "cpu")
    importance = ImportanceScores("activation", "mean", 4, 0, model_shape(model.config), heads=stacked)
    record = _prune(model, importance, num_attention_heads=2, num_key_value_heads=2)
    assert record.heads == {i: [0, 3] for i in attention}
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)
    for i in attention:
        src, dst = get_decoder_layers(original)[i].self_attn, get_decoder_layers(model)[i].self_attn
        rows = torch.cat([torch.arange(h * 2 * HEAD_DIM, (h + 1) * 2 * HEAD_DIM) for h in (0, 3)])  # query, gate
        assert torch.equal(dst.q_proj.weight, src.q_proj.weight[rows])
        columns = torch.cat([torch.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in (0, 3)])
        assert torch.equal(dst.o_proj.weight, src.o_proj.weight[:, columns])
        assert torch.equal(dst.q_norm.weight, src.q_norm.weight)  # over head_dim: kept


def test_the_head_merge_of_a_gated_query_projection_merges_the_query_rows_and_keeps_the_gates():
    model = tiny_model("qwen3_5_text")
    spec, shape = get_architecture(model.config), model_shape(model.config)
    attn = get_decoder_layers(model)[1].self_attn
    q = attn.q_proj.weight.detach().clone().view(4, 2, HEAD_DIM, -1)  # [head, query / gate, head_dim, hidden]
    scores = torch.tensor([0.9, 0.1, 0.2, 0.8])  # groups (0, 1), (2, 3): keep 0 and 3, merge 1 into 0, 2 into 3
    with torch.no_grad():
        attention_heads.merge_pruned_heads(attn, spec, shape, scores, torch.tensor([0, 3]))
    merged = attn.q_proj.weight.detach().view(4, 2, HEAD_DIM, -1)
    torch.testing.assert_close(merged[0, 0], 2 * q[0, 0] - q[1, 0])
    torch.testing.assert_close(merged[3, 0], 2 * q[3, 0] - q[2, 0])
    assert torch.equal(merged[:, 1], q[:, 1]) and torch.equal(merged[[1, 2]], q[[1, 2]])


@pytest.mark.parametrize("model_type", ["llama", "phi3", "olmo2", "gpt_oss", *GATED])
def test_slicing_every_head_keeps_the_logits_exactly(model_type):
    model = tiny_model(model_type)
    spec, shape = get_architecture(model.config), model_shape(model.config)
    before = logits(model)
    with torch.no_grad():
        for layer in get_decoder_layers(model):
            if spec.has(layer, attention_heads.BLOCK):
                attention_heads.slice_heads(
                    layer.get_submodule(spec.attention), spec, shape, torch.arange(4), torch.arange(2)
                )
    assert torch.equal(logits(model), before)


def test_nothing_to_prune_leaves_the_model_untouched():
    model = tiny_model("llama")
    weights = {n: p for n, p in model.named_parameters()}
    record = _prune(model, _random_head_scores(model)[1])
    assert record.heads == {} and all(p is weights[n] for n, p in model.named_parameters())


# ---------------------------------------------------------------------------------------------- config, sizes, counts
@pytest.mark.parametrize("model_type", HEAD_FAMILIES)
def test_pruned_heads_run_and_match_the_count_terms(model_type):
    model = tiny_model(model_type)
    source_config = copy.deepcopy(model.config)
    spec = get_architecture(model.config)
    target = PrunedConfig(num_attention_heads=2, num_key_value_heads=1)
    _prune(model, _random_head_scores(model)[1], num_attention_heads=2, num_key_value_heads=1)

    c = model.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 1, HEAD_DIM)
    for module in model.modules():
        if isinstance(getattr(module, "num_key_value_groups", None), int):
            assert module.num_key_value_groups == 2
    out = logits(model)
    assert out.shape == (2, 10, 96) and torch.isfinite(out).all()

    # Each role evaluates to the shape the slicing produced, and the terms add up to the model's parameters.
    sizes = attention_heads.count_sizes(model_shape(c)) | {"h": c.hidden_size}
    assert sizes["qkv"] == sizes["q"] + 2 * sizes["kv"] == 4 * HEAD_DIM
    for layer in get_decoder_layers(model):
        if not spec.has(layer, attention_heads.BLOCK):
            continue
        for path, dims in attention_heads.count_roles(spec, layer).items():
            expected = tuple(sizes[d] if isinstance(d, str) else d for d in dims)
            assert tuple(_tensor(layer, path).shape) == expected, path
    assert count_parameters(source_config, target) == n_params(model) < count_parameters(source_config)


def test_count_roles_name_every_head_facing_tensor_of_each_layout():
    llama, phi3 = ARCHITECTURES["llama"], ARCHITECTURES["phi3"]
    assert attention_heads.count_roles(llama, None) == {
        "self_attn.q_proj": ("q", "h"),
        "self_attn.k_proj": ("kv", "h"),
        "self_attn.v_proj": ("kv", "h"),
        "self_attn.o_proj": ("h", "q"),
    }
    assert attention_heads.count_roles(phi3, None) == {
        "self_attn.qkv_proj": ("qkv", "h"),
        "self_attn.o_proj": ("h", "q"),
    }
    olmo2 = attention_heads.count_roles(ARCHITECTURES["olmo2"], None)
    assert olmo2["self_attn.q_norm"] == ("q",) and olmo2["self_attn.k_norm"] == ("kv",)
    assert attention_heads.count_roles(ARCHITECTURES["gpt_oss"], None)["self_attn.sinks"] == ("heads",)
    assert attention_heads.count_roles(ARCHITECTURES["qwen3_next"], None)["self_attn.q_proj"] == ("qg", "h")
    shape = {"num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 16}
    assert attention_heads.count_sizes(shape) == {"heads": 6, "q": 96, "qg": 192, "kv": 32, "qkv": 160}
