import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from hf_minitron.pipeline import build_pipeline_config, load_pipeline_config, run_pipeline


RECIPES = Path(__file__).parent.parent / "recipes"


def _tiny_recipe(checkpoint, output_dir, **top):
    return {
        "teacher": str(checkpoint),
        "output_dir": str(output_dir),
        "seq_length": 32,
        "max_train_samples": 16,
        "max_eval_samples": 4,
        "eval_tasks": "",
        "write_model_card": False,
        **top,
        "pruning": {
            "hidden_size": 24,
            "intermediate_size": 48,
            "num_attention_heads": 2,
            "calibration_samples": 8,
            "calibration_seq_length": 32,
        },
        "distillation": {
            "max_steps": 3,
            "per_device_train_batch_size": 2,
            "report_to": "none",
            "logging_steps": 1,
            "save_steps": 2,
            "learning_rate": 1e-3,
        },
        "teacher_correction": {"max_steps": 2, "per_device_train_batch_size": 2, "report_to": "none"},
    }


def test_minitron_chain_end_to_end_and_resume(checkpoint, tmp_path):
    out = tmp_path / "run"
    recipe = _tiny_recipe(
        checkpoint, out, correct_teacher=True, eval_tasks="pydoc_topics", eval_limit=4, write_model_card=True
    )
    summary = run_pipeline(*build_pipeline_config(recipe), show_progress=False)
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert final.config.hidden_size == 24 and final.config.intermediate_size == 48
    assert (out / "final" / "pruning_record.json").is_file()
    assert not any("projection" in k for k in json.loads((out / "final" / "config.json").read_text()))
    pruned = AutoModelForCausalLM.from_pretrained(out / "pruned")
    changed = [name for name, p in final.state_dict().items() if not (p == pruned.state_dict()[name]).all()]
    assert changed, "distillation did not change the student"
    assert summary["stages"]["distillation"]["tokens"] == 3 * 2 * 32
    assert any("kd_loss" in entry for entry in summary["stages"]["distillation"]["log_history"])
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert set(evaluation["models"]) == {"teacher", "student"}
    assert evaluation["tasks"]["pydoc_topics"]["num_samples"] == 4
    assert evaluation["models"]["student"]["heldout"]["perplexity"] > 1
    assert (out / "teacher_correction" / "config.json").is_file()
    card = (out / "final" / "README.md").read_text()
    assert card.startswith("---") and "pydoc_topics" in card and "2407.14679" in card
    assert "# run\n" in card and ".tmp" not in card  # named after the run folder, not the temporary one
    assert not (out / "final" / "training_args.bin").exists()  # no pickle in the published folder
    assert "24" in card and (out / "final" / "loss_curves.png").is_file()

    # Rerun: every stage is reused, nothing recomputed (the stage folders keep their modification times).
    stamps = {p: p.stat().st_mtime_ns for p in (out / "pruned", out / "distilled", out / "final")}
    run_pipeline(*build_pipeline_config(recipe), show_progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_unknown_keys_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown key\(s\) \['hiden_size'\] in the 'pruning' section"):
        build_pipeline_config({"pruning": {"hiden_size": 3}})
    with pytest.raises(ValueError, match=r"Unknown key\(s\) \['teachr'\] in the 'top level'"):
        build_pipeline_config({"teachr": "x"})


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*/minitron*.yaml")), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_pipeline_recipe_validates(path):
    data = yaml.safe_load(path.read_text())
    # GPU recipes train in bf16, which TrainingArguments refuses on this CPU-only machine: validate everything else.
    overrides = {f"{s}.bf16": False for s in ("distillation", "teacher_correction") if (data.get(s) or {}).get("bf16")}
    args, pruning, distillation, correction = load_pipeline_config(path, overrides)
    assert args.output_dir and distillation.output_dir.startswith(args.output_dir)
    for key, value in data["pruning"].items():
        assert getattr(pruning, key) == value


def test_recipe_script_runs_with_overrides(checkpoint, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_tiny_recipe(checkpoint, tmp_path / "run")))
    result = subprocess.run(
        [
            sys.executable,
            str(RECIPES / "minitron.py"),
            "--config",
            str(recipe),
            "--distillation.max_steps",
            "2",
            "--pruning.hidden_size",
            "16",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").config.hidden_size == 16


def test_prune_recipe_validates():
    from hf_minitron.checkpoint_pruning import PruneArguments
    from hf_minitron.cli import parse_dataclasses
    from hf_minitron.pruning_config import PrunedConfig

    path = RECIPES / "smollm2-135m" / "prune.yaml"
    args, config = parse_dataclasses((PruneArguments, PrunedConfig), ["--config", str(path)], "test")
    data = yaml.safe_load(path.read_text())
    assert args.model == data["model"] and config.hidden_size == data["hidden_size"]
