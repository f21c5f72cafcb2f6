"""`structures/expert_neurons.py`: the width of routed experts, in every expert layout (concatenated gate/up, GPT-OSS's
transposed interleaved gate/up with biases, Nemotron-H's ungated experts, JetMoE's ScatterMoE weights): statistics
over routed tokens, magnitude scores, per-expert selection and slicing, the config field, and the parameter-count
terms, each called directly on tiny models."""

import copy

import pytest
import torch
from conftest import MOE_ARCHITECTURE_NAMES, _static_scores, logits, n_params, tiny_model
from structure_helpers import collect as _collect
from structure_helpers import padded as _padded
from structure_helpers import prune_steps
from structure_helpers import samples as _samples

from hf_minitron import PrunedConfig, count_parameters, prune_model, random_importance
from hf_minitron.architectures import ARCHITECTURES, get_architecture, get_decoder_layers, model_shape
from hf_minitron.pruning.prune import PruningRecord
from hf_minitron.pruning.structures import expert_neurons, routed_experts


# Nemotron-H with MoE blocks (as in test_hybrid_moe.py): 8 ungated routed experts of width 24 in 2 groups.
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
FAMILIES = MOE_ARCHITECTURE_NAMES + ["nemotron_h", "qwen3_next", "qwen3_5_moe_text", "granitemoehybrid"]
LAYOUTS = ["mixtral", "gpt_oss", "jetmoe", "nemotron_h"]  # concatenated, interleaved + biases, ScatterMoE, ungated
WIDTH = 24


def _model(model_type: str):
    return tiny_model(model_type, **(NEMOTRON_H_MOE if model_type == "nemotron_h" else {}))


def _moe_indices(model) -> list[int]:
    spec = get_architecture(model.config)
    return [i for i, layer in enumerate(get_decoder_layers(model)) if spec.has(layer, expert_neurons.BLOCK)]


def _tensors(layer, spec):
    t = routed_experts.expert_tensors(layer, spec)
    return t, routed_experts.get_tensor(layer, t.first), routed_experts.get_tensor(layer, t.second)


def _neuron_parts(layer, spec, n: int) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """Views, over every expert (`[E, ...]`), of what neuron `n` reads (its gate and up rows), writes (its down
    column), and its gate/up biases (GPT-OSS)."""
    t, first, second = _tensors(layer, spec)
    width = second.shape[routed_experts.second_width_dim(t)]
    if t.transposed:  # GPT-OSS: [E, H, 2I] interleaved gate/up columns, [E, I, H] down rows
        reads, write = [first[:, :, 2 * n], first[:, :, 2 * n + 1]], second[:, n]
    elif t.gated:  # [E, 2I, H] concatenated [gate; up], [E, H, I]
        reads, write = [first[:, n], first[:, width + n]], second[:, :, n]
    else:  # [E, I, H] up only
        reads, write = [first[:, n]], second[:, :, n]
    biases = []
    if t.first_bias is not None:
        bias = routed_experts.get_tensor(layer, t.first_bias)
        biases = [bias[:, 2 * n], bias[:, 2 * n + 1]]
    return reads, write, biases


def _stacked(model, collector) -> dict:
    experts = model_shape(model.config)["num_experts"]
    sums = collector.stacked(expert_neurons.KEY, (experts, WIDTH), 1, ("sum",), "cpu")
    return sums | collector.stacked(expert_neurons.KEY, experts, 1, ("count",), "cpu")


def _importance(model, neurons: dict):
    scores = _static_scores(model)
    scores.expert_neurons = neurons
    return scores


