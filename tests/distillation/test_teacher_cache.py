"""The offline teacher (`hf_minitron.distillation.teacher_cache`): writing a cache, and distilling from it without a teacher."""

import copy
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, TESTS, VOCAB_SIZE, random_samples, tiny_model, tiny_tokenizer
from datasets import Dataset, load_from_disk
from transformers import AutoModelForCausalLM

import hf_minitron.distillation.teacher_cache_writer as teacher_cache_writer
from hf_minitron import DistillationConfig, DistillationTrainer, cache_teacher, load_teacher_cache
from hf_minitron.cli import main as cli_main
from hf_minitron.distillation.trainer import DataCollatorForDistillation


def _dataset(n=8, seq_length=16, seed=0):
    return Dataset.from_list([{k: v.tolist() for k, v in s.items()} for s in random_samples(n, seq_length, seed)])


def _args(output_dir, **kwargs):
    defaults = dict(
        output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, report_to="none",
        save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    return DistillationConfig(**{**defaults, **kwargs})


def _student():
    return tiny_model("llama", seed=1, num_hidden_layers=2)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _cache(teacher, data, path, **kwargs):
    return cache_teacher(teacher, data, path, show_progress=False, **{"shard_size": 3, "batch_size": 2, **kwargs})


def _loss_and_grads(trainer, student, rows):
    """The trainer's loss on one batch of `rows` and the student's gradients (as one training micro-step)."""
    batch = DataCollatorForDistillation()(rows)
    student.train().zero_grad()
    loss = trainer.compute_loss(student, batch, num_items_in_batch=batch["labels"][:, 1:].ne(-100).sum())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}


def _compare(tmp_path, teacher, data, cache, tolerance, **config):
    """Loss and gradients of one batch: live teacher vs the cache."""
    results = []
    for name, teacher_model, train in (("live", teacher, data), ("cached", None, cache)):
        student = _student()
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher_model, args=_args(tmp_path / name, **config), train_dataset=train
        )
        results.append(_loss_and_grads(trainer, student, [train[i] for i in range(4)]))
    (live_loss, live_grads), (cached_loss, cached_grads) = results
    if "relative" in tolerance:  # a lossy storage dtype: close as a whole (a top-k choice may flip between ties)
        assert cached_loss.item() == pytest.approx(live_loss.item(), rel=tolerance["relative"])
        for name, grad in live_grads.items():
            assert (cached_grads[name] - grad).norm() <= tolerance["relative"] * grad.norm(), name
        return
    torch.testing.assert_close(cached_loss, live_loss, **tolerance)
    for name, grad in live_grads.items():
        torch.testing.assert_close(cached_grads[name], grad, **tolerance)


# ---------------------------------------------------------------------------------------------- exactness
FP32 = dict(rtol=1e-5, atol=1e-7)
BF16 = dict(relative=2e-2)
REVERSE_KL = {"kd_loss": "reverse_kl", "kd_temperature": 2.0, "ce_loss_weight": 0.3, "kd_chunk_size": 5}


# A bf16 cache with kd_top_k is left out: the tiny random teacher is near-uniform, and rounding its hidden states
# flips which tokens are in its top k.
@pytest.mark.parametrize(
    ("dtype", "tolerance", "config"),
    [("float32", FP32, {}), ("float32", FP32, REVERSE_KL), ("float32", FP32, {"kd_top_k": 7}),
     ("bfloat16", BF16, {}), ("bfloat16", BF16, REVERSE_KL)],
    ids=["fp32-forward_kl", "fp32-reverse_kl_t2_ce", "fp32-top_k", "bf16-forward_kl", "bf16-reverse_kl_t2_ce"],
)  # fmt: skip
def test_hidden_cache_equals_live_teacher(tmp_path, dtype, tolerance, config):
    teacher, data = tiny_model("llama"), _dataset()
    cache = _cache(teacher, data, tmp_path / "cache", dtype=dtype)
    _compare(tmp_path, teacher, data, cache, tolerance, **config)


