"""Never produce or publish a broken model.

Non-finite loss weights, temperatures and learning rates are refused; training stops at the first NaN/inf loss or
gradient norm, before that update is applied; weights with a NaN or an infinity are never saved, carded or pushed;
`hf-minitron run` never reuses a stage made with other settings; a teacher given by path must share the student's
tokenizer; and an upload without credentials is refused before any stage runs.
"""

import json
import math

import pytest
import torch
import yaml
from conftest import _tiny_recipe, random_samples, tiny_model, tiny_tokenizer
from hub_server import FakeHub
from transformers import AutoModelForCausalLM

import hf_minitron.evaluation
from hf_minitron import DistillationConfig, DistillationTrainer
from hf_minitron.alignment import RPOConfig
from hf_minitron.cli import main
from hf_minitron.commands.evaluate import EvaluateArguments, evaluate_checkpoints
from hf_minitron.commands.run import run_pipeline
from hf_minitron.commands.run_config import build_pipeline_config
from hf_minitron.distillation.teacher_correction import TeacherCorrectionConfig, correct_teacher
from hf_minitron.hub import push_to_hub
from hf_minitron.io import atomic_save_model
from hf_minitron.validation import NonFiniteError


NON_FINITE = [math.nan, math.inf, -math.inf]


def _args(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path / "run"), report_to="none", max_steps=2, per_device_train_batch_size=2)
    return DistillationConfig(**{**defaults, **kwargs})


# ---------------------------------------------------------------------------------------------- non-finite settings
@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize(
    "field", ["kd_loss_weight", "ce_loss_weight", "kd_temperature", "intermediate_loss_weight", "learning_rate"]
)
def test_distillation_config_refuses_non_finite_values(field, value, tmp_path):
    with pytest.raises(ValueError, match=rf"DistillationConfig\.{field}=.*(finite|invalid)"):
        DistillationConfig(output_dir=str(tmp_path), report_to="none", **{field: value})


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize(
    "cls, field",
    [
        (TeacherCorrectionConfig, "learning_rate"),
        (TeacherCorrectionConfig, "original_learning_rate"),
        (TeacherCorrectionConfig, "weight_decay"),
        (RPOConfig, "rpo_alpha"),
        (RPOConfig, "learning_rate"),
    ],
)
def test_other_training_configs_refuse_non_finite_values(cls, field, value, tmp_path):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field}=.*(finite|invalid)"):
        cls(output_dir=str(tmp_path), report_to="none", bf16=False, **{field: value})


def test_non_finite_weight_in_a_recipe_is_refused_before_any_stage(checkpoint, tmp_path, capsys):
    recipe = _tiny_recipe(checkpoint, tmp_path / "run")
    recipe["distillation"]["kd_loss_weight"] = float("nan")
    path = tmp_path / "minitron.yaml"
    path.write_text(yaml.safe_dump(recipe))  # `.nan` in YAML
    assert main(["run", str(path)]) == 2
    assert "DistillationConfig.kd_loss_weight=nan" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- training stops
def _trainer(tmp_path, student=None, **kwargs):
    return DistillationTrainer(
        model=student if student is not None else tiny_model("llama", seed=1, hidden_size=24, head_dim=6),
        teacher_model=tiny_model("llama"),
        args=_args(tmp_path, save_steps=1, logging_steps=1, **kwargs),
        train_dataset=random_samples(8),
    )


def test_training_stops_at_a_non_finite_loss(tmp_path):
    student = tiny_model("llama", seed=1)
    with torch.no_grad():
        student.model.norm.weight[0] = math.nan  # every logit NaN: the loss is NaN at the first step
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = _trainer(tmp_path, student)
    with pytest.raises(NonFiniteError, match=r"step 1: the loss is NaN or infinite"):
        trainer.train()
    assert not list((tmp_path / "run").glob("checkpoint-*"))  # nothing saved from it
    after = student.state_dict()
    assert all(torch.equal(before[k], after[k]) or torch.isnan(before[k]).any() for k in before)


