"""Distillation losses: logit divergences, the intermediate-state loss, and the fused chunked KD loss.

Conventions shared by every function here:

- `student_logits` / `teacher_logits` are already aligned: row `i` of both predicts the same next token, and
  `labels[i]` is that token (shift causal-LM labels *before* calling). Rows with `labels == -100` are ignored.
- Temperature: both distributions are `softmax(logits / T)` and the divergence is multiplied by `T**2` (Hinton et
  al., 2015), so that the gradient magnitude does not shrink as `1 / T**2` when `T` grows and the loss weights keep
  their meaning across temperatures. At `T = 1` every loss is the plain divergence.
- Reductions return a *sum* over tokens by default: the trainer divides by the number of target tokens of the whole
  (accumulated, all-device) batch, which makes gradient accumulation exact.

The fused loss (`fused_kd_loss`) computes the same values from the final hidden states and the `lm_head` weights,
chunk by chunk over tokens, so the `[tokens, vocab]` logits of student and teacher never exist for the whole batch.
"""

import math

import torch
import torch.nn.functional as F


KD_LOSSES = ("forward_kl", "reverse_kl", "jsd", "tvd")
INTERMEDIATE_LOSSES = ("cosine", "mse")
REDUCTIONS = ("sum", "mean", "none")


# ---------------------------------------------------------------------------------------------- per-token divergences
def _log_probs(student_logits, teacher_logits, temperature, top_k):
    """fp32 log-probabilities `(log q_student, log p_teacher)` at `temperature`, restricted to the teacher's top-k."""
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    if top_k is not None:
        # Both distributions are renormalised over the teacher's k most likely tokens.
        index = t.topk(min(top_k, t.shape[-1]), dim=-1).indices
        s, t = s.gather(-1, index), t.gather(-1, index)
    return F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)


def _jsd_from_log_probs(log_q, log_p, beta):
    # log M = log(beta * p + (1 - beta) * q), computed in log space so that tiny probabilities stay exact.
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
    return beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss_type: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    top_k: int | None = None,
) -> torch.Tensor:
    """Per-token divergence between teacher and student next-token distributions, scaled by `temperature**2`.

    Args:
        student_logits (`torch.Tensor` of shape `[..., vocab]`): Student logits.
        teacher_logits (`torch.Tensor` of shape `[..., vocab]`): Teacher logits (same vocabulary).
        loss_type (`str`, *optional*, defaults to `"forward_kl"`):
            `"forward_kl"` = KL(p_teacher || q_student) (Minitron's choice, paper 1 §2.4), `"reverse_kl"` =
            KL(q || p), `"jsd"` = the generalised Jensen-Shannon divergence
            `beta * KL(p || m) + (1 - beta) * KL(q || m)` with `m = beta * p + (1 - beta) * q`, or `"tvd"` = total
            variation `0.5 * sum |p - q|`.
        temperature (`float`, *optional*, defaults to `1.0`): Softmax temperature of both distributions.
        beta (`float`, *optional*, defaults to `0.5`): Mixture weight of the JSD, in (0, 1).
        top_k (`int`, *optional*): Restrict both distributions to the teacher's top-k tokens (renormalised).

    Returns:
        `torch.Tensor` of shape `[...]` (fp32): the divergence of every token.
    """
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature, top_k)
    if loss_type == "forward_kl":
        div = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif loss_type == "reverse_kl":
        div = (log_q.exp() * (log_q - log_p)).sum(-1)
    elif loss_type == "jsd":
        div = _jsd_from_log_probs(log_q, log_p, beta)
    elif loss_type == "tvd":
        div = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    else:
        raise ValueError(f"loss_type={loss_type!r} is not supported: choose one of {list(KD_LOSSES)}.")
    return div * temperature**2


