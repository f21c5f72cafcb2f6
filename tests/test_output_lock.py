"""One writer per output folder: a second command writing the same folder is refused at once, naming the first; a
killed writer never leaves the folder locked; the user's folders get no lock files."""

import os
import signal
import subprocess
import sys

import pytest
from conftest import _tiny_recipe

from hf_minitron import DistillationConfig
from hf_minitron.cli import main
from hf_minitron.output_lock import OutputInUseError, output_lock, output_locks


HOLDER = """
import sys
from hf_minitron.output_lock import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()  # held until the test closes our stdin (or kills us)
"""


@pytest.fixture
def holder():
    """Starts a process that holds the lock of a folder until the test ends (or kills it)."""
    started = []

    def start(folder):
        process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert process.stdout.readline().strip() == "locked"
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.stdin.close()
            process.wait(timeout=60)


def test_a_second_writer_is_refused_naming_the_first(holder, tmp_path):
    process = holder(tmp_path / "out")
    with pytest.raises(OutputInUseError, match=rf"being written by another hf-minitron process \(pid {process.pid}"):
        with output_lock(tmp_path / "out"):
            pass


def test_a_killed_writer_leaves_the_folder_free(holder, tmp_path):
    process = holder(tmp_path / "out")
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    with output_lock(tmp_path / "out"):  # the kernel dropped the dead process's lock
        assert (tmp_path / "out").exists() is False


def test_one_process_may_nest_locks_of_one_folder(tmp_path):
    with output_locks(tmp_path / "a", tmp_path / "a", None):
        with output_lock(tmp_path / "a"):
            pass
    with output_lock(tmp_path / "a"):  # released once the outermost block ended
        pass


def test_a_link_and_its_target_are_one_folder(holder, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    holder(tmp_path / "real")
    with pytest.raises(OutputInUseError):
        with output_lock(tmp_path / "link"):
            pass


def test_prune_into_a_folder_being_written_stops_before_loading_weights(holder, checkpoint, tmp_path, capsys):
    output = tmp_path / "pruned"
    holder(output)
    assert main(["prune", "--teacher", str(checkpoint), "--hidden_size", "16", "--output_dir", str(output)]) == 2
    err = capsys.readouterr().err
    assert "is being written by another hf-minitron process" in err and "Traceback" not in err
    assert not output.exists()


def test_two_distill_runs_into_one_folder_are_refused(holder, checkpoint, tmp_path, monkeypatch):
    from hf_minitron.commands.distill import DistillArguments, distill_checkpoint

    loads = []
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: loads.append(a))
    config = DistillationConfig(output_dir=str(tmp_path / "distill"), max_steps=1, report_to="none")
    holder(tmp_path / "distill")
    with pytest.raises(OutputInUseError):
        distill_checkpoint(DistillArguments(student=str(checkpoint), teacher=str(checkpoint)), config)
    # The final folder is guarded too, whatever the checkpoints' folder.
    holder(tmp_path / "final")
    args = DistillArguments(student=str(checkpoint), teacher=str(checkpoint), final_model_dir=str(tmp_path / "final"))
    config = DistillationConfig(output_dir=str(tmp_path / "other"), max_steps=1, report_to="none")
    with pytest.raises(OutputInUseError):
        distill_checkpoint(args, config)
    assert loads == []


def test_two_runs_into_one_folder_are_refused(holder, checkpoint, tmp_path):
    from hf_minitron.commands.run import run_pipeline
    from hf_minitron.commands.run_config import build_pipeline_config

    holder(tmp_path / "run")
    with pytest.raises(OutputInUseError):
        run_pipeline(*build_pipeline_config(_tiny_recipe(checkpoint, tmp_path / "run")), show_progress=False)
    assert not (tmp_path / "run").exists()


def test_no_lock_file_lands_next_to_the_output(tmp_path):
    with output_lock(tmp_path / "out"):
        (tmp_path / "out").mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