def test_training_stops_at_a_non_finite_gradient_before_applying_it(tmp_path):
    """A finite loss whose backward overflows: the update is not applied and the checkpoint of step 1 stays the last."""
    student = tiny_model("llama", seed=1)
    trainer = _trainer(tmp_path, student, max_steps=3)
    weight = student.model.layers[0].mlp.down_proj.weight
    calls = []

    def overflow_at_step_2(grad):
        calls.append(1)
        return grad * math.inf if len(calls) == 2 else grad

    weight.register_hook(overflow_at_step_2)
    with pytest.raises(NonFiniteError, match=r"step 2: the gradient norm is NaN or infinite"):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-1"]
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint-1").state_dict()
    assert all(torch.equal(saved[k], v) for k, v in student.state_dict().items() if k in saved)  # step 2 not applied
    assert all(torch.isfinite(v).all() for v in student.state_dict().values())


def test_teacher_correction_stops_at_a_non_finite_loss(tmp_path, tokenizer):
    teacher = tiny_model("llama")
    with torch.no_grad():
        teacher.model.norm.weight[0] = math.inf
    args = TeacherCorrectionConfig(output_dir=str(tmp_path / "run"), report_to="none", max_steps=2, save_steps=1)
    with pytest.raises(NonFiniteError, match="the loss is NaN or infinite"):
        correct_teacher(teacher, args, random_samples(8), processing_class=tokenizer)
    assert not (tmp_path / "run" / "corrected").exists()


# ---------------------------------------------------------------------------------------------- never saved or pushed
def test_a_model_with_nan_weights_is_never_saved(tmp_path):
    trainer = _trainer(tmp_path)
    with torch.no_grad():
        trainer.model.model.layers[1].self_attn.o_proj.weight[0, 0] = math.nan
    target = tmp_path / "final"
    with pytest.raises(NonFiniteError, match=r"model\.safetensors holds 1 NaN/infinite values .*o_proj"):
        atomic_save_model(trainer, target)
    assert not target.exists() and not [p.name for p in tmp_path.iterdir() if p.name.startswith(".final")]


