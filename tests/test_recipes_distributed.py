"""Recipes under `accelerate launch` with 2 CPU processes (DDP, FSDP2 or ZeRO-3 over gloo), as users launch them on GPUs.

`accelerate launch --cpu` always starts a single process, so the configs are launched as they are (torchrun
underneath) and the trainers are put on the CPU with `use_cpu` (DDP, FSDP) or `ddp_backend="gloo"` (DeepSpeed, which
accelerate turns off under `use_cpu`; without a GPU DeepSpeed runs on its CPU accelerator).
Accelerate enables FSDP only on GPU backends; `scripts/fsdp_on_cpu/sitecustomize.py` lifts that gate in the launched
processes so that the real FSDP2 paths (accelerate's `fully_shard` of the student, our sharded teacher, the gathered
final checkpoint) run on the CPU.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from conftest import _ALIGNMENT, _tiny_recipe, tiny_model
from transformers import AutoModelForCausalLM

from hf_minitron.io import OUTPUT_MARKER


ROOT = Path(__file__).parent.parent
RECIPES = ROOT / "recipes"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script, *args, config="ddp.yaml"):
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", RECIPES / "accelerate_configs" / config,
        "--num_processes", 2, "--mixed_precision", "no", "--main_process_port", _free_port(),
        RECIPES / script, *args,
    ]  # fmt: skip
    # One thread per process: two processes on a 2-core machine; no GPU even where there is one.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if config == "fsdp.yaml":
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(__file__).parent / "scripts" / "fsdp_on_cpu"), env.get("PYTHONPATH", "")]
        )
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def _leftovers(directory: Path) -> list[Path]:
    # Atomic writes go through temporary siblings; two processes writing would leave or clash on them.
    # Our output marker (io.OUTPUT_MARKER) is the one hidden file a finished output holds on purpose.
    return [
        p for p in directory.rglob("*") if ".tmp" in p.name or (p.name.startswith(".") and p.name != OUTPUT_MARKER)
    ]


# What each accelerate config must report: the accelerate distributed type and where the teacher lives.
_PLACEMENTS = {
    "ddp.yaml": "MULTI_CPU; teacher: replicated on 2 processes",
    "fsdp.yaml": "FSDP; teacher: sharded with FSDP2 over 2 processes",
    "deepspeed_zero3.yaml": "DEEPSPEED; teacher: partitioned with DeepSpeed ZeRO-3 over 2 processes",
}


def test_distill_recipe_under_ddp_fsdp2_and_zero3(checkpoint, tokenizer, tmp_path):
    """The distillation recipe under the DDP, FSDP2 and DeepSpeed ZeRO-3 accelerate configs: the same global batches
    give the same student, the teacher is replicated / sharded / partitioned, one process writes a stock checkpoint."""
    student = tmp_path / "student"
    # Tied embeddings (as SmolLM2's): under ZeRO-3 the lm_head weight is then also the embedding's partitioned weight.
    tiny_model("llama", seed=1, tie_word_embeddings=True).save_pretrained(student)
    tokenizer.save_pretrained(student)
    finals = {}
    for config, placement in _PLACEMENTS.items():
        # DeepSpeed is off under `use_cpu`; without a GPU its process group needs gloo named explicitly.
        device = ["--ddp_backend", "gloo"] if config == "deepspeed_zero3.yaml" else ["--use_cpu", "true"]
        final = finals[config] = tmp_path / f"distilled-{config}"
        out = _launch(
            "distill.py",
            "--config", RECIPES / "smollm2-135m" / "distill.yaml",
            "--student", student, "--teacher", checkpoint, "--seq_length", 32, "--max_train_samples", 16,
            "--per_device_train_batch_size", 2, "--max_steps", 3, "--logging_steps", 1, *device,
            "--output_dir", tmp_path / f"run-{config}", "--final_model_dir", final,
            config=config,
        )  # fmt: skip
        assert out.count("Final training loss:") == 1  # reported by the main process only
        assert f"Distributed: {placement}" in out
        assert not _leftovers(final) and not (final / "training_args.bin").exists()

    before = AutoModelForCausalLM.from_pretrained(student).state_dict()
    ddp = AutoModelForCausalLM.from_pretrained(finals["ddp.yaml"]).state_dict()
    assert any(not (value == before[name]).all() for name, value in ddp.items())
    for config in ("fsdp.yaml", "deepspeed_zero3.yaml"):
        sharded = AutoModelForCausalLM.from_pretrained(finals[config]).state_dict()
        assert sharded.keys() == ddp.keys()
        for name, value in ddp.items():
            torch.testing.assert_close(sharded[name], value, rtol=1e-4, atol=1e-6, msg=f"{config}: {name}")


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
