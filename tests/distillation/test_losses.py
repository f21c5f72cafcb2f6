import math

import pytest
import torch
import torch.nn.functional as F

from hf_minitron.distillation.losses import (
    KD_LOSSES,
    KDLossOptions,
    forward_kl,
    fused_kd_loss,
    fused_kd_loss_with_options,
    fused_topk_kd_loss,
    fused_topk_kd_loss_with_options,
    intermediate_state_loss,
    jensen_shannon,
    kd_loss,
    token_divergence,
    topk_kd_loss,
    total_variation,
)


def _logits(n=12, vocab=40, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=g, dtype=torch.float64).float() * scale


@pytest.mark.parametrize("loss_type", KD_LOSSES)
def test_identical_logits_give_zero(loss_type):
    z = _logits()
    assert kd_loss(z, z.clone(), loss_type=loss_type, temperature=2.0).abs().item() < 1e-5


def test_forward_kl_matches_kl_div_at_t1():
    s, t = _logits(seed=0), _logits(seed=1)
    expected = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    torch.testing.assert_close(forward_kl(s, t), expected, rtol=1e-5, atol=1e-5)


def test_temperature_scaling_convention():
    s, t = _logits(seed=0), _logits(seed=1)
    temperature = 3.0
    plain = F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1), reduction="sum")
    # Documented convention: softmax(z / T) for both, times T**2.
    torch.testing.assert_close(forward_kl(s, t, temperature=temperature), plain * temperature**2, rtol=1e-5, atol=1e-5)


def test_jsd_bounds_and_symmetry():
    s, t = _logits(seed=0), _logits(seed=1, scale=6.0)
    per_token = token_divergence(s, t, "jsd", beta=0.5)
    assert (per_token >= -1e-6).all() and (per_token <= math.log(2) + 1e-6).all()
    torch.testing.assert_close(per_token, token_divergence(t, s, "jsd", beta=0.5), rtol=1e-5, atol=1e-6)
    # Asymmetric beta: still bounded by the binary entropy H(beta).
    beta = 0.2
    bound = -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta))
    assert (token_divergence(s, t, "jsd", beta=beta) <= bound + 1e-6).all()
    assert jensen_shannon(s, t, beta=0.5).item() > 0


def test_tvd_bounds():
    s, t = _logits(seed=0), _logits(seed=1, scale=20.0)
    per_token = token_divergence(s, t, "tvd")
    assert (per_token >= 0).all() and (per_token <= 1 + 1e-6).all()
    # Near-disjoint distributions approach 1.
    a = torch.full((1, 4), -50.0)
    b = a.clone()
    a[0, 0], b[0, 1] = 50.0, 50.0
    assert total_variation(a, b).item() == pytest.approx(1.0, abs=1e-5)


def test_masking_and_reductions():
    s, t = _logits(seed=0), _logits(seed=1)
    labels = torch.arange(12)
    labels[::3] = -100
    keep = labels.ne(-100)
    torch.testing.assert_close(kd_loss(s, t, labels), kd_loss(s[keep], t[keep]))
    torch.testing.assert_close(kd_loss(s, t, labels, reduction="mean"), kd_loss(s[keep], t[keep]) / keep.sum())
    assert kd_loss(s, t, labels, reduction="none")[~keep].abs().sum() == 0


def test_top_k_restricts_to_teacher_support():
    s, t = _logits(seed=0), _logits(seed=1)
    full = kd_loss(s, t)
    assert kd_loss(s, t, top_k=t.shape[-1]).item() == pytest.approx(full.item(), rel=1e-5)
    assert kd_loss(s, t, top_k=5).item() != pytest.approx(full.item(), rel=1e-3)


