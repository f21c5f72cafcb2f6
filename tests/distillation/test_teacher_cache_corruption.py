"""A teacher cache damaged on disk (truncated, emptied, deleted, replaced or hand-edited files) is refused when it is
loaded, before training, with a `ValueError` naming the file and the fix; never a `datasets` / `safetensors` error
mid-run, never a silently wrong loss."""

import json
import shutil

import pytest
import torch
from conftest import random_samples, tiny_model
from datasets import Dataset
from safetensors.torch import save_file

import hf_minitron.distillation.teacher_cache_writer as teacher_cache_writer
from hf_minitron import DistillationConfig, DistillationTrainer, cache_teacher, load_teacher_cache
from hf_minitron.distillation.teacher_cache import CachedTeacher, read_cache_info


FIX = r"--overwrite"


def _dataset(n=7, seed=0):
    return Dataset.from_list([{k: v.tolist() for k, v in s.items()} for s in random_samples(n, 16, seed)])


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Caches written once: a hidden one (3 shards and the output layer), the same of other data, a bf16 one."""
    root = tmp_path_factory.mktemp("caches")
    teacher = tiny_model("llama")
    kwargs = {"shard_size": 3, "batch_size": 2, "show_progress": False}
    cache_teacher(teacher, _dataset(), root / "hidden", **kwargs)
    cache_teacher(teacher, _dataset(seed=1), root / "other_data", **kwargs)
    cache_teacher(teacher, _dataset(), root / "bf16", dtype="bfloat16", **kwargs)
    cache_teacher(teacher, _dataset(), root / "topk", mode="topk", top_k=4, **kwargs)
    return root


@pytest.fixture
def cache(caches, tmp_path):
    """A fresh copy of the hidden cache, to damage."""
    return shutil.copytree(caches / "hidden", tmp_path / "cache")


def _refused(directory, file):
    """Loading refuses the cache with a ValueError naming `file` and the fix."""
    with pytest.raises(ValueError, match=FIX) as error:
        load_teacher_cache(directory)
    assert file in str(error.value), str(error.value)
    return str(error.value)


# ---------------------------------------------------------------------------------------------- shards
def test_truncated_shard(cache):
    shard = cache / "shard-00001.arrow"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert "truncated" in _refused(cache, "shard-00001.arrow")


def test_zero_byte_shard(cache):
    (cache / "shard-00002.arrow").write_bytes(b"")
    _refused(cache, "shard-00002.arrow")


def test_deleted_shard(cache):
    (cache / "shard-00000.arrow").unlink()
    assert "missing" in _refused(cache, "shard-00000.arrow")


def test_shard_of_another_dtype(cache, caches):
    shutil.copy(caches / "bf16" / "shard-00001.arrow", cache / "shard-00001.arrow")
    _refused(cache, "shard-00001.arrow")


def test_shard_of_another_mode(cache, caches):
    shutil.copy(caches / "topk" / "shard-00000.arrow", cache / "shard-00000.arrow")
    _refused(cache, "shard-00000.arrow")


def test_shard_of_another_cache_of_the_same_shape(cache, caches):
    """Same settings, same sizes, other data: the file sizes and the schema agree, the content does not."""
    other = caches / "other_data" / "shard-00001.arrow"
    assert other.stat().st_size == (cache / "shard-00001.arrow").stat().st_size
    shutil.copy(other, cache / "shard-00001.arrow")
    _refused(cache, "shard-00001.arrow")


# ---------------------------------------------------------------------------------------------- the output layer
def test_truncated_output_layer(cache):
    head = cache / "teacher_lm_head.safetensors"
    head.write_bytes(head.read_bytes()[:-100])
    _refused(cache, "teacher_lm_head.safetensors")


def test_zero_byte_output_layer(cache):
    (cache / "teacher_lm_head.safetensors").write_bytes(b"")
    _refused(cache, "teacher_lm_head.safetensors")


def test_output_layer_of_another_shape_and_dtype(cache):
    """The same number of bytes, transposed; then the right shape in float16."""
    info = read_cache_info(cache)
    vocab, hidden = info["vocab_size"], info["hidden_size"]
    save_file({"weight": torch.zeros(hidden, vocab)}, cache / "teacher_lm_head.safetensors", metadata={"format": "pt"})
    _refused(cache, "teacher_lm_head.safetensors")
    save_file(
        {"weight": torch.zeros(vocab, hidden, dtype=torch.float16)}, cache / "teacher_lm_head.safetensors",
        metadata={"format": "pt"},
    )  # fmt: skip
    _refused(cache, "teacher_lm_head.safetensors")


def test_deleted_output_layer_fails_before_training(caches, cache, tmp_path):
    """A dataset loaded before the damage: the trainer refuses it when it is built, not at its first step."""
    dataset = load_teacher_cache(cache)
    (cache / "teacher_lm_head.safetensors").unlink()
    args = DistillationConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match=FIX) as error:
        DistillationTrainer(model=tiny_model("llama", seed=1), args=args, train_dataset=dataset)
    assert "teacher_lm_head.safetensors" in str(error.value)
    with pytest.raises(ValueError, match=FIX):
        CachedTeacher(cache)


# ---------------------------------------------------------------------------------------------- metadata
@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda info: info.update(temperature=2.0), id="temperature"),
        pytest.param(lambda info: info.update(mode="topk", top_k=4), id="mode"),
        pytest.param(lambda info: info["shards"][1].update(bytes=info["shards"][1]["bytes"] + 8), id="shard-bytes"),
        pytest.param(lambda info: info.update(samples=100), id="samples"),
        pytest.param(lambda info: info["fingerprint"].update(teacher="0" * 16), id="teacher-fingerprint"),
    ],
)
def test_hand_edited_metadata(cache, edit):
    path = cache / "teacher_cache.json"
    info = json.loads(path.read_text())
    edit(info)
    path.write_text(json.dumps(info, indent=1))
    assert "edited" in _refused(cache, "teacher_cache.json")


@pytest.mark.parametrize("name", ["teacher_cache.json", "state.json", "dataset_info.json"])
def test_zero_byte_metadata(cache, name):
    (cache / name).write_bytes(b"")
    _refused(cache, name)


def test_metadata_that_is_not_json(cache):
    (cache / "teacher_cache.json").write_bytes(b"\x00\xff garbage {")
    _refused(cache, "teacher_cache.json")


def test_state_listing_other_files(cache):
    path = cache / "state.json"
    state = json.loads(path.read_text())
    state["_data_files"] = state["_data_files"][:2]  # one shard silently dropped from training
    path.write_text(json.dumps(state, indent=1))
    _refused(cache, "state.json")


# ---------------------------------------------------------------------------------------------- the fix
def test_rewriting_repairs_a_damaged_cache(cache, caches):
    """Reusing a damaged cache is refused; the fix the error names (overwrite) rewrites it to the original."""
    (cache / "shard-00001.arrow").write_bytes(b"")
    kwargs = {"shard_size": 3, "batch_size": 2, "show_progress": False}
    with pytest.raises(ValueError, match=FIX):
        cache_teacher(tiny_model("llama"), _dataset(), cache, **kwargs)
    (cache / "teacher_cache.json").write_bytes(b"")
    with pytest.raises(ValueError, match=FIX):
        cache_teacher(tiny_model("llama"), _dataset(), cache, **kwargs)
    repaired = cache_teacher(tiny_model("llama"), _dataset(), cache, overwrite=True, **kwargs)
    assert len(repaired) == 7
    for name in ("shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow", "teacher_lm_head.safetensors"):
        assert (cache / name).read_bytes() == (caches / "hidden" / name).read_bytes()


def test_undamaged_caches_load(caches):
    for name in ("hidden", "other_data", "bf16", "topk"):
        assert len(load_teacher_cache(caches / name)) == 7


def test_caches_written_before_the_hashes_load_and_are_checked_by_their_files(cache):
    """A cache without the recorded hashes (written by an earlier version) loads; its sizes and headers still count."""
    path = cache / "teacher_cache.json"
    info = json.loads(path.read_text())
    del info["metadata_hash"], info["lm_head"]
    for entry in info["shards"]:
        del entry["content_hash"]
    path.write_text(json.dumps(info, indent=1))
    assert len(load_teacher_cache(cache)) == 7 and CachedTeacher(cache).mode == "hidden"
    (cache / "shard-00002.arrow").write_bytes(b"")
    _refused(cache, "shard-00002.arrow")


class _Killed(Exception):
    pass


def test_damaged_work_folder_of_an_interrupted_write_is_recomputed(caches, tmp_path, monkeypatch):
    """Killed after two shards, then a finished shard truncated and a sidecar emptied: the rerun computes those again
    (it reused the truncated shard, finishing a cache that did not load, and failed on the empty sidecar)."""
    real, written = teacher_cache_writer._write_shard, []

    def dies_at_the_third_shard(*args, **kwargs):
        if len(written) == 2:
            raise _Killed
        written.append(args[2].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(teacher_cache_writer, "_write_shard", dies_at_the_third_shard)
    kwargs = {"shard_size": 3, "batch_size": 2, "show_progress": False}
    with pytest.raises(_Killed):
        cache_teacher(tiny_model("llama"), _dataset(), tmp_path / "cache", **kwargs)
    partial = tmp_path / ".cache.partial"
    shard = partial / "shard-00000.arrow"
    shard.write_bytes(shard.read_bytes()[:100])
    (partial / "shard-00001.json").write_bytes(b"")
    written.clear()
    monkeypatch.setattr(teacher_cache_writer, "_write_shard", lambda *args, **kwargs: (written.append(args[2].name),
                        real(*args, **kwargs))[1])  # fmt: skip
    cache_teacher(tiny_model("llama"), _dataset(), tmp_path / "cache", **kwargs)
    assert written == ["shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow"]
    for name in ("shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow", "teacher_lm_head.safetensors"):
        assert (tmp_path / "cache" / name).read_bytes() == (caches / "hidden" / name).read_bytes()
