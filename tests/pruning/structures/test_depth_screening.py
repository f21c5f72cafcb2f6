"""The contiguous depth search screens every block on a few samples and rescores only the best on all of them."""

from conftest import random_samples, tiny_model

from hf_minitron import PrunedConfig, prune_model
from hf_minitron.pruning.structures import depth


def test_screening_rescores_the_best_blocks_on_every_sample_and_counts_forwards(monkeypatch):
    model = tiny_model("llama", num_hidden_layers=8)
    samples = random_samples(12)
    blocks = [list(range(s, s + 2)) for s in range(7)]
    calls = []
    original = depth.lm_loss

    def counting(model, batch, batch_size=8):
        calls.append(len(batch))
        return original(model, batch, batch_size)

    monkeypatch.setattr(depth, "lm_loss", counting)
    full = depth.score_blocks(model, blocks, samples)
    assert calls == [12] * 7
    calls.clear()
    screened = depth.score_blocks(model, blocks, samples, screening_samples=4)
    assert calls == [4] * 7 + [12] * depth.FINALISTS  # 7 x 4 + 3 x 12 sample forwards instead of 7 x 12
    kept = [i for i, cost in enumerate(screened) if cost is not None]
    assert len(kept) == depth.FINALISTS
    for i in kept:  # the finalists' costs are the full-sample costs
        assert screened[i] == full[i]


def test_prune_model_picks_the_best_finalist_and_none_means_every_block_on_every_sample():
    samples = random_samples(12)
    picks = {}
    for screening in (4, None):
        model = tiny_model("llama", num_hidden_layers=8)
        config = PrunedConfig(num_hidden_layers=6, depth_calibration_samples=12, depth_screening_samples=screening)
        prune_model(model, config, samples, show_progress=False)
        picks[screening] = model.pruning_record.dropped_layers
    blocks = [[s, s + 1] for s in range(7)]
    reference = tiny_model("llama", num_hidden_layers=8)
    full = depth.score_blocks(reference, blocks, samples)
    coarse = depth.score_blocks(reference, blocks, samples[:4])
    assert picks[None] == blocks[min(range(7), key=lambda s: full[s])]
    finalists = sorted(range(7), key=lambda s: coarse[s])[: depth.FINALISTS]
    assert picks[4] == blocks[min(finalists, key=lambda s: full[s])]
