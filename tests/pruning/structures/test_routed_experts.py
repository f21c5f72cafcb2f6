"""`structures/routed_experts.py`: both expert layouts (transformers' experts module, incl. GPT-OSS's transposed,
biased, interleaved one, and JetMoE's ScatterMoE weights), the instrumented forward and its observers, the expert
statistics and magnitude scores, grouped selection, slicing of experts and routers (biases and Nemotron-H's correction
bias buffer too), the config field and cached counts, and the parameter-count terms, called directly on tiny models."""

import copy

import pytest
import torch
from conftest import MOE_ARCHITECTURE_NAMES, _static_scores, logits, n_params, tiny_model
from structure_helpers import collect as _collect
from structure_helpers import padded as _padded
from structure_helpers import samples as _samples

from hf_minitron import PrunedConfig, count_parameters
from hf_minitron.architectures import ARCHITECTURES, get_architecture, get_decoder_layers, model_shape
from hf_minitron.pruning.prune import PruningRecord
from hf_minitron.pruning.structures import attention_experts, routed_experts, structures_of


# Nemotron-H with MoE blocks (as in test_hybrid_moe.py): 8 ungated routed experts in 2 groups behind a sigmoid router.
NEMOTRON_H_MOE = dict(
    layers_block_type=["linear_attention", "moe", "full_attention", "mlp", "moe"],
    num_hidden_layers=5,
    n_routed_experts=8,
    n_group=2,
    topk_group=1,
    num_experts_per_tok=2,
    moe_intermediate_size=24,
    moe_shared_expert_intermediate_size=40,
)
FAMILIES = MOE_ARCHITECTURE_NAMES + ["nemotron_h", "qwen3_next", "qwen3_5_moe_text"]
FAMILIES += ["granitemoehybrid"]
# transformers' `use_experts_implementation` modules (Llama 4's experts module is not one: no routing argument).
TRANSFORMERS_LAYOUT = [m for m in FAMILIES if m not in ("jetmoe", "llama4_text")]
WIDTH = 24


def _model(model_type: str, **overrides):
    model = tiny_model(model_type, **(NEMOTRON_H_MOE if model_type == "nemotron_h" else {}), **overrides)
    if model_type == "nemotron_h":  # a buffer (tiny_model perturbs parameters only): make it matter
        g = torch.Generator().manual_seed(0)
        for layer in _moe_layers(model):
            bias = layer.mixer.gate.e_score_correction_bias
            bias.copy_(torch.rand(bias.shape, generator=g) * 0.1)
    return model


def _moe_layers(model) -> list:
    spec = get_architecture(model.config)
    return [layer for layer in get_decoder_layers(model) if spec.has(layer, routed_experts.BLOCK)]


def _num_experts(model) -> int:
    return model_shape(model.config)["num_experts"]


def _importance(model, experts: dict):
    scores = _static_scores(model)
    scores.experts = experts
    scores.attention_experts = experts  # JetMoE: its attention experts get the same scores
    return scores


