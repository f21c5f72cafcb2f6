"""The sampled teacher cache (`cache_teacher(mode="sampled")`, Sparse Logit Sampling): the loss's gradient is an
unbiased estimate of the forward KL's, and the cache keeps the guarantees of the other modes."""

import copy
import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB_SIZE, tiny_model, tiny_tokenizer
from test_teacher_cache import _args, _cache, _dataset, _loss_and_grads, _snapshot, _student

import hf_minitron.distillation.teacher_cache_writer as teacher_cache_writer
from hf_minitron import DistillationTrainer, load_teacher_cache
from hf_minitron.cli import main as cli_main
from hf_minitron.distillation.losses import KDLossOptions, fused_sampled_kd_loss_with_options, kd_loss, sampled_kd_loss
from hf_minitron.distillation.teacher_cache import CachedTeacher, draw_samples, unpack_samples
from hf_minitron.distillation.trainer import DataCollatorForDistillation


def _draws(log_p, num_samples, draws, seed=0):
    """`draws` independent sets of `num_samples` tokens from each row of `log_p` `[rows, vocab]`, by the cache's
    sampler: `(ids, counts)` `[draws * rows, w]`, draw after draw."""
    uniforms = torch.rand(draws * log_p.shape[0], num_samples, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(seed))  # fmt: skip
    ids, counts, _ = draw_samples(log_p.repeat(draws, 1), uniforms)
    return unpack_samples(ids, counts, num_samples)


def _exact_grad(student_logits, teacher_logits, temperature):
    z = student_logits.clone().requires_grad_()
    kd_loss(z, teacher_logits, temperature=temperature).backward()
    return z.grad


def _problem(rows=3, vocab=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g), 2 * torch.randn(rows, vocab, generator=g)


# ---------------------------------------------------------------------------------------------- the estimator
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_mean_sampled_gradient_is_the_forward_kl_gradient(temperature):
    """E[dL^/dz] = T (q - p): the mean over 2000 independent draws is within 4.5 standard errors of the exact one."""
    student_logits, teacher_logits = _problem()
    rows, vocab = student_logits.shape
    k, draws = 4, 2000
    log_p = F.log_softmax(teacher_logits / temperature, -1)
    ids, counts = _draws(log_p, k, draws)
    z = student_logits.repeat(draws, 1).requires_grad_()
    entropy = torch.special.entr(log_p.exp()).sum(-1).repeat(draws)
    losses = sampled_kd_loss(z, ids, counts, k, entropy, temperature=temperature, reduction="none")
    losses.sum().backward()  # the draws are independent rows: each row's gradient is its own draw's
    grads = z.grad.view(draws, rows, vocab)

    exact = _exact_grad(student_logits, teacher_logits, temperature)
    p = log_p.exp()
    # Per component, dL^/dz_v = T (q_v - c_v / K) with c_v ~ Binomial(K, p_v): variance T^2 p_v (1 - p_v) / K.
    standard_error = temperature * (p * (1 - p) / (k * draws)).sqrt()
    z_scores = (grads.mean(0) - exact).abs() / (standard_error + 1e-12)
    assert (grads.mean(0) - exact).abs().le(4.5 * standard_error + 1e-6).all(), z_scores.max()
    # The test has power: a teacher off by a quarter of the smallest visible gradient error is rejected.
    shifted = _exact_grad(student_logits, teacher_logits * 1.25, temperature)
    assert (grads.mean(0) - shifted).abs().gt(4.5 * standard_error + 1e-6).any()

    # With the teacher's entropy the value is unbiased too: E[L^] = T^2 KL(p || q).
    values = losses.detach().view(draws, rows)
    exact_kl = kd_loss(student_logits, teacher_logits, temperature=temperature, reduction="none")
    value_error = values.std(0) / draws**0.5
    assert (values.mean(0) - exact_kl).abs().le(4.5 * value_error).all()


def test_many_samples_give_a_gradient_close_to_the_exact_one():
    student_logits, teacher_logits = _problem(rows=4, vocab=30, seed=1)
    log_p = F.log_softmax(teacher_logits, -1)
    p = log_p.exp()
    exact = _exact_grad(student_logits, teacher_logits, 1.0)
    errors = {}
    for k in (4, 255):  # 255: the most a cache stores (uint8 counts)
        ids, counts = _draws(log_p, k, 1, seed=k)
        z = student_logits.clone().requires_grad_()
        sampled_kd_loss(z, ids, counts, k).backward()
        # E ||g^ - g||^2 = sum over rows of (1 - sum_v p_v^2) / K (the trace of the covariance): within 3 RMS.
        rms = ((1 - p.pow(2).sum(-1)).sum() / k).sqrt()
        errors[k] = (z.grad - exact).norm()
        assert errors[k] <= 3 * rms
    assert errors[255] < 0.15 * exact.norm() < errors[4]