def test_hidden_cache_unfused_path_and_softcapped_teacher(tmp_path):
    teacher = tiny_model("gemma2", final_logit_softcapping=3.0)
    data = _dataset()
    cache = _cache(teacher, data, tmp_path / "cache")
    student = tiny_model("gemma2", seed=1, num_hidden_layers=2, final_logit_softcapping=3.0)
    losses = []
    for fused in (True, False):
        trainer = DistillationTrainer(
            model=copy.deepcopy(student), args=_args(tmp_path / str(fused), use_fused_kd_loss=fused, ce_loss_weight=1),
            train_dataset=cache,
        )  # fmt: skip
        losses.append(_loss_and_grads(trainer, trainer.model, [cache[i] for i in range(4)]))
    torch.testing.assert_close(losses[0][0], losses[1][0], rtol=1e-5, atol=1e-6)
    live = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=_args(tmp_path / "live",
                               ce_loss_weight=1), train_dataset=data)  # fmt: skip
    torch.testing.assert_close(_loss_and_grads(live, live.model, [data[i] for i in range(4)])[0], losses[0][0])


@pytest.mark.parametrize(
    "config", [{}, {"kd_loss": "jsd", "ce_loss_weight": 0.5}, {"kd_loss": "tvd", "use_fused_kd_loss": False}]
)
def test_topk_cache_with_k_equal_vocab_is_exact(tmp_path, config):
    teacher, data = tiny_model("llama"), _dataset()
    cache = _cache(teacher, data, tmp_path / "cache", mode="topk", top_k=VOCAB_SIZE)
    _compare(tmp_path, teacher, data, cache, dict(rtol=1e-5, atol=1e-6), **config)


def test_topk_cache_renormalised_top_k_equals_live_top_k(tmp_path):
    teacher, data = tiny_model("llama"), _dataset()
    cache = _cache(teacher, data, tmp_path / "cache", mode="topk", top_k=12)
    _compare(tmp_path, teacher, data, cache, dict(rtol=1e-5, atol=1e-6), kd_top_k=5)


def test_topk_cache_tail_bucket_is_below_the_exact_loss(tmp_path):
    teacher, data = tiny_model("llama"), _dataset()
    losses = {}
    for k in (8, 32, VOCAB_SIZE):
        cache = _cache(teacher, data, tmp_path / f"k{k}", mode="topk", top_k=k, dtype="float16")
        student = _student()
        trainer = DistillationTrainer(model=student, args=_args(tmp_path / f"o{k}"), train_dataset=cache)
        losses[k] = _loss_and_grads(trainer, student, [cache[i] for i in range(4)])[0].item()
        assert json.loads((tmp_path / f"k{k}" / "teacher_cache.json").read_text())["top_k"] == k
    assert 0 < losses[8] <= losses[32] <= losses[VOCAB_SIZE] * (1 + 1e-3)  # coarser buckets, smaller KL


# ---------------------------------------------------------------------------------------------- the cache on disk
def test_cache_layout_reload_and_bytes(tmp_path):
    teacher, data = tiny_model("llama"), _dataset(n=7)
    cache = _cache(teacher, data, tmp_path / "cache", mode="topk", top_k=5, dtype="bfloat16")
    info = json.loads((tmp_path / "cache" / "teacher_cache.json").read_text())
    assert len(cache) == 7 and len(info["shards"]) == 3  # 3 + 3 + 1 samples
    assert info["tokens"] == sum(len(r["input_ids"]) for r in data) and info["bytes_per_token"] > 5 * 4
    assert info["fingerprint"]["seq_length"] == 16 and not (tmp_path / ".cache.partial").exists()
    again = load_from_disk(str(tmp_path / "cache"))  # a plain `datasets` dataset, numpy-formatted
    assert again.format["type"] == "numpy" and again.column_names == cache.column_names
    np.testing.assert_array_equal(again[6]["teacher_topk_ids"], cache[6]["teacher_topk_ids"])
    np.testing.assert_array_equal(again[0]["input_ids"], data[0]["input_ids"])
    # The stored top-k are the teacher's: ids and bf16 log-probabilities of its last-position prediction.
    ids = torch.tensor([data[0]["input_ids"]])
    with torch.no_grad():
        log_p = torch.log_softmax(teacher(ids).logits[0, -1].float(), -1)
    values, expected = log_p.topk(5)
    batch = DataCollatorForDistillation()([cache[0]])
    assert batch["teacher_topk_ids"][0, 15].tolist() == expected.tolist()
    torch.testing.assert_close(batch["teacher_topk_logprobs"][0, 15], values, rtol=1e-2, atol=1e-2)
    rest = torch.log1p(-values.exp().sum())
    torch.testing.assert_close(batch["teacher_topk_rest"][0, 15], rest, rtol=1e-4, atol=1e-4)
    # Same call again: the cache is reused, no teacher pass.
    calls = []
    teacher.register_forward_pre_hook(lambda *args: calls.append(1))
    _cache(teacher, data, tmp_path / "cache", mode="topk", top_k=5, dtype="bfloat16")
    assert not calls