def _random_scores(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    experts = torch.rand(model.config.num_hidden_layers, _num_experts(model), generator=g, dtype=torch.float64)
    return experts, _importance(model, {"score": experts})


def _prune(model, scores, expert_importance: str = "reap", **targets):
    """This structure's steps of `prune_model`, then every structure's cached sizes in order, as `prune_model` does."""
    spec = get_architecture(model.config)
    source = model_shape(model.config)
    config = PrunedConfig(expert_importance=expert_importance, **targets)
    target = config.resolve(model.config)
    kept_layers = list(range(source["num_hidden_layers"]))
    record = PruningRecord({}, source, target, kept_layers, [])
    layers = get_decoder_layers(model)
    # JetMoE's attention experts are as many as its MoE experts (one config field): they are pruned with them.
    pruned = (routed_experts, attention_experts) if spec.attention_experts else (routed_experts,)
    with torch.no_grad():
        for structure in pruned:
            structure.prune(model, layers, spec, scores, source, target, kept_layers, record, config)
    routed_experts.update_config(model.config, spec, source, target)
    for structure in structures_of(spec):
        structure.sync_modules(model, model.config, spec)
    return record


# ---------------------------------------------------------------------------------------------- which families
def test_present_exactly_for_families_with_moe_blocks():
    assert {name for name, spec in ARCHITECTURES.items() if routed_experts.present(spec)} == set(FAMILIES)


# ---------------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("model_type", FAMILIES)
def test_expert_tensors_describe_every_expert_parameter_and_where_the_width_lies(model_type):
    model = _model(model_type)
    spec = get_architecture(model.config)
    layer = _moe_layers(model)[0]
    t = routed_experts.expert_tensors(layer, spec)
    experts = _num_experts(model)
    first, second = routed_experts.get_tensor(layer, t.first), routed_experts.get_tensor(layer, t.second)
    assert first.shape[routed_experts.first_width_dim(t)] == (2 if t.gated else 1) * WIDTH
    assert second.shape[routed_experts.second_width_dim(t)] == WIDTH
    owner = layer.get_submodule(t.first.rpartition(".")[0] if t.experts else spec.moe)
    per_expert = {f"{t.experts or spec.moe}.{n}" for n, p in owner.named_parameters() if p.shape[0] == experts}
    per_expert -= {t.router + ".weight"}  # JetMoE's router sits in the block: [experts, hidden] too
    assert set(t.weights) == per_expert
    assert all(routed_experts.get_tensor(layer, path).shape[0] == experts for path in t.weights)
    assert layer.get_submodule(t.router).weight.shape == (experts, 32)
    layouts = {"gpt_oss": (True, False), "llama4_text": (True, True)}
    assert (t.transposed, t.concatenated) == layouts.get(model_type, (False, True))
    assert t.gated == (model_type != "nemotron_h")


@pytest.mark.parametrize("model_type", TRANSFORMERS_LAYOUT)
def test_expert_forward_equals_the_experts_module_on_its_tokens(model_type):
    model = _model(model_type)
    spec = get_architecture(model.config)
    experts = _moe_layers(model)[0].get_submodule(f"{spec.moe}.{spec.experts}")
    x = torch.randn(5, 32)
    with torch.no_grad():
        for e in range(_num_experts(model)):
            act, out = routed_experts.expert_forward(experts, e, x)
            assert act.shape == (5, WIDTH)
            reference = experts(x, torch.full((5, 1), e), torch.ones(5, 1))
            torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- instrumentation
@pytest.mark.parametrize("model_type", FAMILIES)
def test_instrumented_forward_is_the_models_and_every_routed_token_reaches_each_observer(model_type):
    model = _model(model_type)
    spec = get_architecture(model.config)
    ids = torch.arange(3, 19)[None]
    before = logits(model, ids)
    layer = _moe_layers(model)[0]
    t = routed_experts.expert_tensors(layer, spec)
    calls = {"a": [], "b": []}
    handle = routed_experts.instrument(layer, t, lambda e, token_idx, *rest: calls["a"].append((e, len(token_idx))))
    joined = routed_experts.instrument(layer, t, lambda e, token_idx, *rest: calls["b"].append((e, len(token_idx))))
    assert handle is not None and joined is None  # one instrumentation per block, shared by the structures
    try:
        torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-6)
    finally:
        handle.remove()
    assert calls["a"] == calls["b"] and sum(n for _, n in calls["a"]) == 16 * model.config.num_experts_per_tok
    if t.experts is not None:
        assert "forward" not in vars(layer.get_submodule(t.experts))  # the class's forward again
    calls["a"].clear()
    logits(model, ids)
    assert calls["a"] == []  # removed: no observer is called any more


@pytest.mark.parametrize("model_type", FAMILIES)
def test_expert_statistics_count_the_routed_unmasked_tokens(model_type):
    model = _model(model_type)
    samples = _samples()
    tokens = sum(len(s["input_ids"]) for s in samples)
    collector = _collect(model, routed_experts, samples)
    moe = [i for i, layer in enumerate(get_decoder_layers(model)) if layer in _moe_layers(model)]
    assert sorted({key[1] for key in collector.stats}) == moe
    for i in moe:
        stats = collector.stats[(routed_experts.KEY, i, 0)]
        assert set(stats) == {"output_norm", "reap", "count"} and all(v.dtype == torch.float64 for v in stats.values())
        assert stats["count"].sum() == tokens * model.config.num_experts_per_tok  # padding excluded
        assert ((stats["count"] > 0) == (stats["output_norm"] > 0)).all()
        # Router weights are at most 1, times DeepSeek-V3's routed_scaling_factor.
        bound = getattr(model.config, "routed_scaling_factor", 1.0)
        assert (stats["reap"] <= stats["output_norm"] * bound + 1e-9).all()


