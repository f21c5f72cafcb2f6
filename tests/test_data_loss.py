"""No run of ours deletes or replaces files it did not write.

`--overwrite` replaces only an earlier output of hf-minitron (its `.hf_minitron_output.json` marker lists the files we
wrote, and nothing else is there); outputs that overlap the source model are refused; a target that appears while we
write is left alone; symlinks and `~` are resolved as model paths are; unwritable outputs fail before any weights are
loaded; and a finished result that cannot be moved into place is kept in a visible folder that the error names.
"""

import errno
import json
import multiprocessing
import os
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

import hf_minitron.io
from hf_minitron import PrunedConfig
from hf_minitron.cli import main
from hf_minitron.commands.evaluate import EvaluateArguments, evaluate_checkpoints
from hf_minitron.commands.prune import PruneArguments, prune_checkpoint
from hf_minitron.commands.run import run_pipeline
from hf_minitron.commands.run_config import MinitronArguments, build_pipeline_config
from hf_minitron.io import OUTPUT_MARKER, atomic_directory, atomic_write_json, is_own_output


RECIPES = Path(__file__).parent.parent / "recipes"
SMALL = dict(hidden_size=16, num_attention_heads=2, calibration_samples=4, calibration_seq_length=16)


def snapshot(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def hidden_leftovers(parent: Path) -> list[str]:
    return sorted(
        p.name for p in parent.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)
    )


def kept_copies(target: Path) -> list[Path]:
    return sorted(p for p in target.parent.iterdir() if p.name.startswith(f"{target.name}.unsaved-"))


def prune_args(checkpoint, output, text_file, **kwargs):
    return PruneArguments(
        teacher=str(checkpoint),
        output_dir=str(output),
        calibration_data=str(text_file),
        text_column="content",
        **kwargs,
    )