def test_fingerprint_mismatches_are_refused(tmp_path):
    teacher, data = tiny_model("llama"), _dataset()
    tokenizer = tiny_tokenizer()
    path = tmp_path / "cache"
    _cache(teacher, data, path, tokenizer=tokenizer)
    corrected = copy.deepcopy(teacher)
    with torch.no_grad():
        corrected.model.layers[1].mlp.down_proj.weight.add_(1e-2)  # what teacher correction does, in small
    with pytest.raises(ValueError, match="another teacher .*teacher correction"):
        load_teacher_cache(path, teacher=corrected)
    with pytest.raises(ValueError, match="other data"):
        load_teacher_cache(path, dataset=_dataset(seed=1))
    with pytest.raises(ValueError, match="samples of up to 16 tokens, not seq_length=32"):
        load_teacher_cache(path, seq_length=32)
    other_tokenizer = tiny_tokenizer(vocab_size=80)
    with pytest.raises(ValueError, match="another tokenizer"):
        load_teacher_cache(path, tokenizer=other_tokenizer)
    with pytest.raises(ValueError, match="another tokenizer"):
        DistillationTrainer(model=_student(), args=_args(tmp_path / "o"), train_dataset=load_teacher_cache(path),
                            processing_class=other_tokenizer)  # fmt: skip
    with pytest.raises(ValueError, match="other settings .*teacher"):
        _cache(corrected, data, path, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="other data"):
        _cache(teacher, _dataset(seed=1), path, tokenizer=tokenizer)
    load_teacher_cache(path, teacher=teacher.to(torch.bfloat16), tokenizer=tokenizer, dataset=data, seq_length=16)
    rewritten = _cache(corrected, data, path, tokenizer=tokenizer, overwrite=True)
    load_teacher_cache(path, teacher=corrected)
    assert len(rewritten) == len(data)


def test_trainer_refuses_what_a_cache_cannot_serve(tmp_path):
    teacher, data = tiny_model("llama"), _dataset()
    hidden = _cache(teacher, data, tmp_path / "hidden")
    topk = _cache(teacher, data, tmp_path / "topk", mode="topk", top_k=8)
    with pytest.raises(ValueError, match="both a teacher and a teacher cache"):
        DistillationTrainer(model=_student(), teacher_model=teacher, args=_args(tmp_path), train_dataset=hidden)
    with pytest.raises(ValueError, match="intermediate states"):
        DistillationTrainer(model=_student(), args=_args(tmp_path, intermediate_layer_mapping="0:1"),
                            train_dataset=hidden)  # fmt: skip
    with pytest.raises(ValueError, match="kd_temperature=2.0 differs"):
        DistillationTrainer(model=_student(), args=_args(tmp_path, kd_temperature=2.0), train_dataset=topk)
    with pytest.raises(ValueError, match="kd_top_k=9 exceeds the 8 tokens"):
        DistillationTrainer(model=_student(), args=_args(tmp_path, kd_top_k=9), train_dataset=topk)
    with pytest.raises(ValueError, match="not backed by the files of a teacher cache"):
        DistillationTrainer(model=_student(), args=_args(tmp_path), train_dataset=Dataset.from_list(list(hidden)))
    with pytest.raises(ValueError, match="top_k"):
        _cache(teacher, data, tmp_path / "bad", mode="topk")
    with pytest.raises(ValueError, match="float16 range"):
        _cache(teacher, data, tmp_path / "bad", dtype="float16")


class _Killed(Exception):
    pass


