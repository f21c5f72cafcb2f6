"""`structures/mlp_neurons.py`: neuron statistics from the `down_proj` input, magnitude scores, per-layer selection,
slicing of gated, plain and fused (`gate_up_proj`) MLPs, the config field, and the parameter-count terms, each called
directly on tiny models."""

import copy

import pytest
import torch
from conftest import ARCHITECTURE_NAMES, HYBRID_PATTERN, _static_scores, logits, n_params, tiny_model
from structure_helpers import collect as _collect
from structure_helpers import prune_steps
from structure_helpers import samples as _samples
from transformers import AutoModelForCausalLM

from hf_minitron import ImportanceScores, PrunedConfig, count_parameters
from hf_minitron.architectures import ARCHITECTURES, get_architecture, get_decoder_layers, model_shape
from hf_minitron.pruning.structures import mlp_neurons, structures_of


WIDTH = 64
MLP_LAYERS = [i for i, kind in enumerate(HYBRID_PATTERN) if kind == "mlp"]  # Nemotron-H's dense MLP layers


def _prune(model, scores, **targets):
    return prune_steps(model, scores, (mlp_neurons,), (mlp_neurons,), None, **targets)


def _random_neuron_scores(model, seed: int = 1):
    shape = model_shape(model.config)
    g = torch.Generator().manual_seed(seed)
    neurons = torch.rand(shape["num_hidden_layers"], shape["intermediate_size"], generator=g, dtype=torch.float64)
    return neurons, _static_scores(model, neurons=neurons)


def _up_rows(mlp, spec, width: int = WIDTH) -> torch.Tensor:
    """The up-projection rows (the second half of a fused gate/up projection)."""
    return getattr(mlp, spec.gate_up_proj).weight[width:] if spec.gate_up_proj else getattr(mlp, spec.up_proj).weight


# ---------------------------------------------------------------------------------------------- which families
def test_present_exactly_for_families_with_a_dense_mlp():
    moe_only = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "jetmoe", "qwen3_next", "qwen3_5_moe_text"}
    moe_only |= {"granitemoehybrid"}  # a hybrid whose feed-forward blocks are all MoE (with a shared MLP)
    moe_only |= {"minimax_m2"}
    assert {name for name, spec in ARCHITECTURES.items() if mlp_neurons.present(spec)} == set(ARCHITECTURES) - moe_only
    assert mlp_neurons in structures_of(ARCHITECTURES["nemotron_h"])
    assert mlp_neurons in structures_of(ARCHITECTURES["llama4_text"])  # its dense layers, between MoE ones


# ---------------------------------------------------------------------------------------------- scores
def test_hooks_record_each_samples_l2_over_its_unmasked_tokens():
    model = tiny_model("llama")
    samples = _samples()
    stats = _collect(model, mlp_neurons, samples, how="l2").stats[(mlp_neurons.KEY, 1, 0)]
    seen = []
    handle = get_decoder_layers(model)[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0][0]))
    with torch.no_grad():
        for s in samples:  # one unpadded sample at a time
            model(input_ids=s["input_ids"][None])
    handle.remove()
    per_sample = torch.stack([x.double().norm(dim=0) for x in seen])
    torch.testing.assert_close(stats["sum"], per_sample.sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["sumsq"], per_sample.pow(2).sum(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ["llama", "nemotron", "phi3"])  # gated, plain squared-ReLU, fused gate/up
def test_dead_neurons_score_zero_and_removing_them_keeps_the_logits(model_type):
    model = tiny_model(model_type)
    spec = get_architecture(model.config)
    dead = [5, 9, 40]
    with torch.no_grad():
        for layer in get_decoder_layers(model):
            _up_rows(layer.mlp, spec)[dead] = 0  # act(gate) x 0, or relu(0)^2: these neurons output nothing
    before = logits(model)
    stacked = _collect(model, mlp_neurons, _samples()).stacked(mlp_neurons.KEY, WIDTH, 1, ("sum", "sumsq"), "cpu")
    importance = ImportanceScores("activation", "mean", 4, 0, model_shape(model.config), neurons=stacked)
    neuron_scores = mlp_neurons.scores(importance, "l2")
    assert neuron_scores.shape == (4, WIDTH)
    assert (neuron_scores[:, dead] == 0).all() and (neuron_scores.sum(1) > 0).all()
    record = _prune(model, importance, intermediate_size=WIDTH - len(dead))
    alive = [n for n in range(WIDTH) if n not in dead]
    assert record.neurons == {i: alive for i in range(4)}
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "nemotron", "phi3"])
def test_magnitude_is_the_norm_of_each_neurons_input_rows_and_output_column(model_type):
    model = tiny_model(model_type)
    spec, shape = get_architecture(model.config), model_shape(model.config)
    layer = get_decoder_layers(model)[2]
    mlp = layer.mlp
    if spec.gate_up_proj:
        gate, up = mlp.gate_up_proj.weight[:WIDTH], mlp.gate_up_proj.weight[WIDTH:]
    else:
        gate, up = (mlp.gate_proj.weight if spec.gate_proj else None), mlp.up_proj.weight
    squares = up.pow(2).sum(1) + mlp.down_proj.weight.pow(2).sum(0)
    if gate is not None:
        squares = squares + gate.pow(2).sum(1)
    torch.testing.assert_close(mlp_neurons.magnitude(layer, spec, shape), squares.sqrt().detach())
    with torch.no_grad():  # neuron 7 reads and writes nothing
        for w in (gate, up):
            if w is not None:
                w[7] = 0
        mlp.down_proj.weight[:, 7] = 0
    magnitude = mlp_neurons.magnitude(layer, spec, shape)
    assert magnitude[7] == 0 and int(magnitude.argmin()) == 7