def test_reduce_stats_output_norm_reap_frequency_and_static_scores():
    stats = {
        "output_norm": torch.tensor([[6.0, 0.0, 3.0]], dtype=torch.float64),
        "reap": torch.tensor([[2.0, 0.0, 1.5]], dtype=torch.float64),
        "count": torch.tensor([[3.0, 0.0, 1.0]], dtype=torch.float64),
    }
    assert routed_experts.reduce_stats(stats, "output_norm").tolist() == [[2.0, 0.0, 3.0]]
    assert routed_experts.reduce_stats(stats, "reap").tolist() == [[2.0 / 3, 0.0, 1.5]]
    assert routed_experts.reduce_stats(stats, "frequency").tolist() == [[3.0, 0.0, 1.0]]
    static = torch.tensor([[0.5, 0.1]], dtype=torch.float32)
    assert routed_experts.reduce_stats({"score": static}, "reap").dtype == torch.float64


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "jetmoe", "nemotron_h"])
def test_magnitude_is_the_norm_of_every_expert_tensor_and_a_zeroed_expert_is_dropped(model_type):
    model = _model(model_type)
    spec, shape = get_architecture(model.config), model_shape(model.config)
    layer = _moe_layers(model)[0]
    t = routed_experts.expert_tensors(layer, spec)
    tensors = [routed_experts.get_tensor(layer, path) for path in t.weights]
    expected = sum(w.detach().pow(2).flatten(1).sum(1) for w in tensors).sqrt()
    torch.testing.assert_close(routed_experts.magnitude(layer, spec, shape), expected)
    with torch.no_grad():
        for w in tensors:
            w[1] = 0
    magnitude = routed_experts.magnitude(layer, spec, shape)
    assert magnitude[1] == 0
    assert 1 not in routed_experts.select_experts(magnitude, shape["num_experts"] - 2).tolist()


# ---------------------------------------------------------------------------------------------- selection
def test_select_experts_keeps_the_best_of_each_group():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.2, 0.3, 0.05, 0.01])
    assert routed_experts.select_experts(scores, 4).tolist() == [0, 1, 2, 5]
    assert routed_experts.select_experts(scores, 4, groups=2).tolist() == [0, 1, 4, 5]  # 2 per group of 4
    assert routed_experts.select_experts(scores, 8, groups=2).tolist() == list(range(8))


# ---------------------------------------------------------------------------------------------- slicing
@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "jetmoe", "nemotron_h"])
def test_prune_keeps_exactly_the_selected_experts_and_router_rows(model_type):
    model = _model(model_type)
    original = copy.deepcopy(model)
    spec = get_architecture(model.config)
    experts, scores = _random_scores(model)
    target = _num_experts(model) // 2
    record = _prune(model, scores, num_experts=target)
    groups = getattr(model.config, "n_group", None) or 1
    layers = [
        (i, src, dst) for i, (src, dst) in enumerate(zip(get_decoder_layers(original), get_decoder_layers(model)))
    ]
    assert sorted(record.experts) == [i for i, src, _ in layers if spec.has(src, routed_experts.BLOCK)]
    for i, src, dst in layers:
        if i not in record.experts:
            continue
        kept = routed_experts.select_experts(experts[i], target, groups)
        assert record.experts[i] == kept.tolist()
        t = routed_experts.expert_tensors(src, spec)
        for path in t.weights:
            assert torch.equal(routed_experts.get_tensor(dst, path), routed_experts.get_tensor(src, path)[kept])
        src_router, dst_router = src.get_submodule(t.router), dst.get_submodule(t.router)
        assert torch.equal(dst_router.weight, src_router.weight[kept])
        for name in ("bias", "e_score_correction_bias"):
            if getattr(src_router, name, None) is not None:
                assert torch.equal(getattr(dst_router, name), getattr(src_router, name)[kept])
    assert model_shape(model.config)["num_experts"] == target
    for module in model.modules():  # routers, experts, gating and the *ForCausalLM cache the count
        if isinstance(getattr(module, "num_experts", None), int):
            assert module.num_experts == target
    assert torch.isfinite(logits(model)).all()