def test_intermediate_state_loss():
    x = torch.randn(2, 5, 8)
    assert intermediate_state_loss(x, 3 * x).abs().item() < 1e-5  # cosine ignores scale
    assert intermediate_state_loss(x, -x).item() == pytest.approx(20.0, rel=1e-5)
    torch.testing.assert_close(intermediate_state_loss(x, x + 1, "mse"), torch.tensor(10.0))
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    assert intermediate_state_loss(x, -x, mask=mask).item() == pytest.approx(6.0, rel=1e-5)
    with pytest.raises(ValueError, match="cosine"):
        intermediate_state_loss(x, x, "l1")


# ---------------------------------------------------------------------------------------------- fused vs unfused
def _reference(sh, sw, th, tw, labels, loss_type, temperature, kd_weight, ce_weight, top_k=None, sb=None, cap=None):
    logits = F.linear(sh, sw, sb)
    teacher = F.linear(th, tw)[:, : sw.shape[0]]
    if cap is not None:
        logits, teacher = cap * torch.tanh(logits / cap), cap * torch.tanh(teacher / cap)
    kd = kd_loss(logits, teacher, labels, loss_type, temperature, beta=0.3, top_k=top_k)
    ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    return kd_weight * kd + ce_weight * ce, kd, ce


def _inputs(seed=0, n=23, hs=8, ht=12, vocab=50, teacher_vocab=50, bias=False):
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(n, hs, generator=g).requires_grad_()
    sw = (torch.randn(vocab, hs, generator=g) * 0.7).requires_grad_()
    sb = (torch.randn(vocab, generator=g) * 0.5).requires_grad_() if bias else None
    th = torch.randn(n, ht, generator=g)
    tw = torch.randn(teacher_vocab, ht, generator=g) * 0.7
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[[0, 5, 6, 17]] = -100
    return sh, sw, sb, th, tw, labels


@pytest.mark.parametrize("loss_type", KD_LOSSES)
@pytest.mark.parametrize(("temperature", "ce_weight"), [(1.0, 0.0), (2.0, 0.0), (0.7, 0.5)])
def test_fused_equals_unfused_value_and_gradients(loss_type, temperature, ce_weight):
    sh, sw, _, th, tw, labels = _inputs()
    loss, kd, ce = fused_kd_loss(
        sh, sw, th, tw, labels, loss_type, temperature, beta=0.3, ce_weight=ce_weight, kd_weight=0.8, chunk_size=5
    )
    grads = torch.autograd.grad(3.0 * loss, [sh, sw])  # a non-unit upstream gradient must be honoured
    sh2, sw2 = sh.detach().clone().requires_grad_(), sw.detach().clone().requires_grad_()
    ref, ref_kd, ref_ce = _reference(sh2, sw2, th, tw, labels, loss_type, temperature, 0.8, ce_weight)
    ref_grads = torch.autograd.grad(3.0 * ref, [sh2, sw2])
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kd, ref_kd.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce, ref_ce.detach(), rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not kd.requires_grad and not ce.requires_grad


def test_fused_bias_softcap_topk_and_padded_teacher_vocab():
    sh, sw, sb, th, tw, labels = _inputs(seed=1, bias=True, teacher_vocab=64)  # teacher vocab padded 50 -> 64
    loss, _, _ = fused_kd_loss(
        sh, sw, th, tw, labels, "forward_kl", 1.5, ce_weight=0.3, chunk_size=4, top_k=7,
        student_bias=sb, student_softcap=5.0, teacher_softcap=5.0,
    )  # fmt: skip
    grads = torch.autograd.grad(loss, [sh, sw, sb])
    leaves = [t.detach().clone().requires_grad_() for t in (sh, sw, sb)]
    ref, _, _ = _reference(
        leaves[0], leaves[1], th, tw, labels, "forward_kl", 1.5, 1.0, 0.3, top_k=7, sb=leaves[2], cap=5.0
    )
    ref_grads = torch.autograd.grad(ref, leaves)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_fused_chunk_size_does_not_change_result():
    sh, sw, _, th, tw, labels = _inputs(seed=2)
    a = fused_kd_loss(sh, sw, th, tw, labels, chunk_size=1)[0]
    b = fused_kd_loss(sh, sw, th, tw, labels, chunk_size=1000)[0]
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_fused_frozen_lm_head_gives_only_hidden_gradient():
    sh, sw, _, th, tw, labels = _inputs(seed=3)
    sw = sw.detach()
    loss, _, _ = fused_kd_loss(sh, sw, th, tw, labels, "reverse_kl")
    loss.backward()
    assert sh.grad is not None and sh.grad.abs().sum() > 0 and sw.grad is None


