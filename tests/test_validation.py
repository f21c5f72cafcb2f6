"""Numbers get bounds before any work; a run that trained nothing writes no card; a Hub failure after a finished run
is one line that says where the model is."""

import pytest
import yaml
from conftest import _tiny_recipe

from hf_minitron import DistillationConfig, TeacherCorrectionConfig
from hf_minitron.cli import main
from hf_minitron.commands.run_config import MinitronArguments


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_steps", -5),
        ("max_steps", 10**12),
        ("gradient_accumulation_steps", 0),
        ("per_device_train_batch_size", 0),
        ("learning_rate", -1e-4),
        ("kd_temperature", 1e9),
        ("kd_temperature", float("inf")),
        ("learning_rate", float("nan")),
    ],
)
def test_distillation_numbers_out_of_range_are_refused(field, value, tmp_path):
    with pytest.raises(ValueError, match=rf"DistillationConfig\.{field}={value!r} is invalid"):
        DistillationConfig(output_dir=str(tmp_path), report_to="none", **{field: value})


def test_zero_epochs_train_nothing_and_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"TeacherCorrectionConfig\.num_train_epochs=0"):
        TeacherCorrectionConfig(output_dir=str(tmp_path), report_to="none", num_train_epochs=0)
    DistillationConfig(output_dir=str(tmp_path), report_to="none", num_train_epochs=0, max_steps=5)  # steps decide


@pytest.mark.parametrize("field, value", [("eval_limit", -3), ("max_eval_samples", 0), ("max_train_samples", 0)])
def test_run_limits_out_of_range_are_refused(field, value):
    with pytest.raises(ValueError, match=rf"MinitronArguments\.{field}={value!r} is invalid"):
        MinitronArguments(**{field: value})


def test_cli_refuses_bad_numbers_before_loading_anything(checkpoint, tmp_path, capsys, monkeypatch):
    loads = []
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: loads.append(a))
    argv = ["distill", "--student", str(checkpoint), "--teacher", str(checkpoint), "--output_dir", str(tmp_path / "r")]
    assert main([*argv, "--gradient_accumulation_steps", "0", "--report_to", "none"]) == 2
    assert "gradient_accumulation_steps=0 is invalid: use at least 1" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(checkpoint), "--limit", "-1"]) == 2
    assert loads == [] and not (tmp_path / "r").exists()


def test_a_run_that_trained_zero_steps_writes_no_student_and_no_card(checkpoint, tmp_path, monkeypatch):
    from hf_minitron.commands.run import run_pipeline
    from hf_minitron.commands.run_config import build_pipeline_config
    from hf_minitron.distillation.trainer import DistillationTrainer

    monkeypatch.setattr(DistillationTrainer, "train", lambda self, **kwargs: None)  # as if no batch came
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="trained 0 steps"):
        run_pipeline(*build_pipeline_config(_tiny_recipe(checkpoint, out)), show_progress=False, report=False)
    assert not (out / "distilled").exists() and not (out / "final").exists()


def test_a_hub_failure_after_the_run_is_one_line_and_keeps_the_model(checkpoint, tmp_path, monkeypatch, capsys):
    import hf_minitron.hub as hub

    def fail(*args, **kwargs):
        raise hub.HubUploadError("Upload to tester/tiny failed: the Hub answered 503 (Service Unavailable).")

    monkeypatch.setattr(hub, "check_push_ready", lambda *a, **k: ("token", "endpoint"))
    monkeypatch.setattr(hub, "push_to_hub", fail)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_tiny_recipe(checkpoint, tmp_path / "run", push_to_hub=True, hub_model_id="t/t")))
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "503" in err and "The finished model stays in" in err and "Traceback" not in err
    assert (tmp_path / "run" / "final" / "config.json").is_file()