def test_removing_a_never_routed_expert_keeps_the_logits():
    model = _model("gpt_oss")  # top-k of the router logits, then a softmax over those k only
    with torch.no_grad():
        for layer in get_decoder_layers(model):
            layer.mlp.router.bias[2] = -1e4  # expert 2 never wins a slot
    samples = _samples(lengths=(10,))  # unpadded: the calibration batch is also the input compared below
    ids = _padded(samples)[0]
    before = logits(model, ids)
    stacked = _collect(model, routed_experts, samples).stacked(
        routed_experts.KEY, 4, 1, routed_experts.STATISTICS, "cpu"
    )
    importance = _importance(model, stacked)
    frequency = routed_experts.scores(importance, "frequency")
    assert (frequency[:, 2] == 0).all() and (frequency.sum(1) == 2 * ids.numel()).all()
    record = _prune(model, importance, "frequency", num_experts=3)
    for i, kept in record.experts.items():
        (dropped,) = set(range(4)) - set(kept)
        assert frequency[i, dropped] == 0  # expert 2, or another expert these tokens never reached
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_slicing_every_expert_keeps_the_logits_exactly(model_type):
    model = _model(model_type)
    spec = get_architecture(model.config)
    before = logits(model)
    with torch.no_grad():
        for layer in _moe_layers(model):
            routed_experts.slice_experts(
                layer, routed_experts.expert_tensors(layer, spec), torch.arange(_num_experts(model))
            )
    assert torch.equal(logits(model), before)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss", "jetmoe"])
def test_slice_hidden_keeps_the_hidden_channels_of_every_expert_tensor_router_and_bias(model_type):
    model = _model(model_type)
    spec = get_architecture(model.config)
    layer = _moe_layers(model)[0]
    original = copy.deepcopy(layer)
    t = routed_experts.expert_tensors(layer, spec)
    kept = torch.tensor([1, 4, 8, 30])
    with torch.no_grad():
        routed_experts.slice_hidden(layer, spec, kept)

    def pair(path):
        return routed_experts.get_tensor(original, path), routed_experts.get_tensor(layer, path)

    src, dst = pair(t.first)
    assert torch.equal(dst, src.index_select(1 if t.transposed else 2, kept))
    src, dst = pair(t.second)
    assert torch.equal(dst, src.index_select(2 if t.transposed else 1, kept))
    for path, dim in ((t.second_bias, 1), (t.output_bias, 0)):
        if path is not None:
            src, dst = pair(path)
            assert torch.equal(dst, src.index_select(dim, kept))
    assert torch.equal(layer.get_submodule(t.router).weight, original.get_submodule(t.router).weight[:, kept])
    reads, writes = routed_experts.hidden_weights(original, spec)
    assert all(w.shape[-1] == 32 for w in reads) and all(w.shape[0] == 32 for w in writes)


def test_gather_per_expert_keeps_each_experts_own_indices():
    module = torch.nn.Module()
    original = torch.randn(3, 5, 6)
    module.w = torch.nn.Parameter(original.clone())
    index = torch.tensor([[0, 4], [1, 2], [3, 3]])
    routed_experts.gather_per_expert(module, "w", index, dim=1)
    assert torch.equal(module.w, torch.stack([original[e].index_select(0, index[e]) for e in range(3)]))
    module.w = torch.nn.Parameter(original.clone())
    routed_experts.gather_per_expert(module, "w", index, dim=2)
    assert torch.equal(module.w, torch.stack([original[e].index_select(1, index[e]) for e in range(3)]))


def test_nothing_to_prune_leaves_the_model_untouched():
    model = _model("mixtral")
    weights = dict(model.named_parameters())
    record = _prune(model, _random_scores(model)[1])
    assert record.experts == {} and all(p is weights[n] for n, p in model.named_parameters())


# ---------------------------------------------------------------------------------------------- config, counts
@pytest.mark.parametrize("model_type", FAMILIES)
def test_pruned_experts_match_the_count_terms(model_type):
    model = _model(model_type)
    source_config = copy.deepcopy(model.config)
    spec = get_architecture(model.config)
    target = _num_experts(model) // 2
    _prune(model, _random_scores(model)[1], num_experts=target)
    assert getattr(model.config, spec.num_experts_field) == target
    shape = model_shape(model.config)
    sizes = routed_experts.count_sizes(shape) | {"h": 32, "fe": WIDTH, "2fe": 2 * WIDTH}
    assert sizes["E"] == sizes["R"] == target
    for layer in _moe_layers(model):
        for path, dims in routed_experts.count_roles(spec, layer).items():
            owner, _, name = path.rpartition(".")
            tensor = getattr(layer.get_submodule(owner), name, None)
            if isinstance(tensor, torch.nn.Parameter):
                assert tuple(tensor.shape) == tuple(sizes[d] for d in dims), path
    counted = count_parameters(source_config, PrunedConfig(num_experts=target))
    assert counted == n_params(model) < count_parameters(source_config)
    assert torch.isfinite(logits(model)).all()
