"""`structures/shared_expert_neurons.py`: the always-active shared expert of an MoE block (Qwen2-MoE, gated; Nemotron-H,
ungated): neuron statistics from flattened or 3-D tokens, magnitude scores, slicing (its gate's columns too), the
family's own config field, and the parameter-count terms, each called directly on tiny models."""

import copy

import pytest
import torch
from conftest import _static_scores, logits, n_params, tiny_model
from structure_helpers import collect as _collect
from structure_helpers import samples as _samples

from hf_minitron import ImportanceScores, PrunedConfig, count_parameters
from hf_minitron.architectures import ARCHITECTURES, get_architecture, get_decoder_layers, model_shape
from hf_minitron.pruning.prune import PruningRecord
from hf_minitron.pruning.structures import shared_expert_neurons, structures_of


# Nemotron-H with MoE blocks (as in test_hybrid_moe.py): 8 routed experts in 2 groups, a shared expert of width 40.
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
FAMILIES = ["qwen2_moe", "nemotron_h", "qwen3_next", "qwen3_5_moe_text"]
WIDTH = 40  # the shared expert's width in both tiny models


def _model(model_type: str):
    return tiny_model(model_type, **(NEMOTRON_H_MOE if model_type == "nemotron_h" else {}))


def _moe_layers(model) -> list[int]:
    spec = get_architecture(model.config)
    return [i for i, layer in enumerate(get_decoder_layers(model)) if spec.has(layer, shared_expert_neurons.BLOCK)]


def _shared(layer, spec):
    return layer.get_submodule(f"{spec.moe}.{spec.shared_expert}")


def _importance(model, shared_neurons: dict) -> ImportanceScores:
    scores = _static_scores(model)
    scores.shared_neurons = shared_neurons
    return scores


def _prune(model, scores, **targets):
    """This structure's steps of `prune_model`, then every structure's cached sizes in order, as `prune_model` does."""
    spec = get_architecture(model.config)
    source = model_shape(model.config)
    config = PrunedConfig(**targets)
    target = config.resolve(model.config)
    kept_layers = list(range(source["num_hidden_layers"]))
    record = PruningRecord({}, source, target, kept_layers, [])
    layers = get_decoder_layers(model)
    with torch.no_grad():
        shared_expert_neurons.prune(model, layers, spec, scores, source, target, kept_layers, record, config)
    shared_expert_neurons.update_config(model.config, spec, source, target)
    for structure in structures_of(spec):
        structure.sync_modules(model, model.config, spec)
    return record


