import json
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

from hf_minitron.io import atomic_directory, atomic_write_json


def test_interrupted_write_keeps_the_previous_output(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "config.json").write_text("half")
            raise RuntimeError("killed mid-save")
    assert (target / "config.json").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_successful_overwrite_replaces_whole_directory(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("x")
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "new").write_text("y")
    # config.json of the old output is gone; the marker lists what we wrote
    assert sorted(p.name for p in target.iterdir()) == [".hf_minitron_output.json", "new"]


def test_non_empty_directory_is_refused_without_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "file").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        with atomic_directory(tmp_path / "out"):
            pass
    assert (tmp_path / "out" / "file").read_text() == "mine"


@contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.fixture
def umask_027():
    with umask(0o027):
        yield


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_saved_checkpoint_gets_the_modes_the_umask_gives(umask_027, tmp_path):
    """transformers writes model.safetensors 0600 and mkdtemp makes 0700 folders: under a 027 umask the published
    checkpoint is group-readable like its config.json, and a mode the writer chose is kept."""
    model = tiny_model()
    target = tmp_path / "pruned"
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        assert _mode(tmp / "model.safetensors") == 0o600  # the premise: stock transformers' own mode
        nested = Path(tempfile.mkdtemp(dir=tmp))
        (nested / "state.json").write_text("{}")
        os.chmod(nested / "state.json", 0o600)
        (tmp / "read_only.txt").write_text("x")
        os.chmod(tmp / "read_only.txt", 0o400)
    assert _mode(target) == 0o750
    assert _mode(target / "model.safetensors") == 0o640
    assert _mode(target / "config.json") == 0o640
    assert _mode(target / nested.name) == 0o750
    assert _mode(target / nested.name / "state.json") == 0o640
    assert _mode(target / "read_only.txt") == 0o400
    reloaded = AutoModelForCausalLM.from_pretrained(target)
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


def test_a_private_umask_keeps_the_checkpoint_private(tmp_path):
    target = tmp_path / "pruned"
    with umask(0o077), atomic_directory(target) as tmp:
        tiny_model().save_pretrained(tmp)
    assert _mode(target) == 0o700
    assert {_mode(p) for p in target.iterdir()} == {0o600}


def test_an_atomically_written_file_gets_the_umask_mode_or_keeps_its_own(umask_027, tmp_path):
    new = tmp_path / "results.json"
    atomic_write_json(new, {"loss": 1.0})
    assert _mode(new) == 0o640
    private = tmp_path / "private.json"
    private.write_text("{}")
    os.chmod(private, 0o600)
    atomic_write_json(private, {"loss": 2.0})
    assert _mode(private) == 0o600 and json.loads(private.read_text()) == {"loss": 2.0}