def test_counts_that_are_the_teacher_probabilities_give_the_exact_loss():
    """When p is exactly counts / K, the sampled loss is the forward KL of a live teacher, in value and gradient."""
    counts = torch.tensor([[1, 2, 3, 1, 2, 3], [6, 1, 1, 1, 2, 1]])
    ids = torch.arange(6).expand(2, 6)
    temperature = 2.0
    teacher_logits = temperature * torch.log(counts / 12)  # p = softmax(z_t / T) = counts / 12
    entropy = torch.special.entr(counts / 12).sum(-1)
    student_logits = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    results = []
    for loss in (
        lambda z: sampled_kd_loss(z, ids, counts, 12, entropy, temperature=temperature),
        lambda z: kd_loss(z, teacher_logits, temperature=temperature),
    ):
        z = student_logits.clone().requires_grad_()
        value = loss(z)
        value.backward()
        results.append((value.detach(), z.grad))
    torch.testing.assert_close(results[0], results[1])
    # Identical distributions give 0; padding slots (count 0) add nothing.
    padded_ids, padded_counts = F.pad(ids, (0, 2)), F.pad(counts, (0, 2))
    value = sampled_kd_loss(teacher_logits, padded_ids, padded_counts, 12, entropy, temperature=temperature)
    torch.testing.assert_close(value, torch.tensor(0.0), atol=1e-5, rtol=0)


def test_fused_sampled_loss_equals_the_loss_on_full_logits():
    tokens, hidden_size, vocab, k = 11, 8, 30, 6
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=g)
    weight, bias = torch.randn(vocab, hidden_size, generator=g), torch.randn(vocab, generator=g)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[[2, 7]] = -100
    ids, counts = _draws(F.log_softmax(torch.randn(tokens, vocab, generator=g), -1), k, 1)
    entropy = torch.rand(tokens, generator=g)
    options = KDLossOptions(temperature=2.0, kd_weight=0.7, ce_weight=0.3, chunk_size=4, student_softcap=5.0)
    results = []
    for fused in (True, False):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        if fused:
            loss = fused_sampled_kd_loss_with_options(h, w, ids, counts, k, entropy, labels, options, b)[0]
        else:
            logits = 5.0 * torch.tanh(F.linear(h, w, b) / 5.0)
            kd = sampled_kd_loss(logits, ids, counts, k, entropy, labels, temperature=2.0)
            loss = 0.7 * kd + 0.3 * F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad, b.grad))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- the cache
def test_sampled_cache_layout_counts_and_entropy(tmp_path):
    teacher, data = tiny_model("llama"), _dataset(n=7)
    cache = _cache(teacher, data, tmp_path / "cache", mode="sampled", num_samples=12, temperature=2.0)
    info = json.loads((tmp_path / "cache" / "teacher_cache.json").read_text())
    assert info["num_samples"] == 12 and info["seed"] == 0 and info["temperature"] == 2.0 and info["top_k"] is None
    assert cache.features["teacher_sample_counts"].feature.dtype == "uint8"
    assert cache.features["teacher_sample_ids"].feature.dtype == "uint16"
    batch = DataCollatorForDistillation()([cache[i] for i in range(3)])
    mask = batch["attention_mask"].bool()
    sums = batch["teacher_sample_counts"].sum(-1)
    assert sums[mask].eq(12).all() and sums[~mask].eq(0).all()
    ids = torch.tensor([data[0]["input_ids"]])
    with torch.no_grad():
        log_p = torch.log_softmax(teacher(ids).logits[0].float() / 2.0, -1)
    torch.testing.assert_close(batch["teacher_entropy"][0, :16], torch.special.entr(log_p.exp()).sum(-1))
    # The draws follow the teacher at the cache's temperature: summed over the positions, every token's frequency is
    # within 5 standard errors of its summed probability.
    p_hat = torch.zeros(16, VOCAB_SIZE).scatter_add_(
        -1, batch["teacher_sample_ids"][0], batch["teacher_sample_counts"][0].float() / 12
    )
    p = log_p.exp()
    assert (p_hat.sum(0) - p.sum(0)).abs().le(5 * (p * (1 - p) / 12).sum(0).sqrt() + 1e-6).all()


