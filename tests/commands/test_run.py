import importlib.util
import inspect
import json
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from conftest import _ALIGNMENT, ROOT, _tiny_recipe
from transformers import AutoModelForCausalLM

from hf_minitron.commands.run import run_pipeline
from hf_minitron.commands.run_config import build_pipeline_config, load_pipeline_config


RECIPES = ROOT / "recipes"
# Fields that TrainingArguments / TRL configs normalise (enums, "none" -> [], rpo_alpha -> loss_type): not compared.
_NORMALISED = ("report_to", "lr_scheduler_type", "eval_strategy", "save_strategy", "loss_type")


def test_minitron_chain_end_to_end_and_resume(checkpoint, tmp_path, capsys):
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
    # Named after the model (the teacher's name and the student's size), not the run folder or a temporary one; the
    # quick start names a Hub placeholder that `push` fills in, never a local path that loads nowhere else; a 3-step
    # run says it is a smoke test; the generation cache is on again after training.
    assert "\n# teacher-Minitron-25K\n" in card and ".tmp" not in card
    assert 'model_id = "<namespace>/teacher-Minitron-25K"' in card and str(out.resolve()) not in card
    assert "github.com/hf-minitron" not in card and "**A smoke test, not a model to use.**" in card
    assert json.loads((out / "final" / "config.json").read_text())["use_cache"] is True
    # The resumable checkpoints of finished training stages are gone (keep_checkpoints: false), their results stay.
    assert not (out / "distill_checkpoints").exists() and not (out / "teacher_correction_checkpoints").exists()
    for plot in ("head_importance.png", "mlp_importance.png", "embedding_importance.png"):
        assert (out / "final" / plot).is_file() and f"]({plot})" in card
    assert not (out / "final" / "layer_importance.png").exists()  # depth was not pruned
    printed = capsys.readouterr().out
    headings = re.findall(r"^=== \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] (\d)/5 (.*) -> ", printed, re.M)
    assert [number for number, _ in headings] == ["1", "2", "3", "4", "5"], printed
    assert headings[0][1].startswith("Teacher correction") and headings[2][1].startswith("Distillation")
    assert printed.index("Teacher vs student") < printed.index("Wall time per stage")
    assert re.search(r"held-out loss .*\d\.\d{3} .*\d\.\d{3}", printed)
    assert "pydoc_topics acc (n=4)" in printed and "teacher-Minitron-25K" in printed
    assert not (out / "final" / "training_args.bin").exists()  # no pickle in the published folder
    assert "24" in card and (out / "final" / "loss_curves.png").is_file()

    # Rerun: every stage is reused, nothing recomputed (the stage folders keep their modification times).
    stamps = {p: p.stat().st_mtime_ns for p in (out / "pruned", out / "distilled", out / "final")}
    run_pipeline(*build_pipeline_config(recipe), show_progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    printed = capsys.readouterr().out
    reused = re.findall(
        r"^\[[\d :-]+\] \d/5 .*: reused .* \(finished earlier with these settings, took .*\)$", printed, re.M
    )
    assert len(reused) == 5, printed
    assert "Teacher vs student" in printed and printed.count("reused") >= 10  # headings, and the time table


def _weights(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def _same(a, b) -> bool:
    return all((a[name] == b[name]).all() for name in a)


def test_minitron_chain_with_sft_and_dpo_resumes_and_follows_config_changes(checkpoint, tmp_path):
    out = tmp_path / "run"
    recipe = _tiny_recipe(checkpoint, out, write_model_card=True)
    recipe["sft"] = {**_ALIGNMENT, "max_train_samples": 4}
    recipe["dpo"] = {**_ALIGNMENT, "max_train_samples": 2, "rpo_alpha": 1.0, "beta": 0.1}
    summary = run_pipeline(*build_pipeline_config(recipe), show_progress=False)

    # Each stage trained on the previous one's output, and the final folder is the last stage's model.
    distilled, sft, dpo = (_weights(out / name) for name in ("distilled", "sft", "dpo"))
    assert not _same(sft, distilled) and not _same(dpo, sft)
    assert _same(_weights(out / "final"), dpo)
    assert summary["stages"]["sft"]["max_steps"] == 2 and summary["stages"]["dpo"]["rpo_alpha"] == 1.0
    assert json.loads((out / "dpo" / "log_history.json").read_text())  # the stage's own log, next to it
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["models"]["student"]["name"].endswith("(Minitron-pruned + distilled + SFT + DPO)")
    card = (out / "final" / "README.md").read_text()
    assert "### Alignment" in card and "SFT → DPO" in card and "| DPO rpo_alpha | 1 |" in card
    assert "<|im_start|>" in (out / "final" / "tokenizer_config.json").read_text() + "".join(
        p.read_text() for p in (out / "final").glob("*.jinja")
    )  # the chat template set for SFT travels to the published folder

    # Rerun: every stage is reused (the stage folders keep their modification times).
    stages = ("pruned", "distilled", "sft", "dpo", "final")
    stamps = {name: (out / name).stat().st_mtime_ns for name in stages}
    run_pipeline(*build_pipeline_config(recipe), show_progress=False)
    assert {name: (out / name).stat().st_mtime_ns for name in stages} == stamps

    # Dropping DPO: SFT is still reused, but the evaluation and the final folder now describe the SFT model.
    del recipe["dpo"]
    run_pipeline(*build_pipeline_config(recipe), show_progress=False)
    assert (out / "sft").stat().st_mtime_ns == stamps["sft"]
    assert _same(_weights(out / "final"), sft)
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["models"]["student"]["name"].endswith("(Minitron-pruned + distilled + SFT)")
    assert "DPO" not in (out / "final" / "README.md").read_text()


_ON_POLICY = dict(
    max_steps=2, per_device_train_batch_size=2, prompt_length=8, max_completion_length=8, learning_rate=1e-2,
    logging_steps=1, save_strategy="no", report_to="none", bf16=False, gradient_checkpointing=False,
)  # fmt: skip


def test_on_policy_stage_runs_after_distillation_and_is_carded(checkpoint, tmp_path):
    out = tmp_path / "run"
    recipe = _tiny_recipe(checkpoint, out, write_model_card=True)
    recipe["on_policy"] = dict(_ON_POLICY)
    summary = run_pipeline(*build_pipeline_config(recipe), show_progress=False, report=False)

    # The stage trained the distilled student, and the final folder is its model.
    distilled, on_policy = _weights(out / "distilled"), _weights(out / "on_policy")
    assert not _same(on_policy, distilled) and _same(_weights(out / "final"), on_policy)
    history = json.loads((out / "on_policy" / "log_history.json").read_text())
    assert any("completions/mean_length" in entry for entry in history)  # trained on the student's own samples
    assert summary["stages"]["on_policy"]["beta"] == 1.0
    assert not (out / "on_policy_checkpoints").exists()
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["models"]["student"]["name"].endswith("(Minitron-pruned + distilled + on-policy distilled)")
    card = (out / "final" / "README.md").read_text()
    assert "### On-policy distillation" in card and "**On-policy distillation**" in card and "reverse KL" in card
    assert "| max_completion_length | 8 |" in card

    # Rerun: reused; a changed on-policy setting is refused, naming it, before any stage runs.
    stamp = (out / "on_policy").stat().st_mtime_ns
    run_pipeline(*build_pipeline_config(recipe), show_progress=False, report=False)
    assert (out / "on_policy").stat().st_mtime_ns == stamp
    recipe["on_policy"]["beta"] = 0.5
    with pytest.raises(ValueError, match=r"the 'on_policy' stage there .* Changed: .*beta"):
        run_pipeline(*build_pipeline_config(recipe), show_progress=False, report=False)


def test_on_policy_section_is_checked_up_front():
    *_, after = build_pipeline_config(
        {"output_dir": "o", "seq_length": 16, "on_policy": {"bf16": False, "prompt_length": 8}}
    )
    assert [stage.name for stage in after] == ["on_policy"]
    assert after[0].training_args.output_dir == "o/on_policy_checkpoints" and after[0].final_model_dir == "o/on_policy"
    with pytest.raises(ValueError, match=r"on_policy.prompt_length=64 is longer than .*seq_length=16"):
        build_pipeline_config({"seq_length": 16, "on_policy": {"bf16": False}})
    with pytest.raises(ValueError, match=r"In the 'on_policy' section.*OnPolicyConfig.beta=2"):
        build_pipeline_config({"on_policy": {"bf16": False, "beta": 2}})
    with pytest.raises(ValueError, match=r"Unknown key\(s\) \['prompt_lenght'\] in the 'on_policy' section"):
        build_pipeline_config({"on_policy": {"prompt_lenght": 8}})
    with pytest.raises(ValueError, match=r"on_policy.output_dir is set by the pipeline"):
        build_pipeline_config({"on_policy": {"output_dir": "x"}})
    *_, after = build_pipeline_config({"on_policy": {"bf16": False}, "sft": {"bf16": False}})
    assert [stage.name for stage in after] == ["on_policy", "sft"]


def test_alignment_sections_are_checked_up_front():
    with pytest.raises(ValueError, match=r"Unknown key\(s\) \['lora_rr'\] in the 'sft' section.*lora_r"):
        build_pipeline_config({"sft": {"lora_rr": 8}})
    with pytest.raises(ValueError, match=r"dpo.final_model_dir is set by the pipeline"):
        build_pipeline_config({"dpo": {"final_model_dir": "elsewhere"}})
    with pytest.raises(ValueError, match=r"In the 'dpo' section.*rpo_alpha"):
        build_pipeline_config({"dpo": {"rpo_alpha": -1.0, "bf16": False}})
    *_, alignment = build_pipeline_config({"output_dir": "o", "sft": {"bf16": False}, "dpo": None})
    assert [stage.name for stage in alignment] == ["sft"] and alignment[
        0
    ].training_args.output_dir == "o/sft_checkpoints"


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
    overrides.update({f"{s}.bf16": False for s in ("sft", "dpo") if (data.get(s) or {}).get("bf16")})
    args, pruning, distillation, correction, alignment = load_pipeline_config(path, overrides)
    assert args.output_dir and distillation.output_dir.startswith(args.output_dir)
    for key, value in data["pruning"].items():
        assert getattr(pruning, key) == value
    assert [stage.name for stage in alignment] == [s for s in ("on_policy", "sft", "dpo") if data.get(s) is not None]
    for stage in (stage for stage in alignment if stage.name != "on_policy"):
        assert stage.script_args.final_model_dir == str(Path(args.output_dir) / stage.name)
        for key, value in data[stage.name].items():
            owner = next(a for a in (stage.script_args, stage.training_args, stage.model_args) if hasattr(a, key))
            if key not in _NORMALISED:
                assert getattr(owner, key) == value or key == "bf16", f"{stage.name}.{key}"


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


# Single-stage recipes: `recipes/<stage>.py` reads `recipes/<family>/<stage>.yaml` into the dataclasses that its `main`
# takes (search.yaml belongs to the architecture-search work in progress).
STAGE_RECIPES = sorted(
    p
    for p in RECIPES.glob("*/*.yaml")
    if (RECIPES / f"{p.stem}.py").is_file() and p.stem not in ("minitron", "search")
)


def _recipe_dataclasses(stage: str) -> tuple:
    spec = importlib.util.spec_from_file_location(f"recipe_{stage}", RECIPES / f"{stage}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return tuple(typing.get_type_hints(module.main).get(name) for name in inspect.signature(module.main).parameters)


def test_every_stage_recipe_is_covered():
    stages = {p.stem for p in STAGE_RECIPES}
    assert {"prune", "distill", "teacher_correction", "sft", "dpo", "evaluate", "push"} <= stages


@pytest.mark.parametrize("path", STAGE_RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_stage_recipe_validates(path):
    from trl import TrlParser

    data = yaml.safe_load(path.read_text())
    # Parsed exactly as the script parses it: unknown keys and wrong types are errors.
    instances = TrlParser(_recipe_dataclasses(path.stem)).parse_args_and_config(["--config", str(path)])
    for key, value in data.items():
        owner = next((i for i in instances if hasattr(i, key)), None)
        assert owner is not None, f"{path}: {key} is no field of {[type(i).__name__ for i in instances]}"
        if key not in _NORMALISED:
            assert getattr(owner, key) == value, f"{path}: {key}"


def test_processes_without_a_process_group_are_refused(monkeypatch):
    from hf_minitron.commands.run import _process_group

    # Two launched processes on a machine without GPUs and without use_cpu: each would run (and write) everything.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    *_, distillation, _, _ = build_pipeline_config({"distillation": {"report_to": "none"}})
    with pytest.raises(
        ValueError, match=r"WORLD_SIZE=2 .* group of 1: without GPUs, set `distillation.use_cpu: true`"
    ):
        _process_group(distillation)


def test_alignment_lora_fields_reach_the_peft_config():
    from trl import get_peft_config

    *_, (sft,) = build_pipeline_config({"sft": {"use_peft": True, "lora_r": 4, "lora_alpha": 8, "bf16": False}})
    peft_config = get_peft_config(sft.model_args)
    assert (peft_config.r, peft_config.lora_alpha) == (4, 8)
    assert sft.describe()["lora_r"] == 4


def test_use_cpu_of_distillation_carries_to_the_other_trainers():
    recipe = {"distillation": {"use_cpu": True}, "sft": {"bf16": False}, "dpo": {"bf16": False, "use_cpu": False}}
    _, _, distillation, correction, (sft, dpo) = build_pipeline_config(recipe)
    assert distillation.use_cpu and correction.use_cpu and sft.training_args.use_cpu
    assert not dpo.training_args.use_cpu  # an explicit value wins


def test_the_closing_report_says_what_is_evaluated_and_has_no_empty_column(checkpoint, tmp_path, capsys):
    recipe = _tiny_recipe(tmp_path / "x", tmp_path / "run", eval_tasks="pydoc_topics", eval_limit=2)
    recipe["teacher"] = str(checkpoint)
    run_pipeline(*build_pipeline_config(recipe), show_progress=False)
    printed = capsys.readouterr().out
    assert "Evaluating the teacher (" in printed and "on pydoc_topics (2 samples each)" in printed
    assert "Held-out loss of the student (" in printed
    table = printed[printed.index("Wall time per stage") :]
    rows = [line for line in table.splitlines() if line.startswith("│")]
    assert rows and all(line.count("│") == 3 for line in rows)  # two columns, each filled
    assert "(reused)" not in table