def test_magnitude_of_a_hybrid_layer_without_an_mlp_is_zero():
    model = tiny_model("nemotron_h")
    spec, shape = get_architecture(model.config), model_shape(model.config)
    layers = get_decoder_layers(model)
    assert torch.equal(mlp_neurons.magnitude(layers[0], spec, shape), torch.zeros(WIDTH))
    assert (mlp_neurons.magnitude(layers[MLP_LAYERS[0]], spec, shape) > 0).all()


# ---------------------------------------------------------------------------------------------- slicing
@pytest.mark.parametrize("model_type", ["llama", "nemotron", "phi3"])
def test_prune_keeps_exactly_the_top_neurons_rows_and_columns(model_type):
    model = tiny_model(model_type)
    original = copy.deepcopy(model)
    spec = get_architecture(model.config)
    neurons, scores = _random_neuron_scores(model)
    record = _prune(model, scores, intermediate_size=24)
    for i in range(4):
        kept = torch.sort(torch.topk(neurons[i], 24).indices).values
        assert record.neurons[i] == kept.tolist()
        src, dst = get_decoder_layers(original)[i].mlp, get_decoder_layers(model)[i].mlp
        if spec.gate_up_proj:
            assert torch.equal(dst.gate_up_proj.weight, src.gate_up_proj.weight[torch.cat([kept, kept + WIDTH])])
        else:
            for name in (spec.gate_proj, spec.up_proj):
                if name:
                    assert torch.equal(getattr(dst, name).weight, getattr(src, name).weight[kept])
        assert torch.equal(dst.down_proj.weight, src.down_proj.weight[:, kept])
        assert getattr(dst, "intermediate_size", 24) == 24  # where the module caches it (Phi-3's does not)


@pytest.mark.parametrize("model_type", ["llama", "nemotron", "phi3"])
def test_slicing_every_neuron_keeps_the_logits_exactly(model_type):
    model = tiny_model(model_type)
    spec = get_architecture(model.config)
    before = logits(model)
    with torch.no_grad():
        for layer in get_decoder_layers(model):
            mlp_neurons.slice_mlp(layer.mlp, spec, WIDTH, torch.arange(WIDTH))
    assert torch.equal(logits(model), before)


def test_hybrid_prune_slices_the_mlp_layers_only():
    model = tiny_model("nemotron_h")
    original = copy.deepcopy(model)
    record = _prune(model, _random_neuron_scores(model)[1], intermediate_size=40)
    assert sorted(record.neurons) == MLP_LAYERS
    for i, (src, dst) in enumerate(zip(get_decoder_layers(original), get_decoder_layers(model))):
        if i in MLP_LAYERS:  # a non-gated MLP: up rows and down columns
            kept = torch.tensor(record.neurons[i])
            assert torch.equal(dst.mixer.up_proj.weight, src.mixer.up_proj.weight[kept])
            assert torch.equal(dst.mixer.down_proj.weight, src.mixer.down_proj.weight[:, kept])
        else:  # Mamba and attention layers as they were
            assert all(torch.equal(a, b) for a, b in zip(src.parameters(), dst.parameters()))
    assert get_decoder_layers(model)[0].mixer.intermediate_size == 32  # the Mamba mixer's width, set back
    assert torch.isfinite(logits(model)).all()


def test_nothing_to_prune_leaves_the_model_untouched():
    model = tiny_model("llama")
    weights = dict(model.named_parameters())
    record = _prune(model, _random_neuron_scores(model)[1])
    assert record.neurons == {} and all(p is weights[n] for n, p in model.named_parameters())