def test_a_pruned_nan_teacher_is_never_written(checkpoint, text_file, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = load_file(checkpoint / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"][0, 0] = math.inf
    save_file(weights, checkpoint / "model.safetensors", metadata={"format": "pt"})
    output = tmp_path / "pruned"
    argv = ["prune", "--teacher", str(checkpoint), "--output_dir", str(output), "--hidden_size", "16"]
    argv += ["--num_attention_heads", "2", "--importance", "magnitude"]
    assert main(argv) == 2
    assert not output.exists()


def test_a_model_with_nan_weights_is_never_pushed(hub_env, tmp_path, monkeypatch):
    folder = tmp_path / "final"
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight[3, 1] = math.nan
    model.save_pretrained(folder)
    (folder / "README.md").write_text("---\nlibrary_name: transformers\n---\n")
    with FakeHub(tokens=["hf_valid_test_token"]) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(NonFiniteError, match="not saved, carded or pushed"):
            push_to_hub(folder, "tester/broken", token="hf_valid_test_token")
        assert hub.requests == [] and hub.repos == {}


# ---------------------------------------------------------------------------------------------- `run` reruns
def _mtimes(out):
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in ("pruned", "distilled", "final")}


def test_rerun_with_changed_settings_is_refused_naming_them(checkpoint, tmp_path):
    out = tmp_path / "run"
    recipe = _tiny_recipe(checkpoint, out, write_model_card=True)
    run_pipeline(*build_pipeline_config(recipe), show_progress=False)
    records = json.loads((out / "distilled.settings.json").read_text())
    assert records["settings"]["distillation"]["max_steps"] == 3
    stamps = _mtimes(out)

    changed = json.loads(json.dumps(recipe))
    changed["distillation"]["max_steps"] = 4
    changed["pruning"]["intermediate_size"] = 32
    with pytest.raises(ValueError) as info:
        run_pipeline(*build_pipeline_config(changed), show_progress=False)
    message = str(info.value)
    assert "'pruned' stage" in message and "pruning.intermediate_size: 48 -> 32" in message
    assert "new output_dir" in message
    assert _mtimes(out) == stamps  # nothing was redone or mixed

    changed = json.loads(json.dumps(recipe))
    changed["distillation"]["learning_rate"] = 5e-4
    with pytest.raises(ValueError, match=r"'distilled' stage.*distillation\.learning_rate: 0\.001 -> 0\.0005"):
        run_pipeline(*build_pipeline_config(changed), show_progress=False)
    assert _mtimes(out) == stamps

    # Settings that do not change the model (how often it logs or saves) reuse every stage.
    neutral = json.loads(json.dumps(recipe))
    neutral["distillation"].update(logging_steps=2, save_steps=1)
    run_pipeline(*build_pipeline_config(neutral), show_progress=False)
    assert _mtimes(out) == stamps


def test_rerun_with_new_evaluation_settings_redoes_only_evaluation_and_card(checkpoint, tmp_path):
    out = tmp_path / "run"
    recipe = _tiny_recipe(checkpoint, out, write_model_card=True)
    run_pipeline(*build_pipeline_config(recipe), show_progress=False)
    stamps = _mtimes(out)
    recipe["max_eval_samples"] = 2
    summary = run_pipeline(*build_pipeline_config(recipe), show_progress=False)
    assert summary["evaluation"]["models"]["student"]["heldout"]["num_tokens"] == 2 * 31
    assert {k: v for k, v in _mtimes(out).items() if k != "final"} == {k: v for k, v in stamps.items() if k != "final"}
    assert (out / "final").stat().st_mtime_ns != stamps["final"]


def test_a_stage_without_its_record_is_not_reused(checkpoint, tmp_path):
    out = tmp_path / "run"
    recipe = _tiny_recipe(checkpoint, out)
    run_pipeline(*build_pipeline_config(recipe), show_progress=False)
    (out / "distilled.settings.json").unlink()  # e.g. made by an older hf-minitron
    with pytest.raises(ValueError, match=r"distilled.settings.json \(the settings it was made with\) is missing"):
        run_pipeline(*build_pipeline_config(recipe), show_progress=False)


def test_push_without_credentials_is_refused_before_any_stage(hub_env, checkpoint, tmp_path):
    out = tmp_path / "run"
    recipe = _tiny_recipe(checkpoint, out, push_to_hub=True, hub_model_id="tester/tiny")
    with pytest.raises(ValueError, match="needs a Hugging Face access token"):
        run_pipeline(*build_pipeline_config(recipe), show_progress=False)
    assert not (out / "pruned").exists()


# ---------------------------------------------------------------------------------------------- tokenizers
def _other_tokenizer(folder, kind: str):
    """Saves into `folder` a tokenizer that is not the student's: two ids swapped (same size), or a larger one."""
    if kind == "larger":
        tiny_tokenizer(128).save_pretrained(folder)
        return
    tiny_tokenizer().save_pretrained(folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = "e", "t"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (folder / "tokenizer.json").write_text(json.dumps(data))


@pytest.mark.parametrize("kind", ["swapped", "larger"])
def test_trainer_refuses_a_teacher_path_with_another_tokenizer(kind, tmp_path, tokenizer):
    teacher = tmp_path / "other_teacher"
    tiny_model("llama", vocab_size=128 if kind == "larger" else 96).save_pretrained(teacher)
    _other_tokenizer(teacher, kind)
    with pytest.raises(ValueError, match="tokenizer .* differ"):
        DistillationTrainer(
            model=tiny_model("llama", seed=1),
            teacher_model=str(teacher),
            args=_args(tmp_path),
            train_dataset=random_samples(4),
            processing_class=tokenizer,
        )


def test_evaluate_scores_a_teacher_with_its_own_tokenizer(checkpoint, tmp_path, monkeypatch):
    teacher = tmp_path / "other_teacher"
    tiny_model("llama").save_pretrained(teacher)
    _other_tokenizer(teacher, "swapped")
    used = {}

    def fake_evaluate_model(model, tokenizer, tasks, **kwargs):
        used[model.name_or_path] = tokenizer.get_vocab()
        return {
            task: {"primary_metric": "acc", "metrics": {"acc": 0.5}, "num_fewshot": 0, "num_samples": 2}
            for task in tasks
        }

    monkeypatch.setattr(hf_minitron.evaluation, "evaluate_model", fake_evaluate_model)
    args = EvaluateArguments(model=str(checkpoint), teacher=str(teacher), output_file=str(tmp_path / "eval.json"))
    evaluate_checkpoints(args, show_progress=False)
    assert used[str(teacher)]["e"] == used[str(checkpoint)]["t"]  # each scored with its own tokenizer

    args.heldout_dataset, args.seq_length = "embedded", 32
    with pytest.raises(ValueError, match="held-out perplexity is per token"):
        evaluate_checkpoints(args, show_progress=False)
