"""`hf-minitron cache-teacher` keeps the promises of every other writer: it never replaces the teacher it reads,
resolves `~` like the others, and fails on what it can check (sequence length, disk space) before the teacher pass."""

import errno
import os

import pytest
from conftest import tiny_model

from hf_minitron import cache_teacher
from hf_minitron.cli import main


def _argv(checkpoint, text_file, output, *extra):
    return [
        "cache-teacher", "--teacher", str(checkpoint), "--dataset", str(text_file), "--text_column", "content",
        "--seq_length", "16", "--max_train_samples", "4", "--mode", "topk", "--top_k", "4", "--output_dir", str(output),
        *extra,
    ]  # fmt: skip


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_in_the_teachers_folder_is_refused_even_with_overwrite(checkpoint, text_file, where, capsys):
    before = _files(checkpoint)
    output = checkpoint if where == "same" else checkpoint / "cache"
    assert main(_argv(checkpoint, text_file, output, "--overwrite", "true")) == 2
    err = capsys.readouterr().err
    assert "the teacher" in err and "Traceback" not in err
    assert _files(checkpoint) == before


def test_library_refuses_a_cache_over_the_teachers_own_folder(checkpoint, tokenizer):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(checkpoint)
    before = _files(checkpoint)
    samples = [{"input_ids": [1, 2, 3, 4]}]
    with pytest.raises(ValueError, match="the teacher"):
        cache_teacher(teacher, samples, checkpoint, mode="topk", top_k=4, overwrite=True, show_progress=False)
    assert _files(checkpoint) == before


def test_sequence_longer_than_the_teacher_is_refused_before_loading_weights(checkpoint, text_file, tmp_path, capsys):
    # The tiny teacher has 128 positions.
    argv = _argv(checkpoint, text_file, tmp_path / "cache")
    argv[argv.index("--seq_length") + 1] = "4096"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "CacheTeacherArguments.seq_length" in err
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("kind", ["file", "foreign folder"])
def test_output_that_is_a_file_or_a_foreign_folder_is_refused_before_loading_weights(
    checkpoint, text_file, tmp_path, monkeypatch, capsys, kind
):
    from transformers import AutoModelForCausalLM

    def no_loading(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the output was checked")

    mine = tmp_path / "mine"  # a user's folder, holding the data the cache is made from
    mine.mkdir()
    data = mine / text_file.name
    data.write_bytes(text_file.read_bytes())
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    before = _files(mine)
    assert main(_argv(checkpoint, data, data if kind == "file" else mine, "--overwrite", "true")) == 2
    err = capsys.readouterr().err
    assert ("not a directory" if kind == "file" else "does not look like a model output") in err
    assert "Traceback" not in err and _files(mine) == before


def test_home_relative_output_is_written_under_home(checkpoint, text_file, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert main(_argv(checkpoint, text_file, "~/cache")) == 0
    assert (home / "cache" / "teacher_cache.json").is_file()
    assert not (tmp_path / "~").exists()


def test_too_little_disk_fails_before_the_teacher_pass(tmp_path, monkeypatch):
    import shutil

    import hf_minitron.distillation.teacher_cache_writer as module

    teacher = tiny_model("llama")
    calls = []
    monkeypatch.setattr(module, "_write_shard", lambda *a, **k: calls.append(a) or {})
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    samples = [{"input_ids": list(range(1, 17))} for _ in range(8)]
    with pytest.raises(OSError) as error:
        cache_teacher(teacher, samples, tmp_path / "cache", mode="hidden", show_progress=False)
    assert error.value.errno == errno.ENOSPC and "Not enough disk space" in str(error.value)
    assert calls == [] and not os.path.exists(tmp_path / "cache")


def test_estimated_bytes_cover_what_is_written(tmp_path):
    from hf_minitron.distillation.teacher_cache import estimated_cache_bytes, read_cache_info

    teacher = tiny_model("llama")
    samples = [{"input_ids": list(range(1, 17))} for _ in range(8)]
    for mode, extra in (("hidden", {}), ("topk", {"top_k": 4})):
        out = tmp_path / mode
        cache_teacher(teacher, samples, out, mode=mode, show_progress=False, **extra)
        info = read_cache_info(out)
        written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        estimate = estimated_cache_bytes(info, len(samples), 16)
        # Arrow adds offsets and a schema per shard; the estimate is what the values take, within a factor of 2.
        assert written / 2 <= estimate <= written * 2, (mode, estimate, written)