def test_sampled_cache_is_reproducible_and_independent_of_batching(tmp_path):
    teacher, data = tiny_model("llama"), _dataset()
    first = _cache(teacher, data, tmp_path / "a", mode="sampled", num_samples=8)
    again = _cache(teacher, data, tmp_path / "b", mode="sampled", num_samples=8, batch_size=3, shard_size=3)
    reseeded = _cache(teacher, data, tmp_path / "c", mode="sampled", num_samples=8, seed=1)
    for i in range(len(data)):
        for column in first.column_names:
            np.testing.assert_array_equal(again[i][column], first[i][column])
    assert any(
        not np.array_equal(reseeded[i]["teacher_sample_ids"], first[i]["teacher_sample_ids"]) for i in range(len(data))
    )


class _Killed(Exception):
    pass


def test_interrupted_sampled_write_resumes_to_the_same_cache(tmp_path, monkeypatch):
    teacher, data = tiny_model("llama"), _dataset(n=10)
    reference = _cache(teacher, data, tmp_path / "reference", mode="sampled", num_samples=6)
    real, written = teacher_cache_writer._write_shard, []

    def dies_at_the_third_shard(*args, **kwargs):
        if len(written) == 2:
            raise _Killed
        written.append(args[2].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(teacher_cache_writer, "_write_shard", dies_at_the_third_shard)
    with pytest.raises(_Killed):
        _cache(teacher, data, tmp_path / "cache", mode="sampled", num_samples=6)
    assert not (tmp_path / "cache").exists()
    written.clear()
    monkeypatch.setattr(teacher_cache_writer, "_write_shard", lambda *args, **kwargs: (written.append(args[2].name),
                        real(*args, **kwargs))[1])  # fmt: skip
    cache = _cache(teacher, data, tmp_path / "cache", mode="sampled", num_samples=6)
    assert written == ["shard-00002.arrow", "shard-00003.arrow"]
    for i in range(len(data)):
        for column in cache.column_names:
            np.testing.assert_array_equal(cache[i][column], reference[i][column])


def test_sampled_cache_refuses_another_teacher_data_or_settings(tmp_path):
    teacher, data = tiny_model("llama"), _dataset()
    tokenizer = tiny_tokenizer()
    path = tmp_path / "cache"
    _cache(teacher, data, path, mode="sampled", num_samples=8, tokenizer=tokenizer)
    corrected = copy.deepcopy(teacher)
    with torch.no_grad():
        corrected.model.layers[1].mlp.down_proj.weight.add_(1e-2)
    with pytest.raises(ValueError, match="another teacher .*teacher correction"):
        load_teacher_cache(path, teacher=corrected)
    with pytest.raises(ValueError, match="other data"):
        load_teacher_cache(path, dataset=_dataset(seed=1))
    with pytest.raises(ValueError, match="another tokenizer"):
        load_teacher_cache(path, tokenizer=tiny_tokenizer(vocab_size=80))
    with pytest.raises(ValueError, match="other settings .*teacher"):
        _cache(corrected, data, path, mode="sampled", num_samples=8, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="other settings .*num_samples"):
        _cache(teacher, data, path, mode="sampled", num_samples=9, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="other settings .*seed"):
        _cache(teacher, data, path, mode="sampled", num_samples=8, tokenizer=tokenizer, seed=3)
    with pytest.raises(ValueError, match="other data"):
        _cache(teacher, _dataset(seed=1), path, mode="sampled", num_samples=8, tokenizer=tokenizer)
    load_teacher_cache(path, teacher=teacher, tokenizer=tokenizer, dataset=data, seq_length=16)
    for bad in (None, 0, 256, 2.0, True):
        with pytest.raises(ValueError, match="num_samples"):
            _cache(teacher, data, tmp_path / "bad", mode="sampled", num_samples=bad)
    with pytest.raises(ValueError, match="num_samples is for mode='sampled'"):
        _cache(teacher, data, tmp_path / "bad", mode="topk", top_k=4, num_samples=4)
    with pytest.raises(ValueError, match="top_k is for mode='topk'"):
        _cache(teacher, data, tmp_path / "bad", mode="sampled", num_samples=4, top_k=4)


def test_trainer_refuses_what_a_sampled_cache_cannot_serve(tmp_path):
    cache = _cache(tiny_model("llama"), _dataset(), tmp_path / "cache", mode="sampled", num_samples=8)
    for config, message in (
        ({"kd_loss": "reverse_kl"}, "kd_loss='reverse_kl' cannot be estimated without bias"),
        ({"kd_top_k": 4}, "kd_top_k=4 needs the teacher's top-k tokens"),
        ({"kd_temperature": 2.0}, "kd_temperature=2.0 differs .*sampled from"),
        ({"intermediate_layer_mapping": "0:1"}, "intermediate states"),
    ):
        with pytest.raises(ValueError, match=message):
            DistillationTrainer(model=_student(), args=_args(tmp_path, **config), train_dataset=cache)


def test_bytes_per_token_recorded_and_below_top_k(tmp_path, caplog):
    teacher, data = tiny_model("llama"), _dataset(n=16, seq_length=32)
    k = 12
    with caplog.at_level(logging.INFO, logger="hf_minitron.distillation.teacher_cache"):
        _cache(teacher, data, tmp_path / "sampled", mode="sampled", num_samples=k, shard_size=16)
    assert "bytes per token" in caplog.text and "of them the teacher's" in caplog.text
    _cache(teacher, data, tmp_path / "topk", mode="topk", top_k=k, shard_size=16)
    sampled, topk = (json.loads((tmp_path / n / "teacher_cache.json").read_text()) for n in ("sampled", "topk"))
    # At most K distinct uint16 ids and uint8 counts, and an fp32 entropy; top-k: K uint16 ids and fp32 values, and
    # the rest's fp32 log-mass.
    assert sampled["teacher_bytes_per_token"] <= k * (2 + 1) + 4 < topk["teacher_bytes_per_token"] == k * (2 + 4) + 4
    assert sampled["bytes_per_token"] < topk["bytes_per_token"]


# ---------------------------------------------------------------------------------------------- training from it
def test_training_from_a_sampled_cache_without_a_teacher(tmp_path):
    teacher, data = tiny_model("llama"), _dataset()
    cache = _cache(teacher, data, tmp_path / "cache", mode="sampled", num_samples=12)
    student = _student()
    before = _snapshot(student)
    trainer = DistillationTrainer(model=student, args=_args(tmp_path / "out", max_steps=3), train_dataset=cache)
    assert trainer.teacher_model is None and "num_samples=12" in trainer.teacher_placement
    trainer.train()
    logs = [log for log in trainer.state.log_history if "kd_loss" in log]
    assert len(logs) == 3 and all(np.isfinite(log["loss"]) and log["ce_loss"] > 0 for log in logs)
    for name, param in student.named_parameters():
        assert not torch.equal(param, before[name]), f"{name} was not updated"


def test_cached_sampled_teacher_fused_and_unfused_paths_agree(tmp_path):
    teacher, data = tiny_model("llama"), _dataset()
    cache = _cache(teacher, data, tmp_path / "cache", mode="sampled", num_samples=12)
    cached = CachedTeacher.from_dataset(cache)
    assert "num_samples=12" in repr(cached)
    results = []
    for fused in (True, False):
        student = _student()
        args = _args(tmp_path / str(fused), use_fused_kd_loss=fused, ce_loss_weight=0.5)
        trainer = DistillationTrainer(model=student, args=args, train_dataset=cache)
        results.append(_loss_and_grads(trainer, student, [cache[i] for i in range(4)]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-4, atol=1e-6)


def test_cli_cache_teacher_sampled(checkpoint, text_file, tmp_path):
    output = tmp_path / "cache"
    argv = [
        "cache-teacher", "--teacher", str(checkpoint), "--dataset", str(text_file), "--text_column", "content",
        "--seq_length", "16", "--max_train_samples", "4", "--mode", "sampled", "--num_samples", "8", "--seed", "3",
        "--output_dir", str(output),
    ]  # fmt: skip
    assert cli_main(argv) == 0
    cache = load_teacher_cache(output)
    info = json.loads((output / "teacher_cache.json").read_text())
    assert info["num_samples"] == 8 and info["seed"] == 3
    assert cache[0]["teacher_sample_counts"].sum() == 16 * 8
