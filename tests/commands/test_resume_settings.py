"""What is reused must be what was asked for: a command resumes its checkpoints only under the settings and from the
inputs they were made with, and inputs are told apart by content, not by size."""

import os

import pytest
import torch
from conftest import _tiny_recipe, tiny_model
from transformers import AutoModelForCausalLM

from hf_minitron.cli import main
from hf_minitron.fingerprints import file_fingerprint, files_fingerprint


@pytest.fixture
def student(tmp_path, tokenizer):
    path = tmp_path / "student"
    tiny_model("llama", seed=1, num_hidden_layers=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _distill(checkpoint, student, text_file, run, *extra):
    return main(
        ["distill", "--student", str(student), "--teacher", str(checkpoint), "--dataset", str(text_file)]
        + ["--text_column", "content", "--seq_length", "16", "--max_train_samples", "8", "--max_steps", "2"]
        + ["--save_steps", "1", "--learning_rate", "0.01", "--per_device_train_batch_size", "2", "--report_to", "none"]
        + ["--output_dir", str(run), *extra]
    )


def test_distill_refuses_to_resume_under_other_settings_or_from_another_student(
    checkpoint, student, text_file, tmp_path, tokenizer, capsys
):
    run = tmp_path / "run"
    assert _distill(checkpoint, student, text_file, run) == 0
    assert (run / "checkpoint-2").is_dir() and (run / "resume_settings.json").is_file()
    capsys.readouterr()
    # Another learning rate: the old run would be "resumed" and its model returned as this one's.
    assert _distill(checkpoint, student, text_file, run, "--learning_rate", "0.001") == 2
    err = capsys.readouterr().err
    assert "other settings or inputs" in err and "training.learning_rate: 0.01 -> 0.001" in err
    # Another student of another shape (a traceback while loading the checkpoint, before).
    other = tmp_path / "other_student"
    tiny_model("llama", seed=2, num_hidden_layers=2).save_pretrained(other)
    tokenizer.save_pretrained(other)
    assert _distill(checkpoint, other, text_file, run) == 2
    err = capsys.readouterr().err
    assert "student." in err and "Traceback" not in err
    # The same settings resume (and find the run finished).
    assert _distill(checkpoint, student, text_file, run) == 0


def test_a_same_size_replacement_changes_the_fingerprint(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(3 << 20))
    before = file_fingerprint(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte in the middle, size unchanged
    path.write_bytes(bytes(data))
    assert file_fingerprint(path) != before and file_fingerprint(path)[0] == before[0]
    # The same bytes elsewhere, or behind a link, are the same input.
    copy, link = tmp_path / "copy" / "weights.bin", tmp_path / "link"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    link.symlink_to(copy.parent)
    assert files_fingerprint([copy]) == files_fingerprint([path]) == files_fingerprint([link / "weights.bin"])


def test_run_does_not_reuse_stages_of_a_teacher_replaced_by_one_of_the_same_size(checkpoint, tmp_path):
    from hf_minitron.commands.run import run_pipeline
    from hf_minitron.commands.run_config import build_pipeline_config

    out = tmp_path / "run"
    recipe = _tiny_recipe(checkpoint, out)
    run_pipeline(*build_pipeline_config(recipe), show_progress=False, report=False)
    # Retrain the teacher a little and save it over the old one: every file keeps its size.
    weights = checkpoint / "model.safetensors"
    size = weights.stat().st_size
    teacher = AutoModelForCausalLM.from_pretrained(checkpoint)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01)
    teacher.save_pretrained(checkpoint)
    assert weights.stat().st_size == size
    with pytest.raises(ValueError, match=r"teacher_files\.model\.safetensors"):
        run_pipeline(*build_pipeline_config(recipe), show_progress=False, report=False)


def test_a_users_file_named_like_the_resume_record_is_never_overwritten(tmp_path):
    from types import SimpleNamespace

    from hf_minitron.io import resume_checkpoint

    run = tmp_path / "theirs"
    run.mkdir()
    (run / "resume_settings.json").write_text("my notes\n")
    with pytest.raises(ValueError, match="is not an hf-minitron resume record"):
        resume_checkpoint(SimpleNamespace(output_dir=str(run), resume_from_checkpoint=None, learning_rate=1e-3))
    assert (run / "resume_settings.json").read_text() == "my notes\n"
    # Our own record from an earlier fresh start is replaced by the new run's.
    other = tmp_path / "ours"
    assert (
        resume_checkpoint(SimpleNamespace(output_dir=str(other), resume_from_checkpoint=None, learning_rate=1e-3))
        is None
    )
    assert (
        resume_checkpoint(SimpleNamespace(output_dir=str(other), resume_from_checkpoint=None, learning_rate=2e-3))
        is None
    )
    assert '"learning_rate": 0.002' in (other / "resume_settings.json").read_text()