def _random_scores(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    shape = model_shape(model.config)
    neurons = torch.rand(shape["num_hidden_layers"], shape["num_experts"], WIDTH, generator=g, dtype=torch.float64)
    return neurons, _importance(model, {"score": neurons})


def _prune(model, scores, record=None, **targets):
    return prune_steps(model, scores, (expert_neurons,), (expert_neurons,), record, **targets)


# ---------------------------------------------------------------------------------------------- which families
def test_present_exactly_for_families_with_moe_blocks():
    assert {name for name, spec in ARCHITECTURES.items() if expert_neurons.present(spec)} == set(FAMILIES)


# ---------------------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("model_type", LAYOUTS)
def test_dead_neurons_score_zero_and_removing_them_keeps_the_logits(model_type):
    model = _model(model_type)
    spec = get_architecture(model.config)
    dead = [4, 11, 13, 20]  # 20 neurons left: fused tensors' rows stay 16-byte aligned for grouped_mm
    with torch.no_grad():
        for i in _moe_indices(model):
            for n in dead:
                reads, _, biases = _neuron_parts(get_decoder_layers(model)[i], spec, n)
                for part in reads + biases:  # a zero gate (and up): the neuron's activation is 0 for every token
                    part.zero_()
    samples = _samples(lengths=(10,))  # unpadded: the calibration batch is also the input compared below
    ids = _padded(samples)[0]
    before = logits(model, ids)
    stats = _stacked(model, _collect(model, expert_neurons, samples))
    moe = _moe_indices(model)
    neuron_scores = expert_neurons.scores(_importance(model, stats))[moe]
    routed = stats["count"][moe] > 0
    assert (neuron_scores[:, :, dead] == 0).all() and (neuron_scores.sum(-1)[routed] > 0).all()
    record = _prune(model, _importance(model, stats), moe_intermediate_size=WIDTH - len(dead))
    alive = [n for n in range(WIDTH) if n not in dead]
    for j, i in enumerate(moe):
        for e, kept in enumerate(record.expert_neurons[i]):
            dropped = sorted(set(range(WIDTH)) - set(kept))
            assert (neuron_scores[j, e, dropped] == 0).all()  # only neurons silent on every routed token go
            if routed[j, e] and spec.gate_proj:  # a gated neuron is silent only when dead (ReLU^2 ones may tie)
                assert kept == alive
    # What was dropped was silent on these tokens (an expert that saw none keeps its first neurons, unused here).
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", LAYOUTS)
def test_statistics_are_float64_sums_over_the_unmasked_routed_tokens(model_type):
    model = _model(model_type)
    samples = _samples()
    collector = _collect(model, expert_neurons, samples)
    moe = _moe_indices(model)
    assert sorted({key[1] for key in collector.stats}) == moe
    stats = _stacked(model, collector)
    assert stats["sum"].dtype == stats["count"].dtype == torch.float64
    tokens = sum(len(s["input_ids"]) for s in samples)
    assert (stats["count"][moe].sum(1) == tokens * model.config.num_experts_per_tok).all()  # padding excluded
    assert ((stats["sum"][moe].sum(-1) > 0) == (stats["count"][moe] > 0)).all()
    per_token = expert_neurons.scores(_importance(model, stats))
    torch.testing.assert_close(per_token, stats["sum"] / stats["count"].clamp_min(1)[..., None])


@pytest.mark.parametrize("model_type", LAYOUTS)
def test_magnitude_is_the_norm_of_each_neurons_rows_and_column_per_expert(model_type):
    model = _model(model_type)
    spec, shape = get_architecture(model.config), model_shape(model.config)
    layer = get_decoder_layers(model)[_moe_indices(model)[0]]
    squares = []
    for n in range(WIDTH):
        reads, write, _ = _neuron_parts(layer, spec, n)
        squares.append(sum(p.detach().pow(2).sum(1) for p in reads) + write.detach().pow(2).sum(1))
    expected = torch.stack(squares, dim=1).sqrt()
    magnitude = expert_neurons.magnitude(layer, spec, shape)
    assert magnitude.shape == (shape["num_experts"], WIDTH)
    torch.testing.assert_close(magnitude, expected)
    if model_type == "nemotron_h":  # a layer without an MoE block: zeros
        assert torch.equal(expert_neurons.magnitude(get_decoder_layers(model)[0], spec, shape), torch.zeros(8, WIDTH))


def test_fused_index_of_each_gate_up_layout():
    kept = torch.tensor([[0, 2], [1, 3]])
    concatenated = routed_experts.ExpertTensors("a", "b", "r", ())
    interleaved = routed_experts.ExpertTensors("a", "b", "r", (), concatenated=False)
    ungated = routed_experts.ExpertTensors("a", "b", "r", (), gated=False)
    assert expert_neurons._fused_index(concatenated, kept, 4).tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert expert_neurons._fused_index(interleaved, kept, 4).tolist() == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert expert_neurons._fused_index(ungated, kept, 4).tolist() == kept.tolist()


# ---------------------------------------------------------------------------------------------- slicing
@pytest.mark.parametrize("model_type", LAYOUTS)
def test_prune_keeps_exactly_each_experts_top_neurons(model_type):
    model = _model(model_type)
    original = copy.deepcopy(model)
    spec = get_architecture(model.config)
    neurons, scores = _random_scores(model)
    record = _prune(model, scores, moe_intermediate_size=16)
    assert sorted(record.expert_neurons) == _moe_indices(model)
    for i in _moe_indices(model):
        src, dst = get_decoder_layers(original)[i], get_decoder_layers(model)[i]
        for e, row in enumerate(neurons[i]):
            kept = torch.sort(torch.topk(row, 16).indices).values
            assert record.expert_neurons[i][e] == kept.tolist()
            for n_new, n_old in enumerate(kept.tolist()):
                new_reads, new_write, new_biases = _neuron_parts(dst, spec, n_new)
                old_reads, old_write, old_biases = _neuron_parts(src, spec, n_old)
                for a, b in zip(new_reads + [new_write] + new_biases, old_reads + [old_write] + old_biases):
                    assert torch.equal(a[e], b[e])
    assert model_shape(model.config)["moe_intermediate_size"] == 16
    assert torch.isfinite(logits(model)).all()


def test_after_expert_pruning_each_kept_expert_keeps_its_own_top_neurons():
    model = _model("qwen3_moe")
    original = copy.deepcopy(model)
    neurons, scores = _random_scores(model)
    spec = get_architecture(model.config)
    source = model_shape(model.config)
    record = PruningRecord({}, source, source, list(range(4)), [])
    kept_experts = {i: [0, 3] for i in range(4)}  # as routed_experts.prune leaves them
    with torch.no_grad():
        for i, layer in enumerate(get_decoder_layers(model)):
            routed_experts.slice_experts(
                layer, routed_experts.expert_tensors(layer, spec), torch.tensor(kept_experts[i])
            )
    record.experts.update(kept_experts)
    _prune(model, scores, record, num_experts=2, moe_intermediate_size=16)
    for i in range(4):
        for j, e in enumerate(kept_experts[i]):
            kept = torch.sort(torch.topk(neurons[i, e], 16).indices).values
            assert record.expert_neurons[i][j] == kept.tolist()
            src = get_decoder_layers(original)[i].mlp.experts.down_proj[e]
            assert torch.equal(get_decoder_layers(model)[i].mlp.experts.down_proj[j], src[:, kept])


@pytest.mark.parametrize("model_type", FAMILIES)
def test_slicing_every_neuron_keeps_the_logits_exactly(model_type):
    model = _model(model_type)
    spec = get_architecture(model.config)
    experts = model_shape(model.config)["num_experts"]
    before = logits(model)
    with torch.no_grad():
        for i in _moe_indices(model):
            everything = torch.arange(WIDTH).expand(experts, WIDTH)
            expert_neurons.slice_expert_neurons(get_decoder_layers(model)[i], spec, everything, WIDTH)
    assert torch.equal(logits(model), before)


def test_nothing_to_prune_leaves_the_model_untouched():
    model = _model("mixtral")
    weights = dict(model.named_parameters())
    record = _prune(model, _random_scores(model)[1])
    assert record.expert_neurons == {} and all(p is weights[n] for n, p in model.named_parameters())


# ---------------------------------------------------------------------------------------------- config, counts
# Llama 4's shared expert takes the experts' width (one config field): pruned with them in test_llama4_minimax.py.
@pytest.mark.parametrize("model_type", [m for m in FAMILIES if m != "llama4_text"])
def test_pruned_expert_width_runs_and_matches_the_count_terms(model_type):
    model = _model(model_type)
    source_config = copy.deepcopy(model.config)
    spec = get_architecture(model.config)
    _prune(model, _random_scores(model)[1], moe_intermediate_size=16)
    assert getattr(model.config, spec.expert_width_field) == 16
    if spec.expert_layout is None:  # transformers' experts module caches its width (under one of three names)
        for i in _moe_indices(model):
            experts = get_decoder_layers(model)[i].get_submodule(f"{spec.moe}.{spec.experts}")
            widths = [getattr(experts, n, None) for n in ("intermediate_dim", "intermediate_size", "expert_dim")]
            assert [w for w in widths if isinstance(w, int)] == [16]
    assert expert_neurons.count_roles(spec, None) == {}  # described by routed_experts' roles, `fe` / `2fe`
    assert expert_neurons.count_sizes({"moe_intermediate_size": 16}) == {"fe": 16, "2fe": 32}
    counted = count_parameters(source_config, PrunedConfig(moe_intermediate_size=16))
    assert counted == n_params(model) < count_parameters(source_config)
    out = logits(model)
    assert out.shape == (2, 10, 96) and torch.isfinite(out).all()


def test_an_expert_width_grouped_mm_cannot_run_is_refused_before_any_work():
    model = _model("mixtral")
    assert model.config._experts_implementation == "grouped_mm"  # transformers' default for these experts
    before = logits(model)
    with pytest.raises(
        ValueError,
        match=r"PrunedConfig.moe_intermediate_size=22 would give a model that cannot run.*"
        r"Use 16 or 24",
    ):
        prune_model(model, PrunedConfig(moe_intermediate_size=22), scores=random_importance(model.config))
    assert torch.equal(logits(model), before)  # nothing was sliced