def test_interrupted_write_resumes_with_the_finished_shards(tmp_path, monkeypatch):
    teacher, data = tiny_model("llama"), _dataset(n=10)
    reference = _cache(teacher, data, tmp_path / "reference")
    real = teacher_cache_writer._write_shard
    written = []

    def dies_at_the_third_shard(*args, **kwargs):
        if len(written) == 2:
            raise _Killed  # mid-write: the third shard's temporary file exists, its sidecar does not
        written.append(args[2].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(teacher_cache_writer, "_write_shard", dies_at_the_third_shard)
    with pytest.raises(_Killed):
        _cache(teacher, data, tmp_path / "cache")
    partial = tmp_path / ".cache.partial"
    assert not (tmp_path / "cache").exists()
    assert sorted(p.name for p in partial.glob("shard-*.json")) == ["shard-00000.json", "shard-00001.json"]

    written.clear()
    monkeypatch.setattr(teacher_cache_writer, "_write_shard", lambda *args, **kwargs: (written.append(args[2].name),
                        real(*args, **kwargs))[1])  # fmt: skip
    cache = _cache(teacher, data, tmp_path / "cache")
    assert written == ["shard-00002.arrow", "shard-00003.arrow"]  # only the missing shards were computed
    assert not partial.exists()
    for i in range(len(data)):
        for column in cache.column_names:
            np.testing.assert_array_equal(cache[i][column], reference[i][column])


def test_killed_writer_process_resumes(tmp_path):
    """A real SIGKILL while a shard is being written: the rerun keeps the finished shards."""
    script = os.path.join(str(TESTS), "scripts", "teacher_cache_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    signal_file = tmp_path / "second-shard-started"
    process = subprocess.Popen([sys.executable, script, str(tmp_path / "cache"), str(signal_file)], env=env)
    try:
        for _ in range(1200):
            if signal_file.exists() or process.poll() is not None:
                break
            time.sleep(0.1)
        assert signal_file.exists(), "the worker ended before writing its second shard"
        process.kill()
    finally:
        process.wait()
    finished = sorted(p.name for p in (tmp_path / ".cache.partial").glob("shard-*.json"))
    assert finished == ["shard-00000.json"]
    result = subprocess.run([sys.executable, script, str(tmp_path / "cache")], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "computed: ['shard-00001.arrow', 'shard-00002.arrow']" in result.stdout
    assert len(load_teacher_cache(tmp_path / "cache")) == 9


@pytest.mark.distributed
def test_distributed_cache_equals_the_one_process_cache(tmp_path):
    script = os.path.join(str(TESTS), "scripts", "teacher_cache_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541"]
    subprocess.run([*torchrun, script, str(tmp_path / "two")], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, script, str(tmp_path / "one")], check=True, env=env, timeout=300)
    one, two = load_teacher_cache(tmp_path / "one"), load_teacher_cache(tmp_path / "two")
    info_one, info_two = (json.loads((tmp_path / n / "teacher_cache.json").read_text()) for n in ("one", "two"))
    assert info_one["fingerprint"] == info_two["fingerprint"] and len(one) == len(two) == 9
    for i in range(len(one)):
        for column in one.column_names:
            np.testing.assert_array_equal(two[i][column], one[i][column])


# ---------------------------------------------------------------------------------------------- training from a cache
@pytest.mark.distributed
def test_ddp_from_a_cache_matches_one_process(tmp_path):
    _cache(tiny_model("llama"), _dataset(), tmp_path / "cache", mode="topk", top_k=16)
    script = os.path.join(str(TESTS), "scripts", "teacher_cache_ddp.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29542"]
    subprocess.run([*torchrun, script, str(tmp_path / "cache"), str(tmp_path / "ddp"), "2"], check=True, env=env,
                   timeout=300)  # fmt: skip
    subprocess.run([sys.executable, script, str(tmp_path / "cache"), str(tmp_path / "one"), "4"], check=True, env=env,
                   timeout=300)  # fmt: skip
    ddp, one = (torch.load(tmp_path / name / "result.pt", weights_only=True) for name in ("ddp", "one"))
    losses = [[log["loss"] for log in run["logs"] if "kd_loss" in log] for run in (ddp, one)]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-4)
    for name, value in one["state"].items():
        torch.testing.assert_close(ddp["state"][name], value, rtol=1e-4, atol=1e-6)


def test_training_from_a_cache_without_a_teacher(tmp_path):
    teacher, data = tiny_model("llama"), _dataset()
    cache = _cache(teacher, data, tmp_path / "cache", mode="topk", top_k=16)
    student = _student()
    before = _snapshot(student)
    args = _args(tmp_path / "out", eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2)
    trainer = DistillationTrainer(model=student, args=args, train_dataset=cache, eval_dataset=_dataset(4, seed=3))
    assert trainer.teacher_model is None and "teacher cache" in trainer.teacher_placement
    trainer.train()
    logs = [log for log in trainer.state.log_history if "kd_loss" in log]
    assert len(logs) == 2 and all(log["kd_loss"] > 0 and log["ce_loss"] > 0 for log in logs)
    evaluation = next(log for log in trainer.state.log_history if "eval_loss" in log)  # plain held-out data: CE
    assert evaluation["eval_loss"] == pytest.approx(evaluation["eval_ce_loss"]) and "eval_kd_loss" not in evaluation
    for name, param in student.named_parameters():
        assert not torch.equal(param, before[name]), f"{name} was not updated"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "checkpoint-2")
    ids = torch.randint(3, VOCAB_SIZE, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, student.eval()(ids).logits)


