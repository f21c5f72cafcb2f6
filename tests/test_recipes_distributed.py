"""Recipes under `accelerate launch` with 2 CPU processes (DDP over gloo), as users launch them on several GPUs.

`accelerate launch --cpu` always starts a single process, so the DDP config is launched as is (torchrun underneath) and
the trainers are put on the CPU with `use_cpu`: they then set up the gloo process group.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import tiny_model
from test_pipeline import _ALIGNMENT, _tiny_recipe
from transformers import AutoModelForCausalLM


ROOT = Path(__file__).parent.parent
RECIPES = ROOT / "recipes"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script, *args):
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", RECIPES / "accelerate_configs" / "ddp.yaml",
        "--num_processes", 2, "--mixed_precision", "no", "--main_process_port", _free_port(),
        RECIPES / script, *args,
    ]  # fmt: skip
    # One thread per process: two processes on a 2-core machine; no GPU even where there is one.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def _leftovers(directory: Path) -> list[Path]:
    # Atomic writes go through temporary siblings; two processes writing would leave or clash on them.
    return [p for p in directory.rglob("*") if ".tmp" in p.name or p.name.startswith(".")]


def test_distill_recipe_under_ddp(checkpoint, tokenizer, tmp_path):
    student = tmp_path / "student"
    tiny_model("llama", seed=1).save_pretrained(student)
    tokenizer.save_pretrained(student)
    final = tmp_path / "distilled"
    out = _launch(
        "distill.py",
        "--config", RECIPES / "smollm2-135m" / "distill.yaml",
        "--student", student, "--teacher", checkpoint, "--seq_length", 32, "--max_train_samples", 16,
        "--per_device_train_batch_size", 2, "--max_steps", 3, "--logging_steps", 1, "--use_cpu", "true",
        "--output_dir", tmp_path / "run", "--final_model_dir", final,
    )  # fmt: skip
    assert out.count("Final training loss:") == 1  # reported by the main process only
    model = AutoModelForCausalLM.from_pretrained(final)
    before = AutoModelForCausalLM.from_pretrained(student).state_dict()
    assert any(not (value == before[name]).all() for name, value in model.state_dict().items())
    assert not _leftovers(final) and not (final / "training_args.bin").exists()


def test_minitron_recipe_under_ddp(checkpoint, tmp_path):
    run = tmp_path / "run"
    recipe = _tiny_recipe(checkpoint, run, write_model_card=True, eval_tasks="pydoc_topics", eval_limit=4)
    recipe["distillation"]["use_cpu"] = True  # the other trainer sections follow it
    recipe["sft"] = {**_ALIGNMENT, "max_train_samples": 8}
    config = tmp_path / "minitron.yaml"
    config.write_text(yaml.safe_dump(recipe))
    out = _launch("minitron.py", "--config", config)

    assert out.count("Final checkpoint and model card:") == 1
    # Both processes trained together: an epoch of 16 packed samples is 16 / (2 processes x 2) = 4 steps.
    distilled = json.loads((run / "distilled" / "log_history.json").read_text())
    assert distilled[0]["step"] == 1 and distilled[0]["epoch"] == 0.25
    sft = json.loads((run / "sft" / "log_history.json").read_text())
    assert sft[0]["step"] == 1 and sft[0]["epoch"] == 0.5  # 8 chats / (2 x 2)
    # Every output is complete and valid, written by one process.
    final = AutoModelForCausalLM.from_pretrained(run / "final")
    assert final.config.hidden_size == 24
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert evaluation["models"]["student"]["name"].endswith("+ SFT)")
    card = (run / "final" / "README.md").read_text()
    assert card.startswith("---") and "### Alignment" in card and "pydoc_topics" in card
    assert not _leftovers(run / "final") and not _leftovers(run / "pruned")