# ---------------------------------------------------------------------------------------------- config, sizes, counts
@pytest.mark.parametrize("model_type", ARCHITECTURE_NAMES + ["nemotron_h"])
def test_pruned_neurons_run_and_match_the_count_terms(model_type):
    model = tiny_model(model_type)
    source_config = copy.deepcopy(model.config)
    spec = get_architecture(model.config)
    _prune(model, _random_neuron_scores(model)[1], intermediate_size=40)
    assert model.config.intermediate_size == 40
    out = logits(model)
    assert out.shape == (2, 10, 96) and torch.isfinite(out).all()

    sizes = mlp_neurons.count_sizes(model_shape(model.config)) | {"h": model.config.hidden_size}
    assert sizes["f"] == 40 and sizes["2f"] == 80
    for layer in get_decoder_layers(model):
        if spec.has(layer, mlp_neurons.BLOCK):
            mlp = getattr(layer, spec.mlp)
            assert getattr(mlp, "intermediate_size", 40) == 40
            for path, dims in mlp_neurons.count_roles(spec, layer).items():
                assert tuple(layer.get_submodule(path).weight.shape) == tuple(sizes[d] for d in dims), path
    assert count_parameters(source_config, PrunedConfig(intermediate_size=40)) == n_params(model)


def test_count_roles_of_each_mlp_layout():
    assert mlp_neurons.count_roles(ARCHITECTURES["llama"], None) == {
        "mlp.gate_proj": ("f", "h"),
        "mlp.up_proj": ("f", "h"),
        "mlp.down_proj": ("h", "f"),
    }
    assert mlp_neurons.count_roles(ARCHITECTURES["nemotron"], None) == {
        "mlp.up_proj": ("f", "h"),
        "mlp.down_proj": ("h", "f"),
    }
    assert mlp_neurons.count_roles(ARCHITECTURES["phi3"], None) == {
        "mlp.gate_up_proj": ("2f", "h"),
        "mlp.down_proj": ("h", "f"),
    }
    assert mlp_neurons.count_roles(ARCHITECTURES["bamba"], None) == {
        "feed_forward.gate_proj": ("f", "h"),
        "feed_forward.up_proj": ("f", "h"),
        "feed_forward.down_proj": ("h", "f"),
    }


# ---------------------------------------------------------------------------------------------- per-layer widths
def test_global_allocation_is_uniform_for_alike_layers_and_blind_to_each_layers_scale():
    """Layers whose scores have the same distribution get the same width, whatever the scale of their activations
    (each layer's scores are divided by their mean); raw scores would give the budget to the loudest layer."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(64, generator=g, dtype=torch.float64)
    alike = [base[torch.randperm(64, generator=g)] * scale for scale in (1.0, 10.0, 0.1, 3.0)]
    assert mlp_neurons.allocate_widths(alike, 4 * 32, [64] * 4, 8, 8) == [32, 32, 32, 32]
    raw = mlp_neurons.allocate_widths(alike, 4 * 32, [64] * 4, 8, 8, normalise=False)
    assert raw[1] == 64 and sum(raw) == 128


def test_global_allocation_keeps_the_budget_floor_and_multiples():
    """A layer whose importance sits in a few neurons gives the rest up, down to the floor; the widths are multiples,
    within the source's, and sum to the budget (or less by under one multiple when it is not a multiple)."""
    g = torch.Generator().manual_seed(1)
    flat = torch.rand(64, generator=g) + 1
    peaked = torch.zeros(64)
    peaked[:4] = 1
    widths = mlp_neurons.allocate_widths([flat, peaked, flat], 3 * 32, [64] * 3, 8, 16)
    assert widths[1] == 16 and sum(widths) == 96 and all(w % 8 == 0 and w <= 64 for w in widths)
    assert sum(mlp_neurons.allocate_widths([flat, peaked, flat], 3 * 30, [64] * 3, 8, 16)) in range(83, 91)
    assert mlp_neurons.allocate_widths([flat, peaked, flat], 3 * 64, [64] * 3, 8, 16) == [64, 64, 64]


def test_per_layer_widths_in_the_shape_and_the_counts():
    """A config of per-layer widths: `intermediate_size` is the widest layer's, `intermediate_size_per_layer` lists them
    (only when they differ), and the count sums each layer at its own width."""
    config = tiny_model("gemma3n_text", intermediate_size=[64, 32, 64, 16]).config
    assert mlp_neurons.shape(config, ARCHITECTURES["gemma3n_text"]) == {
        "intermediate_size": 64,
        "intermediate_size_per_layer": [64, 32, 64, 16],
    }
    assert mlp_neurons.shape(tiny_model("gemma3n_text").config, ARCHITECTURES["gemma3n_text"]) == {
        "intermediate_size": 64
    }
    assert mlp_neurons.count_sizes_per_layer({"intermediate_size_per_layer": [8, 16]}) == [
        {"f": 8, "2f": 16},
        {"f": 16, "2f": 32},
    ]
    assert count_parameters(config) == n_params(AutoModelForCausalLM.from_config(copy.deepcopy(config)))
