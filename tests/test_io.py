import pytest

from hf_minitron.io import atomic_directory


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