def test_gradient_accumulation_and_resume_from_a_cache(tmp_path):
    teacher, data = tiny_model("llama"), _dataset()
    cache = _cache(teacher, data, tmp_path / "cache")

    def run(output_dir, batch, accumulation, resume=None, **kwargs):
        torch.manual_seed(0)
        student = _student()
        args = _args(
            output_dir, max_steps=4, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
            optim="sgd", lr_scheduler_type="constant", ce_loss_weight=0.5, **kwargs,
        )  # fmt: skip
        DistillationTrainer(model=student, args=args, train_dataset=cache).train(resume_from_checkpoint=resume)
        return _snapshot(student)

    full = run(tmp_path / "b4", 4, 1, save_strategy="steps", save_steps=2)
    accumulated = run(tmp_path / "b2x2", 2, 2)
    resumed = run(tmp_path / "resumed", 4, 1, resume=str(tmp_path / "b4" / "checkpoint-2"))
    for name, value in full.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(resumed[name], value, rtol=1e-6, atol=1e-7)


def test_cli_cache_teacher(checkpoint, text_file, tmp_path, capsys):
    output = tmp_path / "cache"
    argv = [
        "cache-teacher", "--teacher", str(checkpoint), "--dataset", str(text_file), "--text_column", "content",
        "--seq_length", "16", "--max_train_samples", "6", "--mode", "topk", "--top_k", "8", "--shard_size", "4",
        "--output_dir", str(output),
    ]  # fmt: skip
    assert cli_main(argv) == 0
    assert f"Teacher cache (6 samples): {output}" in capsys.readouterr().out
    cache = load_teacher_cache(output, tokenizer=tiny_tokenizer())
    assert len(cache) == 6 and cache[0]["teacher_topk_ids"].shape == (16 * 8,)


def test_search_retrains_every_candidate_from_one_cache(tmp_path):
    from hf_minitron import SearchConfig, search_architectures

    teacher = tiny_model("llama")
    train, evaluation = _dataset(16, seed=1), _dataset(4, seed=2)
    config = SearchConfig(
        target_ratio=0.7, tolerance=0.1, hidden_size_multiple=8, intermediate_size_multiple=16, max_width_pruning=0.5,
        max_candidates=3, retrain_steps=4, eval_interval=2, eval_batch_size=4,
        pruning={"calibration_samples": 8, "calibration_batch_size": 4, "depth_calibration_samples": 4},
    )  # fmt: skip
    forwards = []  # the teacher's own forward passes (its pruned copies inherit the hook, with another module)
    teacher.register_forward_pre_hook(lambda module, args: forwards.append(module is teacher))
    results = {}
    for name, cache in (("live", None), ("cached", "hidden")):
        forwards.clear()
        results[name] = search_architectures(
            teacher, config, train, evaluation, output_dir=tmp_path / name, teacher_cache=cache, show_progress=False
        )
        results[name + "_forwards"] = sum(forwards)
    assert (tmp_path / "cached" / "teacher_cache" / "teacher_cache.json").is_file()
    # 3 candidates x 4 KD steps live; 2 batches of 8 to write the cache (the importance pass costs both the same).
    assert results["live_forwards"] - results["cached_forwards"] == 3 * 4 - 2
    assert [c.name for c in results["cached"].ranking()] == [c.name for c in results["live"].ranking()]
    for live, cached in zip(results["live"].candidates, results["cached"].candidates):
        assert cached.metric == pytest.approx(live.metric, rel=1e-5)


def test_recipe_script(checkpoint, text_file, tmp_path):
    recipes = str(ROOT / "recipes")
    output = tmp_path / "cache"
    result = subprocess.run(
        [
            sys.executable, os.path.join(recipes, "cache_teacher.py"),
            "--config", os.path.join(recipes, "smollm2-135m", "cache_teacher.yaml"),
            "--teacher", str(checkpoint), "--dataset", str(text_file), "--text_column", "content", "--seq_length", "16",
            "--max_train_samples", "5", "--output_dir", str(output),
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Teacher cache: 5 samples, 80 tokens, mode=hidden" in result.stdout
    assert len(load_teacher_cache(output)) == 5
