"""The teacher kinds (`hf_minitron.distillation.teachers`): each gives the public losses on its outputs, and the kinds
agree with each other."""

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB_SIZE, random_samples, tiny_model
from datasets import Dataset

from hf_minitron import cache_teacher
from hf_minitron.distillation.losses import (
    KDLossOptions,
    fused_kd_loss,
    fused_topk_kd_loss,
    kd_loss,
    topk_kd_loss,
)
from hf_minitron.distillation.teacher_cache import CachedTeacher
from hf_minitron.distillation.teachers import LiveTeacher, ShardedTeacher
from hf_minitron.distillation.trainer import DataCollatorForDistillation


OPTIONS = KDLossOptions(loss_type="reverse_kl", temperature=2.0, ce_weight=0.3, chunk_size=5)
PUBLIC = dict(loss_type="reverse_kl", temperature=2.0, ce_weight=0.3, chunk_size=5)


def _dataset(n=8, seq_length=16):
    return Dataset.from_list([{k: v.tolist() for k, v in s.items()} for s in random_samples(n, seq_length)])


def _batch(rows):
    """`(model inputs, teacher-cache columns, next-token targets [tokens])`, as `compute_loss` splits a batch."""
    inputs = DataCollatorForDistillation()(rows)
    labels = inputs.pop("labels")
    targets = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
    columns = CachedTeacher.pop_columns(inputs)
    return {**inputs, "use_cache": False}, columns, targets


def _student_head(inputs):
    """The student's post-norm final hidden states `[batch, seq, hidden]` (a leaf with a gradient) and `lm_head`."""
    student = tiny_model("llama", seed=1, num_hidden_layers=2)
    with torch.no_grad():
        hidden = student(**inputs, output_hidden_states=True).hidden_states[-1]
    return student, hidden.requires_grad_(), student.lm_head


def _assert_same(result, expected):
    for a, b in zip(result, expected, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", [LiveTeacher, ShardedTeacher])
def test_live_and_sharded_teachers_give_the_public_losses(kind):
    teacher = tiny_model("llama")
    inputs, _, targets = _batch(random_samples(4))
    live = kind(teacher)
    with torch.no_grad():
        reference = teacher(**inputs, output_hidden_states=True)

    output = live.forward(inputs, {}, [1, 3], fused=True)
    torch.testing.assert_close(output.hidden, reference.hidden_states[-1].reshape(-1, output.hidden.shape[-1]))
    assert output.logits.shape[1] == 0  # the fused loss needs no teacher logits: its lm_head saw an empty slice
    assert sorted(output.states) == [1, 3]
    assert torch.equal(output.weight, teacher.lm_head.weight)
    # Only a sharded teacher copies its lm_head weight (gathered only inside its forward).
    assert (output.weight.data_ptr() == teacher.lm_head.weight.data_ptr()) == (kind is LiveTeacher)

    student, hidden, head = _student_head(inputs)
    loss = live.fused_loss(output, hidden, head, targets, OPTIONS)
    flat = hidden.reshape(-1, hidden.shape[-1])
    _assert_same(loss, fused_kd_loss(flat, head.weight, output.hidden, teacher.lm_head.weight, targets, **PUBLIC))

    output = live.forward(inputs, {}, [], fused=False)
    torch.testing.assert_close(output.logits, reference.logits)
    logits = student(**inputs).logits.reshape(-1, VOCAB_SIZE)
    expected = kd_loss(logits, reference.logits.reshape(-1, VOCAB_SIZE), targets, "reverse_kl", 2.0)
    torch.testing.assert_close(live.kd_loss(output, logits, targets, OPTIONS), expected, rtol=0, atol=0)


def test_live_teacher_reads_its_softcap_from_the_unwrapped_model():
    teacher = tiny_model("gemma2", final_logit_softcapping=3.0)
    assert LiveTeacher(teacher).softcap == 3.0
    assert LiveTeacher(torch.nn.Identity(), unwrapped=teacher).softcap == 3.0
    assert LiveTeacher(tiny_model("llama")).softcap is None


@pytest.mark.parametrize(("mode", "top_k"), [("hidden", None), ("topk", VOCAB_SIZE), ("topk", 7)])
def test_cached_teacher_gives_the_public_losses_and_those_of_the_live_teacher(tmp_path, mode, top_k):
    teacher, data = tiny_model("llama"), _dataset()
    # A top-k cache holds log-probabilities at the loss temperature.
    temperature = OPTIONS.temperature if mode == "topk" else 1.0
    cache = cache_teacher(
        teacher, data, tmp_path / "cache", mode=mode, top_k=top_k, temperature=temperature, show_progress=False
    )
    cached = CachedTeacher.from_dataset(cache)
    inputs, columns, targets = _batch([cache[i] for i in range(4)])
    assert columns and cached.forward(inputs, {}, [], fused=True) is None  # no teacher outputs: CE only

    output = cached.forward(inputs, columns, [], fused=True)
    student, hidden, head = _student_head(inputs)
    flat = hidden.reshape(-1, hidden.shape[-1])
    loss = cached.fused_loss(output, hidden, head, targets, OPTIONS)
    logits = student(**inputs).logits.reshape(-1, VOCAB_SIZE)
    if mode == "hidden":
        assert output.topk is None and output.weight is cached.weight
        _assert_same(loss, fused_kd_loss(flat, head.weight, output.hidden, cached.weight, targets, **PUBLIC))
        expected_kd = kd_loss(logits, F.linear(output.hidden, cached.weight), targets, "reverse_kl", 2.0)
    else:
        assert output.hidden is None and output.topk[0].shape == (targets.numel(), top_k)
        _assert_same(loss, fused_topk_kd_loss(flat, head.weight, *output.topk, targets, **PUBLIC))
        expected_kd = topk_kd_loss(logits, *output.topk, targets, "reverse_kl", 2.0)
    assert torch.equal(cached.kd_loss(output, logits, targets, OPTIONS), expected_kd)

    if top_k in (None, VOCAB_SIZE):  # an fp32 hidden cache, or every token cached: the live teacher's loss
        live = LiveTeacher(teacher)
        live_loss = live.fused_loss(live.forward(inputs, {}, [], fused=True), hidden, head, targets, OPTIONS)
        torch.testing.assert_close(loss[0], live_loss[0], rtol=1e-5, atol=1e-6)