def _reduce(values: torch.Tensor, labels: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if labels is not None:
        values = values * labels.ne(-100)
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        count = values.numel() if labels is None else labels.ne(-100).sum()
        return values.sum() / count
    if reduction == "none":
        return values
    raise ValueError(f"reduction={reduction!r} is not supported: choose one of {list(REDUCTIONS)}.")


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    loss_type: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    top_k: int | None = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """Logit distillation loss on full logits (the reference the fused loss is tested against).

    Args:
        student_logits (`torch.Tensor` of shape `[..., vocab]`): Student logits.
        teacher_logits (`torch.Tensor` of shape `[..., vocab]`): Teacher logits.
        labels (`torch.Tensor` of shape `[...]`, *optional*): Targets aligned with the logits; `-100` rows are ignored.
        loss_type, temperature, beta, top_k: See [`token_divergence`].
        reduction (`str`, *optional*, defaults to `"sum"`): `"sum"` over kept tokens, `"mean"` per kept token, or
            `"none"` (masked rows are 0).

    Returns:
        `torch.Tensor`: a scalar, or `[...]` for `reduction="none"`.
    """
    div = token_divergence(student_logits, teacher_logits, loss_type, temperature, beta, top_k)
    return _reduce(div, labels, reduction)


def forward_kl(student_logits, teacher_logits, labels=None, temperature=1.0, reduction="sum"):
    """KL(p_teacher || q_student) at `temperature` (times `T**2`); shapes as in [`kd_loss`]."""
    return kd_loss(student_logits, teacher_logits, labels, "forward_kl", temperature, reduction=reduction)


def reverse_kl(student_logits, teacher_logits, labels=None, temperature=1.0, reduction="sum"):
    """KL(q_student || p_teacher) at `temperature` (times `T**2`); shapes as in [`kd_loss`]."""
    return kd_loss(student_logits, teacher_logits, labels, "reverse_kl", temperature, reduction=reduction)


def jensen_shannon(student_logits, teacher_logits, labels=None, temperature=1.0, beta=0.5, reduction="sum"):
    """Generalised JSD with mixture weight `beta` (in `[0, H(beta)]`, symmetric at `beta=0.5`); see [`kd_loss`]."""
    return kd_loss(student_logits, teacher_logits, labels, "jsd", temperature, beta, reduction=reduction)


def total_variation(student_logits, teacher_logits, labels=None, temperature=1.0, reduction="sum"):
    """Total variation distance `0.5 * sum |p - q|` (in `[0, 1]` at `T=1`); see [`kd_loss`]."""
    return kd_loss(student_logits, teacher_logits, labels, "tvd", temperature, reduction=reduction)


def intermediate_state_loss(
    student_states: torch.Tensor,
    teacher_states: torch.Tensor,
    loss_type: str = "cosine",
    mask: torch.Tensor | None = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """Distance between (projected) student and teacher hidden states (paper 1, §2.4, `L_is`).

    Args:
        student_states (`torch.Tensor` of shape `[..., hidden]`):
            Student hidden states, already projected to the teacher's width.
        teacher_states (`torch.Tensor` of shape `[..., hidden]`): Teacher hidden states.
        loss_type (`str`, *optional*, defaults to `"cosine"`):
            `"cosine"` (`1 - cos`, per token) or `"mse"` (mean squared error over the hidden dimension, per token).
        mask (`torch.Tensor` of shape `[...]`, *optional*): Tokens to keep (bool or 0/1).
        reduction (`str`, *optional*, defaults to `"sum"`): As in [`kd_loss`].

    Returns:
        `torch.Tensor`: a scalar, or `[...]` for `reduction="none"`.
    """
    s, t = student_states.float(), teacher_states.float()
    if loss_type == "cosine":
        per_token = 1 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    elif loss_type == "mse":
        per_token = (s - t).pow(2).mean(-1)
    else:
        raise ValueError(f"loss_type={loss_type!r} is not supported: choose one of {list(INTERMEDIATE_LOSSES)}.")
    labels = None if mask is None else torch.where(mask.bool(), 0, -100)
    return _reduce(per_token, labels, reduction)


# ---------------------------------------------------------------------------------------------- fused chunked loss
def _softcap(logits, cap):
    return logits if cap is None else cap * torch.tanh(logits / cap)


def _kd_value_and_grad(s_logits, t_logits, loss_type, temperature, beta, top_k, need_grad=True):
    """Per-token KD loss `[n]`, its gradient w.r.t. the (soft-capped) student logits `[n, vocab]` (fp32), and the
    student log-probabilities at `T = 1` when they were computed anyway (reused for CE), else `None`.

    With `s = z / T`, `q = softmax(s)`, `p = softmax(z_t / T)` and `L = T**2 D(p, q)`, `dL/dz = T dD/ds`, where:
    forward KL `q - p`; every other divergence `q * (g - sum(q * g))` with `g = dD/dq`: reverse KL
    `g = log q - log p (+1)`, JSD `g = (1 - beta) log(q / m)`, TVD `g = sign(q - p) / 2`.
    """
    index = None
    # At T = 1 (the Minitron default) skip the divisions: every [n, vocab] pass counts on the hot path.
    s = s_logits if temperature == 1 else s_logits / temperature
    t = t_logits if temperature == 1 else t_logits / temperature
    if top_k is not None:
        index = t.topk(min(top_k, t.shape[-1]), dim=-1).indices
        s, t = s.gather(-1, index), t.gather(-1, index)
    log_q = F.log_softmax(s, dim=-1)
    log_p = F.log_softmax(t, dim=-1)
    p = log_p.exp()
    if loss_type == "forward_kl":
        loss = (p * (log_p - log_q)).sum(-1)
        grad = log_q.exp().sub_(p) if need_grad else None
    else:
        q = log_q.exp()
        if loss_type == "reverse_kl":
            g = log_q - log_p
            loss = (q * g).sum(-1)
        elif loss_type == "jsd":
            log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
            loss = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
            g = (1 - beta) * (log_q - log_m)
        elif loss_type == "tvd":
            g = 0.5 * torch.sign(q - p)
            loss = 0.5 * (p - q).abs().sum(-1)
        else:
            raise ValueError(f"loss_type={loss_type!r} is not supported: choose one of {list(KD_LOSSES)}.")
        grad = q * (g - (q * g).sum(-1, keepdim=True)) if need_grad else None
    reusable = log_q if temperature == 1 and index is None else None
    if temperature != 1:
        loss = loss * temperature**2
        if grad is not None:
            grad = grad * temperature
    if grad is not None and index is not None:
        grad = torch.zeros_like(s_logits).scatter_(-1, index, grad)
    return loss, grad, reusable


def _fused_kd_forward(
    student_hidden,
    student_weight,
    student_bias,
    teacher_hidden,
    teacher_weight,
    teacher_bias,
    labels,
    options,
    need_grads,
):
    """The chunk loop: KD and CE sums, and (when `need_grads`) the fp32 gradients of their weighted sum."""
    (loss_type, temperature, beta, top_k, kd_weight, ce_weight, chunk_size, s_cap, t_cap) = options
    vocab = student_weight.shape[0]
    teacher_weight = teacher_weight[:vocab]  # a teacher vocab padded beyond the student's: same tokens, extra rows
    teacher_bias = None if teacher_bias is None else teacher_bias[:vocab]
    need_weight_grad = need_grads and student_weight.requires_grad
    need_bias_grad = need_grads and student_bias is not None and student_bias.requires_grad
    device = student_hidden.device
    grad_hidden = torch.empty_like(student_hidden, dtype=torch.float32) if need_grads else None
    grad_weight = torch.zeros_like(student_weight, dtype=torch.float32) if need_weight_grad else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if need_bias_grad else None
    kd_sum = torch.zeros((), dtype=torch.float32, device=device)
    ce_sum = torch.zeros_like(kd_sum)
    for start in range(0, student_hidden.shape[0], chunk_size):
        h = student_hidden[start : start + chunk_size]
        # Matmuls in the model dtype (fast bf16 kernels), everything after them in fp32.
        z = F.linear(h, student_weight, student_bias).float()
        zt = _softcap(
            F.linear(teacher_hidden[start : start + chunk_size], teacher_weight, teacher_bias).float(), t_cap
        )
        tanh = None
        if s_cap is not None:
            tanh = torch.tanh(z / s_cap)
            z = s_cap * tanh
        kd_tok, grad, log_probs = _kd_value_and_grad(z, zt, loss_type, temperature, beta, top_k, need_grads)
        kd_sum += kd_tok.sum()
        # CE from the same chunk logits (at T = 1): the ground-truth LM loss, always computed for logging.
        target = labels[start : start + chunk_size]
        if log_probs is None:
            log_probs = F.log_softmax(z, dim=-1)
        ce_sum -= log_probs.gather(-1, target[:, None]).sum()
        if not need_grads:
            continue
        if kd_weight != 1:
            grad.mul_(kd_weight)
        if ce_weight:
            probs = log_probs.exp()
            probs[torch.arange(len(target), device=device), target] -= 1
            grad.add_(probs, alpha=ce_weight)
        del log_probs
        if tanh is not None:
            grad.mul_(1 - tanh.pow(2))  # d(cap * tanh(x / cap)) / dx
        g = grad.to(h.dtype)
        grad_hidden[start : start + chunk_size] = g @ student_weight
        if need_weight_grad:
            grad_weight.add_(g.t() @ h)
        if need_bias_grad:
            grad_bias.add_(grad.sum(0))
    return kd_sum, ce_sum, (grad_hidden, grad_weight, grad_bias)


class _FusedKDLoss(torch.autograd.Function):
    """Chunked KD (+ CE) loss whose gradients are computed chunk by chunk in `forward` and replayed in `backward`."""

    @staticmethod
    def forward(
        ctx,
        student_hidden,
        student_weight,
        student_bias,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        labels,
        options,
    ):
        kd_sum, ce_sum, grads = _fused_kd_forward(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, labels,
            options, need_grads=True,
        )  # fmt: skip
        ctx.save_for_backward(*grads)
        ctx.dtypes = (student_hidden.dtype, student_weight.dtype)
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        kd_weight, ce_weight = options[4], options[5]
        return kd_weight * kd_sum + ce_weight * ce_sum, kd_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        grad_hidden = (grad_hidden * grad_loss).to(hidden_dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_loss).to(weight_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def fused_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    loss_type: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    top_k: int | None = None,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    chunk_size: int = 1024,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KD (+ CE) loss from final hidden states and `lm_head` weights, never materialising the full logits.

    Equal in value and gradient to `kd_weight * kd_loss(...) + ce_weight * cross_entropy(...)` (both summed over the
    tokens whose label is not `-100`) on the full logits, but only `[chunk_size, vocab]` logits exist at a time. The
    gradients w.r.t. `student_hidden`, `student_weight` and `student_bias` are computed chunk by chunk during the
    forward pass (one pass over the vocabulary instead of two) and scaled by the incoming gradient in backward.

    Args:
        student_hidden (`torch.Tensor` of shape `[tokens, hidden_s]`): Post-norm final hidden states of the student.
        student_weight (`torch.Tensor` of shape `[vocab, hidden_s]`): Student `lm_head` weight.
        teacher_hidden (`torch.Tensor` of shape `[tokens, hidden_t]`): Post-norm final hidden states of the teacher.
        teacher_weight (`torch.Tensor` of shape `[vocab_t, hidden_t]`):
            Teacher `lm_head` weight; rows beyond the student's vocabulary (padding) are ignored.
        labels (`torch.Tensor` of shape `[tokens]`): Next-token targets; `-100` rows are dropped before the loop.
        loss_type, temperature, beta, top_k: See [`token_divergence`].
        kd_weight (`float`, *optional*, defaults to `1.0`): Weight of the KD term in the returned loss.
        ce_weight (`float`, *optional*, defaults to `0.0`): Weight of the student's cross-entropy term.
        chunk_size (`int`, *optional*, defaults to `1024`): Tokens per chunk.
        student_bias, teacher_bias (`torch.Tensor` of shape `[vocab]`, *optional*): `lm_head` biases.
        student_softcap, teacher_softcap (`float`, *optional*): Gemma-2 `final_logit_softcapping` of each model.

    Returns:
        `tuple(torch.Tensor, torch.Tensor, torch.Tensor)`: the weighted loss sum (differentiable), and the KD and CE
        sums (detached, for logging).
    """
    keep = labels.ne(-100)
    if not bool(keep.all()):
        student_hidden, teacher_hidden, labels = student_hidden[keep], teacher_hidden[keep], labels[keep]
    options = (
        loss_type,
        float(temperature),
        float(beta),
        top_k,
        float(kd_weight),
        float(ce_weight),
        int(chunk_size),
        student_softcap,
        teacher_softcap,
    )
    teacher = (
        teacher_hidden.detach(),
        teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
    )
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (student_hidden, student_weight, student_bias)
    )
    if not needs_grad:  # evaluation: values only, no gradient buffers
        kd_sum, ce_sum, _ = _fused_kd_forward(
            student_hidden, student_weight, student_bias, *teacher, labels, options, False
        )
        return kd_weight * kd_sum + ce_weight * ce_sum, kd_sum, ce_sum
    return _FusedKDLoss.apply(student_hidden, student_weight, student_bias, *teacher, labels, options)