def _random_scores(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    neurons = torch.rand(model.config.num_hidden_layers, WIDTH, generator=g, dtype=torch.float64)
    return neurons, _importance(model, {"score": neurons})


# ---------------------------------------------------------------------------------------------- which families
def test_present_exactly_for_families_with_a_shared_expert():
    # Granite 4's shared MLP (beside the MoE block, a fused input_linear) is tested in test_granite4_lfm2.py; Llama 4's
    # shared expert takes the routed experts' width: pruned with them in test_llama4_minimax.py; DeepSeek-V3's and
    # GLM-4.5's shared MLP, n_shared_experts x the expert width: test_deepseek_v3.py, test_moe.py.
    present = {name for name, spec in ARCHITECTURES.items() if shared_expert_neurons.present(spec)}
    assert present == {*FAMILIES, "granitemoehybrid", "llama4_text", "deepseek_v3", "glm4_moe"}


# ---------------------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("model_type", FAMILIES)  # tokens arrive flattened `[B * S, H]` (Qwen2-MoE) or `[B, S, H]`
def test_hooks_record_each_samples_mean_over_its_unmasked_tokens(model_type):
    model = _model(model_type)
    spec = get_architecture(model.config)
    samples = _samples()
    layer_index = _moe_layers(model)[0]
    collector = _collect(model, shared_expert_neurons, samples)
    assert {key[1] for key in collector.stats} == set(_moe_layers(model))  # no statistics for the other layers
    stats = collector.stats[(shared_expert_neurons.KEY, layer_index, 0)]
    seen = []
    down = _shared(get_decoder_layers(model)[layer_index], spec).down_proj
    handle = down.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for s in samples:  # one unpadded sample at a time
            model(input_ids=s["input_ids"][None])
    handle.remove()
    per_sample = torch.stack([x.double().abs().mean(0) for x in seen])
    torch.testing.assert_close(stats["sum"], per_sample.sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["sumsq"], per_sample.pow(2).sum(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_dead_neurons_score_zero_and_removing_them_keeps_the_logits(model_type):
    model = _model(model_type)
    spec = get_architecture(model.config)
    dead = [3, 17]
    with torch.no_grad():
        for i in _moe_layers(model):
            _shared(get_decoder_layers(model)[i], spec).up_proj.weight[dead] = 0
    before = logits(model)
    layers = model.config.num_hidden_layers
    stacked = _collect(model, shared_expert_neurons, _samples()).stacked(
        shared_expert_neurons.KEY, WIDTH, 1, ("sum", "sumsq"), "cpu"
    )
    importance = _importance(model, stacked)
    importance.num_samples = 4
    neuron_scores = shared_expert_neurons.scores(importance, "l2")
    assert neuron_scores.shape == (layers, WIDTH)
    moe = _moe_layers(model)
    assert (neuron_scores[moe][:, dead] == 0).all() and (neuron_scores[moe].sum(1) > 0).all()
    record = _prune(model, importance, shared_expert_intermediate_size=WIDTH - 2)
    assert record.shared_neurons == {i: [n for n in range(WIDTH) if n not in dead] for i in moe}
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_magnitude_is_the_norm_of_each_neurons_rows_and_column(model_type):
    model = _model(model_type)
    spec, shape = get_architecture(model.config), model_shape(model.config)
    layers = get_decoder_layers(model)
    layer = layers[_moe_layers(model)[0]]
    mlp = _shared(layer, spec)
    squares = mlp.up_proj.weight.pow(2).sum(1) + mlp.down_proj.weight.pow(2).sum(0)
    if spec.gate_proj:
        squares = squares + mlp.gate_proj.weight.pow(2).sum(1)
    torch.testing.assert_close(shared_expert_neurons.magnitude(layer, spec, shape), squares.sqrt().detach())
    if model_type == "nemotron_h":  # a layer without an MoE block: a zero row
        assert torch.equal(shared_expert_neurons.magnitude(layers[0], spec, shape), torch.zeros(WIDTH))


# ---------------------------------------------------------------------------------------------- slicing
@pytest.mark.parametrize("model_type", FAMILIES)
def test_prune_keeps_exactly_the_top_neurons_of_each_moe_layer(model_type):
    model = _model(model_type)
    original = copy.deepcopy(model)
    spec = get_architecture(model.config)
    neurons, scores = _random_scores(model)
    record = _prune(model, scores, shared_expert_intermediate_size=24)
    assert sorted(record.shared_neurons) == _moe_layers(model)
    for i in _moe_layers(model):
        kept = torch.sort(torch.topk(neurons[i], 24).indices).values
        assert record.shared_neurons[i] == kept.tolist()
        src, dst = _shared(get_decoder_layers(original)[i], spec), _shared(get_decoder_layers(model)[i], spec)
        for name in (spec.gate_proj, spec.up_proj):
            if name:
                assert torch.equal(getattr(dst, name).weight, getattr(src, name).weight[kept])
        assert torch.equal(dst.down_proj.weight, src.down_proj.weight[:, kept])
        assert dst.intermediate_size == 24
    assert getattr(model.config, spec.shared_expert_width_field) == 24
    assert torch.isfinite(logits(model)).all()


def test_slice_hidden_slices_the_shared_expert_and_its_gate_and_keeping_all_is_exact():
    model = _model("qwen2_moe")
    spec = get_architecture(model.config)
    layer = get_decoder_layers(model)[0]
    original = copy.deepcopy(layer.mlp)
    reads, writes = shared_expert_neurons.hidden_weights(layer, spec)
    assert any(w is layer.mlp.shared_expert_gate.weight for w in reads) and len(reads) == 3 and len(writes) == 1
    kept = torch.tensor([0, 5, 6, 31])
    with torch.no_grad():
        shared_expert_neurons.slice_hidden(layer, spec, kept)
    assert torch.equal(layer.mlp.shared_expert_gate.weight, original.shared_expert_gate.weight[:, kept])
    assert torch.equal(layer.mlp.shared_expert.up_proj.weight, original.shared_expert.up_proj.weight[:, kept])
    assert torch.equal(layer.mlp.shared_expert.down_proj.weight, original.shared_expert.down_proj.weight[kept])

    model = _model("qwen2_moe")
    before = logits(model)
    with torch.no_grad():
        for layer in get_decoder_layers(model):
            shared_expert_neurons.slice_hidden(layer, spec, torch.arange(32))
    assert torch.equal(logits(model), before)


def test_nothing_to_prune_leaves_the_model_untouched():
    model = _model("qwen2_moe")
    weights = dict(model.named_parameters())
    record = _prune(model, _random_scores(model)[1])
    assert record.shared_neurons == {} and all(p is weights[n] for n, p in model.named_parameters())


# ---------------------------------------------------------------------------------------------- config, counts
def test_update_config_writes_the_familys_own_field():
    for model_type, field in (
        ("qwen2_moe", "shared_expert_intermediate_size"),
        ("nemotron_h", "moe_shared_expert_intermediate_size"),
    ):
        config = copy.deepcopy(_model(model_type).config)
        spec = get_architecture(config)
        shared_expert_neurons.update_config(config, spec, {}, {"shared_expert_intermediate_size": 16})
        assert getattr(config, field) == 16


@pytest.mark.parametrize("model_type", FAMILIES)
def test_pruned_shared_experts_match_the_count_terms(model_type):
    model = _model(model_type)
    source_config = copy.deepcopy(model.config)
    spec = get_architecture(model.config)
    _prune(model, _random_scores(model)[1], shared_expert_intermediate_size=24)
    sizes = shared_expert_neurons.count_sizes({"shared_expert_intermediate_size": 24}) | {"h": 32}
    assert sizes == {"fs": 24, "2fs": 48, "h": 32}
    for i in _moe_layers(model):
        layer = get_decoder_layers(model)[i]
        roles = shared_expert_neurons.count_roles(spec, layer)
        assert (f"{spec.moe}.shared_expert_gate" in roles) == (model_type != "nemotron_h")
        for path, dims in roles.items():
            expected = tuple(sizes[d] if isinstance(d, str) else d for d in dims)
            assert tuple(layer.get_submodule(path).weight.shape) == expected, path
    target = PrunedConfig(shared_expert_intermediate_size=24)
    assert count_parameters(source_config, target) == n_params(model) < count_parameters(source_config)