def test_fused_bf16_close_to_fp32():
    sh, sw, _, th, tw, labels = _inputs(seed=4, n=64, hs=32, ht=32, vocab=128, teacher_vocab=128)
    ref = fused_kd_loss(sh, sw, th, tw, labels)[0]
    low = fused_kd_loss(sh.bfloat16(), sw.bfloat16(), th.bfloat16(), tw.bfloat16(), labels)[0]
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(ref.item(), rel=0.05)


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("ce_weight", [0.0, 0.5])
def test_fused_forward_kl_fast_path_with_bias_and_ce(chunk_size, ce_weight):
    # Forward KL at T = 1 without top-k or soft-capping takes the buffer-reusing path: same value and gradients.
    sh, sw, sb, th, tw, labels = _inputs(seed=5, bias=True)
    loss, kd, ce = fused_kd_loss(
        sh, sw, th, tw, labels, kd_weight=0.6, ce_weight=ce_weight, chunk_size=chunk_size, student_bias=sb
    )
    grads = torch.autograd.grad(2.0 * loss, [sh, sw, sb])
    leaves = [t.detach().clone().requires_grad_() for t in (sh, sw, sb)]
    ref, ref_kd, ref_ce = _reference(
        leaves[0], leaves[1], th, tw, labels, "forward_kl", 1.0, 0.6, ce_weight, sb=leaves[2]
    )
    ref_grads = torch.autograd.grad(2.0 * ref, leaves)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kd, ref_kd.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce, ref_ce.detach(), rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_fused_values_without_grad_match_training_values():
    sh, sw, _, th, tw, labels = _inputs(seed=6)
    with torch.no_grad():
        evaluated = fused_kd_loss(sh, sw, th, tw, labels, ce_weight=0.5, chunk_size=3)
    trained = fused_kd_loss(sh, sw, th, tw, labels, ce_weight=0.5, chunk_size=3)
    for a, b in zip(evaluated, trained):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-6)


