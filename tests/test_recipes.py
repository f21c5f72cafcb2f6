"""The single-stage recipe scripts (`recipes/<stage>.py`) run as users run them: a subprocess, YAML + CLI overrides."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hub_server import FakeHub
from transformers import AutoModelForCausalLM


RECIPES = Path(__file__).parent.parent / "recipes"
TOKEN = "hf_recipe_test_token"


def _run(script, *args, env=None):
    result = subprocess.run(
        [sys.executable, str(RECIPES / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_prune_then_evaluate_recipes(checkpoint, tmp_path):
    pruned = tmp_path / "pruned"
    out = _run(
        "prune.py",
        "--config", RECIPES / "smollm2-135m" / "prune.yaml",
        "--teacher", checkpoint, "--output_dir", pruned,
        "--hidden_size", 24, "--intermediate_size", 48, "--num_attention_heads", 2,
        "--calibration_samples", 8, "--calibration_seq_length", 32, "--calibration_batch_size", 4,
    )  # fmt: skip
    assert f"Pruned checkpoint (24,792 of 43,296 parameters): {pruned}" in out
    model = AutoModelForCausalLM.from_pretrained(pruned)
    assert (model.config.hidden_size, model.config.intermediate_size, model.config.num_attention_heads) == (24, 48, 2)
    assert (pruned / "importance" / "importance.json").is_file() and (pruned / "pruning_record.json").is_file()

    result_file = tmp_path / "evaluation.json"
    out = _run(
        "evaluate.py",
        "--config", RECIPES / "smollm2-135m" / "evaluate.yaml",
        "--model", pruned, "--teacher", checkpoint, "--limit", 4,
        "--seq_length", 32, "--max_eval_samples", 4, "--output_file", result_file,
    )  # fmt: skip
    assert "Teacher vs student" in out and f"Results: {result_file}" in out
    result = json.loads(result_file.read_text())
    assert result["models"]["student"]["name"] == str(pruned)
    assert result["models"]["student"]["num_parameters"] == 24_792
    assert result["tasks"]["pydoc_topics"]["num_samples"] == 4
    for role in ("teacher", "student"):
        assert result["models"][role]["heldout"]["num_tokens"] == 4 * 31


def test_push_recipe_uploads_to_a_local_hub(checkpoint, tmp_path):
    with FakeHub(tokens=[TOKEN]) as hub:
        out = _run(
            "push.py",
            "--config", RECIPES / "smollm2-135m" / "push.yaml",
            "--folder", checkpoint, "--repo_id", "tester/tiny-minitron", "--endpoint", hub.url,
            env={"HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf")},
        )  # fmt: skip
    repo = hub.repos["tester/tiny-minitron"]
    assert repo["private"] is True  # from push.yaml
    local = {p.relative_to(checkpoint).as_posix(): p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()}
    assert repo["files"] == local
    assert repo["messages"] == [yaml.safe_load((RECIPES / "smollm2-135m" / "push.yaml").read_text())["commit_message"]]
    assert f"Uploaded: {hub.url}/tester/tiny-minitron/commit/" in out and TOKEN not in out


def test_teacher_correction_recipe_on_local_files(checkpoint, text_file, tmp_path):
    corrected = tmp_path / "corrected"
    _run(
        "teacher_correction.py",
        "--config", RECIPES / "smollm2-135m" / "teacher_correction.yaml",
        "--teacher", checkpoint, "--dataset", text_file, "--text_column", "content",
        "--seq_length", 16, "--max_train_samples", 4, "--max_steps", 1, "--warmup_steps", 0, "--eval_strategy", "no",
        "--save_strategy", "no", "--output_dir", tmp_path / "run", "--corrected_model_dir", corrected,
    )  # fmt: skip
    before = AutoModelForCausalLM.from_pretrained(checkpoint).state_dict()
    after = AutoModelForCausalLM.from_pretrained(corrected).state_dict()
    assert any(not (after[name] == before[name]).all() for name in before)


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("minitron.py", ["--config", RECIPES / "smollm2-135m" / "minitron.yaml", "--distillation.max_steps", "-5"],
         "DistillationConfig.max_steps=-5 is invalid"),
        ("prune.py", ["--config", RECIPES / "smollm2-135m" / "prune.yaml", "--output", "x"],
         "--output (on the command line) is now --output_dir"),
    ],
)  # fmt: skip
def test_a_recipe_reports_our_errors_in_one_line(script, args, message, tmp_path):
    result = subprocess.run(
        [sys.executable, str(RECIPES / script), *map(str, args)], capture_output=True, text=True, timeout=300,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: {message}" in result.stderr


def test_stage_recipes_write_apart_from_the_demo():
    # After `make demo` (outputs/smollm2-135m), each stage recipe runs as written: none writes into the demo's folder.
    import yaml

    for path in sorted((RECIPES / "smollm2-135m").glob("*.yaml")):
        if path.stem.startswith("minitron"):
            continue
        values = yaml.safe_load(path.read_text())
        for key in ("output_dir", "final_model_dir", "corrected_model_dir", "output_file"):
            if key in values:
                assert not str(values[key]).startswith("outputs/smollm2-135m/"), (path.name, key, values[key])
