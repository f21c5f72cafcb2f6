"""Large-model loading modes (issue 6, point 5): importance on a model placed by `device_map` or offloaded by
accelerate gives the same scores as on a plain model; pruning an offloaded model is refused with the way out."""

import pytest
import torch
from conftest import random_samples, tiny_model
from transformers import AutoModelForCausalLM

from hf_minitron import PrunedConfig, estimate_importance, prune_model
from hf_minitron.runtime import input_device as _input_device


CONFIG = PrunedConfig(calibration_samples=6, calibration_batch_size=3, hidden_size=16, num_attention_heads=2)


def scores_of(model):
    return estimate_importance(model, random_samples(6), CONFIG, show_progress=False)


def assert_same_scores(a, b):
    for axis in ("heads", "neurons", "hidden"):
        for key, value in getattr(a, axis).items():
            torch.testing.assert_close(getattr(b, axis)[key], value, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(a.block_influence, b.block_influence, rtol=1e-6, atol=1e-9)


@pytest.fixture
def saved(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.fixture
def reference(saved):
    return scores_of(AutoModelForCausalLM.from_pretrained(saved, attn_implementation="eager"))


def test_device_map_loaded_model(saved, reference):
    model = AutoModelForCausalLM.from_pretrained(saved, device_map={"": "cpu"}, attn_implementation="eager")
    assert_same_scores(reference, scores_of(model))
    prune_model(model, CONFIG, scores=scores_of(model))  # every weight is resident: pruning works
    assert model.config.hidden_size == 16


def test_cpu_offload(saved, reference):
    from accelerate import cpu_offload

    model = AutoModelForCausalLM.from_pretrained(saved, attn_implementation="eager")
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert any(p.device.type == "meta" for p in model.parameters())  # the weights live in the hooks
    assert _input_device(model) == torch.device("cpu")
    assert_same_scores(reference, scores_of(model))


def test_disk_offload(saved, reference, tmp_path):
    from accelerate import disk_offload

    model = AutoModelForCausalLM.from_pretrained(saved, attn_implementation="eager")
    disk_offload(model, offload_dir=str(tmp_path / "offload"), execution_device=torch.device("cpu"))
    assert list((tmp_path / "offload").glob("*.dat"))  # weights are read back from disk, layer by layer
    assert_same_scores(reference, scores_of(model))


def test_mixed_device_map_with_disk_offload(saved, reference, tmp_path):
    """`device_map="auto"` on a model larger than memory: some layers resident, the rest offloaded to disk."""
    from accelerate import dispatch_model

    model = AutoModelForCausalLM.from_pretrained(saved, attn_implementation="eager")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "cpu",
        "model.layers.2": "disk",
        "model.layers.3": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path / "offload"), main_device="cpu")
    offloaded = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    assert offloaded and all(name.startswith(("model.layers.2.", "model.layers.3.")) for name in offloaded)
    scores = scores_of(model)
    assert_same_scores(reference, scores)

    # Pruning needs every weight in memory: refused before anything is sliced, with the two-step way out.
    with pytest.raises(ValueError, match=r"cannot slice offloaded weights.*estimate_importance.*without offload"):
        prune_model(model, CONFIG, scores=scores)
    assert model.config.hidden_size == 32
    # The way out works: scores from the offloaded model prune a resident copy exactly as its own scores would.
    resident = AutoModelForCausalLM.from_pretrained(saved, attn_implementation="eager")
    expected = AutoModelForCausalLM.from_pretrained(saved, attn_implementation="eager")
    prune_model(resident, CONFIG, scores=scores)
    prune_model(expected, CONFIG, scores=reference)
    for (name, a), (_, b) in zip(resident.state_dict().items(), expected.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_prune_checkpoint_with_device_map_auto(checkpoint, text_file, tmp_path):
    """The CLI path for large models (`hf-minitron prune --device_map auto`): placed by accelerate, pruned in place."""
    from hf_minitron.commands.prune import PruneArguments, prune_checkpoint

    args = PruneArguments(
        teacher=str(checkpoint),
        output_dir=str(tmp_path / "pruned"),
        calibration_data=str(text_file),
        text_column="content",
        device_map="auto",
    )
    config = PrunedConfig(hidden_size=16, num_attention_heads=2, calibration_samples=4, calibration_seq_length=16)
    prune_checkpoint(args, config, show_progress=False)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert pruned.config.hidden_size == 16 and pruned.config.num_attention_heads == 2
