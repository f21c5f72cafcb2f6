import os

import pytest
import torch
from conftest import ROOT, random_samples, tiny_model
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_minitron.distillation.teacher_correction import TeacherCorrectionConfig, correct_teacher


RECIPES = str(ROOT / "recipes")


def _dataset():
    return Dataset.from_list([{k: v.tolist() for k, v in s.items()} for s in random_samples(8)])


def _args(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    return TeacherCorrectionConfig(**{**defaults, **kwargs})


def test_learning_rate_defaults_to_a_fifth_of_the_original(tmp_path):
    assert _args(tmp_path, original_learning_rate=3e-3).learning_rate == pytest.approx(6e-4)
    assert _args(tmp_path, learning_rate=1e-4).learning_rate == 1e-4  # unset original: learning_rate as given
    with pytest.raises(ValueError, match="learning_rate_fraction"):
        _args(tmp_path, learning_rate_fraction=0.0)
    with pytest.raises(ValueError, match="original_learning_rate"):
        _args(tmp_path, original_learning_rate=-1.0)


def test_full_fine_tuning_writes_a_stock_checkpoint(tmp_path):
    teacher = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    corrected = correct_teacher(teacher, _args(tmp_path), _dataset())
    assert all(not torch.equal(p, before[n]) for n, p in corrected.named_parameters())
    directory = tmp_path / "corrected"
    assert sorted(os.listdir(directory)) == [
        ".hf_minitron_output.json",  # the marker listing what we wrote (io.OUTPUT_MARKER)
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".corrected-")]  # no temporary left
    reloaded = AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(3, 96, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, corrected.eval()(ids).logits)


def test_lora_correction_is_merged_into_a_standard_checkpoint(tmp_path):
    teacher = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    corrected = correct_teacher(teacher, _args(tmp_path, use_lora=True, lora_r=4, lora_alpha=8), _dataset())
    assert type(corrected).__name__ == "LlamaForCausalLM"
    weights = load_file(tmp_path / "corrected" / "model.safetensors")
    assert not any("lora" in key for key in weights)
    changed = [n for n, p in corrected.named_parameters() if not torch.equal(p, before[n])]
    assert any("q_proj" in n for n in changed)  # the merged adapters changed the adapted weights
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "corrected")
    ids = torch.randint(3, 96, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, corrected.eval()(ids).logits)


def test_recipe_yaml_parses_into_the_dataclasses():
    from trl import TrlParser

    from hf_minitron.commands.correct_teacher import CorrectTeacherArguments

    parser = TrlParser((CorrectTeacherArguments, TeacherCorrectionConfig))
    config = os.path.join(RECIPES, "smollm2-135m", "teacher_correction.yaml")
    script_args, args = parser.parse_args_and_config(["--config", config, "--max_steps", "3"])
    assert script_args.teacher == "embedded" and script_args.dataset == "embedded"
    assert args.max_steps == 3 and args.learning_rate == pytest.approx(6e-4)
