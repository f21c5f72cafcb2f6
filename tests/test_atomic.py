"""A save killed midway leaves the previous output or none, never a half-written one.

`tests/scripts/kill_mid_save.py` runs one of our saves in its own process (forked by `tests/scripts/killable.py`)
and blocks in the middle of it: after the first shard of a sharded model, after the scores' weights file, halfway
through a JSON file. The test SIGKILLs it there, checks what is on disk, then that the next save removes the dead
writer's temporary sibling.
"""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import random_samples, tiny_model
from transformers import AutoModelForCausalLM

from hf_minitron.cli import main as cli_main
from hf_minitron.evaluation import save_json
from hf_minitron.io import OUTPUT_MARKER, atomic_directory, atomic_write_json, remove_stale_temporaries
from hf_minitron.pruning.importance import ImportanceScores, estimate_importance


sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import kill_mid_save  # noqa: E402
import killable  # noqa: E402


def _kill_mid_save(mode: str, target: Path, *args: str, timeout: float = 300) -> int:
    """Runs the save in its own process, SIGKILLs it where it blocks; returns its pid."""
    marker = target.parent / f"{target.name}.blocked"
    log = target.parent / f"{target.name}.log"
    process = killable.start(log, kill_mid_save.main, mode, str(target), str(marker), *args)
    killable.kill_when(process, marker, log, timeout, "the point where the save blocks")
    marker.unlink()
    log.unlink()
    return process.pid


def _siblings(target: Path) -> list[Path]:
    return sorted(p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def _prune(checkpoint, text_file, output, hidden_size):
    argv = ["prune", "--teacher", str(checkpoint), "--calibration_data", str(text_file), "--text_column", "content"]
    argv += ["--hidden_size", str(hidden_size), "--intermediate_size", "48", "--num_attention_heads", "2"]
    argv += ["--calibration_samples", "4", "--calibration_seq_length", "16", "--output_dir", str(output)]
    assert cli_main([*argv, "--overwrite", "true"]) in (0, None)


def test_pruned_model_killed_after_the_first_shard(checkpoint, text_file, tmp_path):
    target = tmp_path / "pruned"
    _prune(checkpoint, text_file, target, hidden_size=16)  # the previous, complete output
    old = AutoModelForCausalLM.from_pretrained(target).state_dict()

    pid = _kill_mid_save("prune", target, str(checkpoint), str(text_file))

    # The target is untouched: the old model, complete, loads and has the old weights.
    reloaded = AutoModelForCausalLM.from_pretrained(target)
    assert reloaded.config.hidden_size == 16
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, old[name])
    # The half-written save sits in the dead writer's hidden temporary sibling: some shards, no index, no tokenizer.
    (partial,) = _siblings(target)
    assert partial.name.startswith(f".pruned.tmp-{pid}-")
    written = sorted(p.name for p in partial.iterdir())
    assert any(name.startswith("model-0000") for name in written) and "model.safetensors.index.json" not in written
    with pytest.raises(Exception):  # noqa: B017 - whatever transformers raises, it must not load
        AutoModelForCausalLM.from_pretrained(partial)

    # The next run of the command removes the leftover and writes the new model.
    _prune(checkpoint, text_file, target, hidden_size=24)
    assert AutoModelForCausalLM.from_pretrained(target).config.hidden_size == 24
    assert _siblings(target) == []


def test_importance_scores_killed_between_their_two_files(tmp_path):
    target = tmp_path / "scores"
    old = estimate_importance(tiny_model("llama", seed=0), random_samples(4), show_progress=False)
    old.save(target)

    pid = _kill_mid_save("scores", target)

    # Still the old pair: not the new weights beside the old metadata.
    loaded = ImportanceScores.load(target)
    for axis in ("heads", "neurons", "hidden"):
        for key, value in getattr(old, axis).items():
            assert torch.equal(getattr(loaded, axis)[key], value)
    assert sorted(p.name for p in target.iterdir()) == [OUTPUT_MARKER, "importance.json", "importance.safetensors"]
    (partial,) = _siblings(target)
    assert partial.name.startswith(f".scores.tmp-{pid}-") and not (partial / "importance.json").exists()

    new = estimate_importance(tiny_model("llama", seed=3), random_samples(4), show_progress=False)
    new.save(target)
    assert torch.equal(ImportanceScores.load(target).heads["sum"], new.heads["sum"])
    assert _siblings(target) == []


def test_results_json_killed_halfway(tmp_path):
    target = tmp_path / "evaluation.json"

    # No previous file: none afterwards (only the dead writer's hidden partial file).
    pid = _kill_mid_save("json", target)
    assert not target.exists()
    (partial,) = _siblings(target)
    assert partial.name.startswith(f".evaluation.json.tmp-{pid}-")
    with pytest.raises(json.JSONDecodeError):
        json.loads(partial.read_text())

    save_json({"old": True}, target)  # removes the leftover
    assert _siblings(target) == []

    # A previous file: kept whole.
    _kill_mid_save("json", target)
    assert json.loads(target.read_text()) == {"old": True}
    save_json({"new": True}, target)
    assert json.loads(target.read_text()) == {"new": True} and _siblings(target) == []


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("tag", ["", "-3fa2c9e1"], ids=["pid", "pid-random"])
def test_a_backup_left_between_the_two_renames_is_restored(tmp_path, tag):
    # `_commit_directory` moves the old output aside, then renames the new one in: a kill between the two leaves
    # only `.{name}.old-{pid}-{random}` (`.{name}.old-{pid}` from earlier versions). The next writer restores it
    # before anything else.
    target = tmp_path / "out"
    backup = tmp_path / f".out.old-{_dead_pid()}{tag}"
    backup.mkdir()
    (backup / "config.json").write_text("{}")
    remove_stale_temporaries(target)
    assert (target / "config.json").is_file() and not backup.exists()


def test_a_live_writer_temporaries_are_left_alone(tmp_path):
    target = tmp_path / "out.json"
    live = tmp_path / f".out.json.tmp-{os.getppid()}-abc.json"  # our parent: alive, and not us
    live.write_text("{")
    atomic_write_json(target, {"a": 1})
    assert live.exists() and json.loads(target.read_text()) == {"a": 1}


def test_an_exception_mid_save_cleans_up_in_process(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            tiny_model("llama").save_pretrained(tmp, max_shard_size="20KB")
            raise RuntimeError("interrupted")
    assert not target.exists() and _siblings(target) == []


def test_writers_in_one_process_at_once_lose_nothing(tmp_path):
    """Eight threads overwrite one output at once (a notebook running two saves, a server): the output is one complete
    result, each writer that could not commit keeps its result in a visible sibling of its own that its error names,
    and nothing hidden is left."""
    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "v").write_text("old")
    errors = []

    def write(i):
        try:
            with atomic_directory(target, overwrite=True) as tmp:
                (tmp / "v").write_text(str(i))
        except OSError as error:
            errors.append(str(error))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    kept = sorted(p for p in tmp_path.iterdir() if p.name.startswith("out.unsaved-"))
    assert len(kept) == len(errors) and all(any(str(k) in e for e in errors) for k in kept)
    values = [(p / "v").read_text() for p in [target, *kept]]
    assert sorted(values) == sorted(set(values)) and set(values) <= {str(i) for i in range(8)}
    # overwrite=True: a writer that succeeds replaces the one before it (last rename wins); one that fails keeps its own
    assert len(values) == 1 + len(errors) and "old" not in values
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
