import copy

import pytest
import torch
from conftest import random_samples, tiny_model

from hf_minitron import PrunedConfig, estimate_importance, prune_model
from hf_minitron.pruning.structures.depth import drop_layers, layers_skipped, lm_loss, score_layer_removals


def _loss_without(model, layers, samples):
    clone = copy.deepcopy(model)
    drop_layers(clone, layers)
    return lm_loss(clone, samples)


def test_skipping_a_layer_equals_removing_it():
    model = tiny_model("gemma2", num_hidden_layers=4)
    samples = random_samples(4)
    with layers_skipped(model, [1, 2]):
        skipped = lm_loss(model, samples)
    assert skipped == pytest.approx(_loss_without(model, [1, 2], samples), rel=1e-6)
    assert lm_loss(model, samples) != pytest.approx(skipped)  # restored afterwards


def test_lm_loss_method_drops_the_cheapest_single_layers():
    model = tiny_model("llama", num_hidden_layers=5)
    samples = random_samples(6)
    costs = [_loss_without(model, [i], samples) for i in range(5)]
    expected = sorted(torch.argsort(torch.tensor(costs))[:2].tolist())
    pruned = prune_model(
        copy.deepcopy(model), PrunedConfig(num_hidden_layers=3, depth_method="lm_loss"), samples, show_progress=False
    )
    assert pruned.pruning_record.dropped_layers == expected


def test_contiguous_method_drops_the_cheapest_block():
    model = tiny_model("llama", num_hidden_layers=5)
    samples = random_samples(6)
    costs = [_loss_without(model, [s, s + 1], samples) for s in range(4)]
    start = min(range(4), key=costs.__getitem__)
    scores = estimate_importance(model, samples, show_progress=False)
    pruned = prune_model(
        copy.deepcopy(model), PrunedConfig(num_hidden_layers=3), samples, scores=scores, show_progress=False
    )
    assert pruned.pruning_record.dropped_layers == [start, start + 1]
    assert scores.block_losses[2] == pytest.approx(costs, rel=1e-6)  # cached on the scores for reuse


def test_block_influence_method_drops_the_least_influential_layers():
    model = tiny_model("llama", num_hidden_layers=5)
    samples = random_samples(6)
    scores = estimate_importance(model, samples, show_progress=False)
    expected = sorted(torch.argsort(scores.block_influence)[:2].tolist())
    pruned = prune_model(model, PrunedConfig(num_hidden_layers=3, depth_method="block_influence"), scores=scores)
    assert pruned.pruning_record.dropped_layers == expected


def test_user_scorer_picks_the_block():
    model = tiny_model("llama", num_hidden_layers=5)
    calls = []

    def prefers_dropping_the_last_block(m):  # higher is better: 1.0 only when the last layer is skipped
        calls.append(len(m.model.layers))
        return float(type(m.model.layers[4]).__name__ == "_SkippedLayer")

    pruned = prune_model(
        model, PrunedConfig(num_hidden_layers=3), depth_scorer=prefers_dropping_the_last_block, show_progress=False
    )
    assert pruned.pruning_record.dropped_layers == [3, 4]
    assert len(calls) == 4  # one evaluation per contiguous block


def test_score_layer_removals_needs_data_or_scorer():
    with pytest.raises(ValueError, match="needs calibration samples"):
        score_layer_removals(tiny_model("llama"), [[0]])