def test_fused_second_backward_is_refused():
    sh, sw, _, th, tw, labels = _inputs(seed=7)
    loss, _, _ = fused_kd_loss(sh, sw, th, tw, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        loss.backward()


def test_chunk_rows_from_memory_budget():
    from hf_minitron.distillation.losses import CHUNK_BYTES, chunk_rows

    assert chunk_rows(49152, 7) == 7
    rows = chunk_rows(49152)
    assert rows * 49152 * 4 <= CHUNK_BYTES < (rows + 1) * 49152 * 4
    assert chunk_rows(10**12) == 1


# ---------------------------------------------------------------------------------------------- cached top-k teacher
def _teacher_topk(teacher_logits, k, temperature=1.0):
    """What a `mode="topk"` teacher cache stores per token: ids, log-probabilities at `temperature`, rest log-mass."""
    log_p = F.log_softmax(teacher_logits.float() / temperature, -1)
    values, ids = log_p.topk(k, -1)
    rest = log_p.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids, values, rest


@pytest.mark.parametrize("loss_type", KD_LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_with_k_equal_vocab_is_the_exact_loss(loss_type, temperature):
    s, t = _logits(seed=0), _logits(seed=1)
    ids, log_p, rest = _teacher_topk(t, t.shape[-1], temperature)
    exact = kd_loss(s, t, loss_type=loss_type, temperature=temperature, beta=0.3, reduction="none")
    cached = topk_kd_loss(
        s, ids, log_p, rest, loss_type=loss_type, temperature=temperature, beta=0.3, reduction="none"
    )
    torch.testing.assert_close(cached, exact, rtol=1e-5, atol=1e-6)


def test_topk_renormalised_matches_live_top_k():
    s, t = _logits(seed=0), _logits(seed=1)
    ids, log_p, rest = _teacher_topk(t, 12)
    torch.testing.assert_close(
        topk_kd_loss(s, ids, log_p, rest, top_k=5), kd_loss(s, t, top_k=5), rtol=1e-5, atol=1e-6
    )


def test_topk_tail_bucket_forward_kl_bound_and_gradient():
    s, t = _logits(seed=0), _logits(seed=1)
    s.requires_grad_()
    ids, log_p, rest = _teacher_topk(t, 6)
    loss = topk_kd_loss(s, ids, log_p, rest)
    # The k + 1 buckets are a coarsening of the vocabulary: KL can only shrink (data-processing inequality).
    assert 0 < loss.item() <= forward_kl(s, t).item()
    (grad,) = torch.autograd.grad(loss, s)
    # d/dz = q - p~: the teacher on its top k, its rest mass spread like the student's tail elsewhere.
    q = F.softmax(s.detach(), -1)
    top = torch.zeros_like(q, dtype=torch.bool).scatter(-1, ids, True)
    q_rest = q.masked_fill(top, 0).sum(-1, keepdim=True)
    p_tilde = torch.where(top, F.softmax(t, -1), rest.exp()[:, None] * q / q_rest)
    torch.testing.assert_close(p_tilde.sum(-1), torch.ones(len(s)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, q - p_tilde, rtol=1e-4, atol=1e-6)


def _topk_reference(sh, sw, ids, log_p, rest, labels, loss_type, temperature, kd_weight, ce_weight, **kw):
    sb, cap, top_k = kw.get("sb"), kw.get("cap"), kw.get("top_k")
    logits = F.linear(sh, sw, sb)
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    kd = topk_kd_loss(logits, ids, log_p, rest, labels, loss_type, temperature, beta=0.3, top_k=top_k)
    ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    return kd_weight * kd + ce_weight * ce, kd, ce


@pytest.mark.parametrize("loss_type", KD_LOSSES)
@pytest.mark.parametrize(("k", "temperature", "ce_weight", "top_k"), [(7, 1.0, 0.0, None), (50, 1.0, 0.4, None),
                                                                      (7, 2.0, 0.4, None), (9, 1.0, 0.0, 4)])  # fmt: skip
def test_fused_topk_equals_unfused_value_and_gradients(loss_type, k, temperature, ce_weight, top_k):
    sh, sw, sb, th, tw, labels = _inputs(seed=8, bias=True)
    ids, log_p, rest = _teacher_topk(F.linear(th, tw), k, temperature)
    loss, kd, ce = fused_topk_kd_loss(
        sh, sw, ids, log_p, rest, labels, loss_type, temperature, beta=0.3, top_k=top_k, kd_weight=0.8,
        ce_weight=ce_weight, chunk_size=5, student_bias=sb,
    )  # fmt: skip
    grads = torch.autograd.grad(3.0 * loss, [sh, sw, sb])
    leaves = [x.detach().clone().requires_grad_() for x in (sh, sw, sb)]
    ref, ref_kd, ref_ce = _topk_reference(
        *leaves[:2], ids, log_p, rest, labels, loss_type, temperature, 0.8, ce_weight, sb=leaves[2], top_k=top_k
    )
    ref_grads = torch.autograd.grad(3.0 * ref, leaves)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kd, ref_kd.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce, ref_ce.detach(), rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_fused_topk_softcap_and_values_without_grad():
    sh, sw, _, th, tw, labels = _inputs(seed=9)
    ids, log_p, rest = _teacher_topk(F.linear(th, tw), 10)
    loss, _, _ = fused_topk_kd_loss(sh, sw, ids, log_p, rest, labels, ce_weight=0.5, student_softcap=4.0)
    grads = torch.autograd.grad(loss, [sh, sw])
    leaves = [x.detach().clone().requires_grad_() for x in (sh, sw)]
    ref, _, _ = _topk_reference(*leaves, ids, log_p, rest, labels, "forward_kl", 1.0, 1.0, 0.5, cap=4.0)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, torch.autograd.grad(ref, leaves)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        evaluated = fused_topk_kd_loss(sh, sw, ids, log_p, rest, labels, ce_weight=0.5, student_softcap=4.0)
    torch.testing.assert_close(evaluated[0], loss.detach())
    with pytest.raises(ValueError, match="top_k=11 exceeds the 10 tokens"):
        fused_topk_kd_loss(sh, sw, ids, log_p, rest, labels, top_k=11)


# ---------------------------------------------------------------------------------------------- loss options
def test_loss_options_from_config_and_defaults(tmp_path):
    import dataclasses

    from hf_minitron.distillation.config import DistillationConfig

    config = DistillationConfig(
        output_dir=str(tmp_path), kd_loss="jsd", kd_temperature=2, jsd_beta=0.3, kd_top_k=5, kd_loss_weight=2,
        ce_loss_weight=0.5, kd_chunk_size=7, report_to="none", use_cpu=True,
    )  # fmt: skip
    options = KDLossOptions.from_config(config, student_softcap=3.0, teacher_softcap=4.0)
    assert options == KDLossOptions("jsd", 2.0, 0.3, 5, 2.0, 0.5, 7, 3.0, 4.0)
    assert all(type(getattr(options, name)) is float for name in ("temperature", "beta", "kd_weight", "ce_weight"))
    assert options.divergence == {"loss_type": "jsd", "temperature": 2.0, "beta": 0.3, "top_k": 5}
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.kd_weight = 1.0
    # The options' defaults are the config's (the papers'): forward KL, T = 1, KD only, no top-k.
    assert KDLossOptions.from_config(DistillationConfig(output_dir=str(tmp_path))) == KDLossOptions()


@pytest.mark.parametrize(
    "settings",
    [{}, {"loss_type": "reverse_kl", "temperature": 2.0, "ce_weight": 0.3, "chunk_size": 5},
     {"loss_type": "jsd", "beta": 0.3, "top_k": 6, "kd_weight": 0.5, "student_softcap": 4.0, "teacher_softcap": 5.0}],
    ids=["defaults", "reverse_kl_t2_ce", "jsd_top_k_softcap"],
)  # fmt: skip
def test_fused_losses_equal_their_options_versions(settings):
    """The public keyword functions are the options functions: same values and gradients, bit for bit."""
    sh, sw, sb, th, tw, labels = _inputs(seed=10, bias=True)
    options = KDLossOptions(**settings)
    results = []
    for fused in (
        lambda: fused_kd_loss(sh, sw, th, tw, labels, **settings, student_bias=sb),
        lambda: fused_kd_loss_with_options(sh, sw, th, tw, labels, options, student_bias=sb),
    ):
        loss, kd, ce = fused()
        results.append((loss, kd, ce, *torch.autograd.grad(loss, [sh, sw, sb])))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)

    topk = _teacher_topk(F.linear(th, tw), 10)
    settings = {k: v for k, v in settings.items() if k != "teacher_softcap"}
    results = []
    for fused in (
        lambda: fused_topk_kd_loss(sh, sw, *topk, labels, **settings, student_bias=sb),
        lambda: fused_topk_kd_loss_with_options(sh, sw, *topk, labels, options, student_bias=sb),
    ):
        loss, kd, ce = fused()
        results.append((loss, kd, ce, *torch.autograd.grad(loss, [sh, sw, sb])))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