@pytest.fixture
def no_weights_loaded(monkeypatch):
    """Fails the test if any model weights are loaded: the checks under test must come before."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the output was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


# ---------------------------------------------------------------------------------------------- --overwrite
def test_overwrite_refuses_a_project_folder_with_a_config_json(checkpoint, text_file, tmp_path, capsys):
    """The issue's case: an app folder with its own config.json (and weights-looking file), src/ and data/."""
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "data").mkdir()
    (project / "config.json").write_text('{"app": "settings"}')
    (project / "model.safetensors").write_bytes(b"an app's own file")
    (project / "src" / "main.py").write_text("print('hello')\n")
    (project / "data" / "rows.csv").write_text("a,b\n1,2\n")
    before = snapshot(project)

    argv = ["prune", "--teacher", str(checkpoint), "--calibration_data", str(text_file), "--text_column", "content"]
    argv += ["--hidden_size", "16", "--num_attention_heads", "2", "--calibration_samples", "4"]
    argv += ["--calibration_seq_length", "16", "--output_dir", str(project), "--overwrite", "true"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "refusing to replace it even with --overwrite" in err and OUTPUT_MARKER in err
    assert snapshot(project) == before


def test_overwrite_refuses_our_output_holding_files_we_did_not_write(checkpoint, text_file, tmp_path):
    output = tmp_path / "pruned"
    prune_checkpoint(prune_args(checkpoint, output, text_file), PrunedConfig(**SMALL), show_progress=False)
    assert is_own_output(output)
    (output / "notes.md").write_text("my notes on this model")
    (output / "eval").mkdir()
    (output / "eval" / "scores.csv").write_text("task,acc\n")
    before = snapshot(output)
    with pytest.raises(FileExistsError, match=r"holds files it did not write \(eval/scores\.csv, notes\.md\)"):
        prune_checkpoint(
            prune_args(checkpoint, output, text_file, overwrite=True), PrunedConfig(**SMALL), show_progress=False
        )
    assert snapshot(output) == before


def test_overwrite_replaces_our_own_output_whole(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("v1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "old.bin").write_text("old")
    marker = json.loads((target / OUTPUT_MARKER).read_text())
    assert marker["written_by"] == "hf-minitron" and marker["files"] == ["config.json", "sub/old.bin"]
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "config.json").write_text("v2")
    assert snapshot(target).keys() == {OUTPUT_MARKER, "config.json"} and (target / "config.json").read_text() == "v2"
    assert hidden_leftovers(tmp_path) == []


def test_prune_recipe_does_not_overwrite_by_default():
    recipe = yaml.safe_load((RECIPES / "smollm2-135m" / "prune.yaml").read_text())
    assert not recipe.get("overwrite", False)


# ---------------------------------------------------------------------------------------------- the source model
@pytest.mark.parametrize("where", ["same", "inside", "parent", "symlink"])
def test_output_overlapping_the_source_model_is_refused(checkpoint, text_file, tmp_path, where, no_weights_loaded):
    output = {
        "same": checkpoint,
        "inside": checkpoint / "pruned",
        "parent": checkpoint.parent,
        "symlink": tmp_path / "link-to-teacher",
    }[where]
    if where == "symlink":
        output.symlink_to(checkpoint)
    before = snapshot(checkpoint)
    with pytest.raises(ValueError, match=r"the source model .*Choose an output path outside"):
        prune_checkpoint(
            prune_args(checkpoint, output, text_file, overwrite=True), PrunedConfig(**SMALL), show_progress=False
        )
    assert snapshot(checkpoint) == before


def test_pipeline_output_dir_overlapping_the_teacher_is_refused(checkpoint, tmp_path):
    from conftest import _tiny_recipe

    before = snapshot(checkpoint)
    for output_dir in (checkpoint, checkpoint / "run"):
        with pytest.raises(ValueError, match="the teacher"):
            run_pipeline(*build_pipeline_config(_tiny_recipe(checkpoint, output_dir)), show_progress=False)
    assert snapshot(checkpoint) == before


# ---------------------------------------------------------------------------------------------- concurrent writers
@pytest.fixture(params=["renameat2", "rename"])
def rename_flavour(request, monkeypatch):
    """The no-replace commit with Linux's renameat2, and the plain-rename fallback used where it is missing."""
    if request.param == "rename":
        monkeypatch.setattr(hf_minitron.io, "_renameat2", lambda: None)
    elif hf_minitron.io._renameat2() is None:
        pytest.skip("renameat2 is not available here")
    return request.param


def test_a_target_written_meanwhile_is_left_alone(tmp_path, rename_flavour):
    target = tmp_path / "out"
    with pytest.raises(FileExistsError, match="was written by someone else") as info:
        with atomic_directory(target) as tmp:
            (tmp / "config.json").write_text("ours")
            with atomic_directory(target) as other:  # another run, started later, finishes first
                (other / "config.json").write_text("theirs")
    assert (target / "config.json").read_text() == "theirs"
    (kept,) = kept_copies(target)
    assert (kept / "config.json").read_text() == "ours" and str(kept) in str(info.value)
    assert hidden_leftovers(tmp_path) == []


def _write_after_barrier(target: str, barrier, results, name: str) -> None:
    try:
        with atomic_directory(target) as tmp:
            (tmp / "writer").write_text(name)
            barrier.wait(timeout=60)  # both have passed the up-front check; now both commit
        results.put((name, "committed"))
    except FileExistsError as error:
        results.put((name, str(error)))


def test_two_writers_of_one_fresh_output(tmp_path, rename_flavour):
    target = tmp_path / "out"
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    writers = [context.Process(target=_write_after_barrier, args=(str(target), barrier, results, n)) for n in "ab"]
    for writer in writers:
        writer.start()
    outcomes = dict(results.get(timeout=120) for _ in writers)
    for writer in writers:
        writer.join(timeout=60)
    winners = [name for name, outcome in outcomes.items() if outcome == "committed"]
    assert len(winners) == 1, outcomes
    (loser,) = set(outcomes) - set(winners)
    assert (target / "writer").read_text() == winners[0]
    (kept,) = kept_copies(target)
    assert (kept / "writer").read_text() == loser and str(kept) in outcomes[loser]


def test_two_prunes_into_one_fresh_folder(checkpoint, text_file, tmp_path, monkeypatch):
    """Another prune into the same fresh folder finishes while ours is saving: ours fails at its commit and keeps its
    result aside, the other's stays."""
    import hf_minitron.commands.prune as checkpoint_pruning

    output = tmp_path / "pruned"
    check_finite_weights = checkpoint_pruning.check_finite_weights
    raced = []

    def another_run_finishes_meanwhile(directory):
        check_finite_weights(directory)
        if not raced:
            raced.append(True)
            other = PrunedConfig(**{**SMALL, "intermediate_size": 48})
            prune_checkpoint(prune_args(checkpoint, output, text_file), other, show_progress=False)

    monkeypatch.setattr(checkpoint_pruning, "check_finite_weights", another_run_finishes_meanwhile)
    with pytest.raises(FileExistsError, match="was written by someone else"):
        prune_checkpoint(prune_args(checkpoint, output, text_file), PrunedConfig(**SMALL), show_progress=False)
    assert AutoModelForCausalLM.from_pretrained(output).config.intermediate_size == 48  # the first to finish
    (kept,) = kept_copies(output)
    assert AutoModelForCausalLM.from_pretrained(kept).config.intermediate_size == 64  # ours, not lost


# ---------------------------------------------------------------------------------------------- symlinks and ~
def test_symlinked_output_is_written_through_the_link(tmp_path):
    real = tmp_path / "disk" / "pruned"
    with atomic_directory(real) as tmp:
        (tmp / "config.json").write_text("old")
    link = tmp_path / "pruned"
    link.symlink_to(real)
    with atomic_directory(link, overwrite=True) as tmp:
        (tmp / "config.json").write_text("new")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert (real / "config.json").read_text() == "new" and (link / "config.json").read_text() == "new"
    assert hidden_leftovers(tmp_path) == [] and hidden_leftovers(real.parent) == []


def test_tilde_paths_are_expanded(checkpoint, text_file, tmp_path, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    (home / "teacher").symlink_to(checkpoint)
    args = PruneArguments(
        teacher="~/teacher", output_dir="~/pruned", calibration_data=str(text_file), text_column="content"
    )
    prune_checkpoint(args, PrunedConfig(**SMALL), show_progress=False)
    atomic_write_json("~/results.json", {"model": "x"})
    assert AutoModelForCausalLM.from_pretrained(home / "pruned").config.hidden_size == 16
    assert (home / "results.json").is_file()
    assert MinitronArguments(output_dir="~/run").output_dir == str(home / "run")
    assert list(cwd.iterdir()) == []  # no literal ./~


# ---------------------------------------------------------------------------------------------- unwritable outputs
@pytest.mark.parametrize("case", ["parent_is_a_file", "read_only", "mount_point", "dangling_symlink", "a_file"])
def test_unwritable_output_fails_before_weights_are_loaded(
    checkpoint, text_file, tmp_path, monkeypatch, case, no_weights_loaded
):
    output = tmp_path / "out"
    expected = {
        "parent_is_a_file": (NotADirectoryError, "is a file, not a directory"),
        "read_only": (PermissionError, "read-only filesystem"),
        "mount_point": (OSError, "is a mount point"),
        "dangling_symlink": (FileNotFoundError, "is a symlink to .* which does not exist"),
        "a_file": (FileExistsError, "exists and is not a directory"),
    }[case]
    if case == "parent_is_a_file":
        (tmp_path / "file").write_text("")
        output = tmp_path / "file" / "out"
    elif case == "read_only":
        statvfs = os.statvfs

        class ReadOnly:
            def __init__(self, path):
                self.f_flag = statvfs(path).f_flag | os.ST_RDONLY

        monkeypatch.setattr(os, "statvfs", ReadOnly)
    elif case == "mount_point":
        ismount = os.path.ismount
        monkeypatch.setattr(os.path, "ismount", lambda path: str(path) == str(output) or ismount(path))
    elif case == "dangling_symlink":
        output.symlink_to(tmp_path / "missing" / "target")
    else:
        output.write_text("a file of the user's")
    with pytest.raises(expected[0], match=expected[1]):
        prune_checkpoint(prune_args(checkpoint, output, text_file), PrunedConfig(**SMALL), show_progress=False)


def test_evaluation_output_file_is_checked_before_the_models_load(checkpoint, tmp_path, no_weights_loaded):
    folder = tmp_path / "results"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match="is an existing directory"):
        evaluate_checkpoints(EvaluateArguments(model=str(checkpoint), output_file=str(folder)), show_progress=False)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a result")
    with pytest.raises(FileExistsError, match="not an earlier evaluation result"):
        evaluate_checkpoints(EvaluateArguments(model=str(checkpoint), output_file=str(notes)), show_progress=False)
    assert notes.read_text() == "not a result"


# ---------------------------------------------------------------------------------------------- failed commits
def test_a_result_that_cannot_be_moved_into_place_is_kept_visible(tmp_path, monkeypatch):
    target = tmp_path / "out"
    rename, replace = os.rename, os.replace

    def cross_device(rename_function):
        def move(source, destination, *args, **kwargs):
            if os.fspath(destination) == str(target) or os.fspath(destination) == str(tmp_path / "out.json"):
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return rename_function(source, destination, *args, **kwargs)

        return move

    monkeypatch.setattr(os, "rename", cross_device(rename))
    monkeypatch.setattr(os, "replace", cross_device(replace))
    monkeypatch.setattr(hf_minitron.io, "_renameat2", lambda: None)
    with pytest.raises(OSError, match="It is kept at") as info:
        with atomic_directory(target) as tmp:
            (tmp / "config.json").write_text("hours of work")
    (kept,) = kept_copies(target)
    assert (kept / "config.json").read_text() == "hours of work" and str(kept) in str(info.value)
    assert hidden_leftovers(tmp_path) == [] and not target.exists()

    with pytest.raises(OSError, match="It is kept at"):
        atomic_write_json(tmp_path / "out.json", {"model": "x"})
    (kept,) = kept_copies(tmp_path / "out.json")
    assert json.loads(kept.read_text()) == {"model": "x"} and hidden_leftovers(tmp_path) == []
