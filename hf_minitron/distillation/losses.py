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
`topk_kd_loss` / `fused_topk_kd_loss` do the same from a cached top-k teacher (ids, log-probabilities and the mass of
the rest of the vocabulary per token; see `hf_minitron.distillation.teacher_cache`), and `sampled_kd_loss` /
`fused_sampled_kd_loss_with_options` from tokens sampled from the teacher (forward KL, unbiased). Their settings travel
as one [`KDLossOptions`] (what the trainer builds once from its config): `fused_kd_loss_with_options`,
`fused_topk_kd_loss_with_options` and `fused_sampled_kd_loss_with_options` take it, and the keyword functions build it
from their arguments.

One module, past 500 lines: the logit losses, their top-k and sampled forms and the fused chunked kernels are one
family of functions with shared identities (identical logits give 0, chunked equals unchunked); the tests check them
against each other here.
"""

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F


KD_LOSSES = ("forward_kl", "reverse_kl", "jsd", "tvd")
INTERMEDIATE_LOSSES = ("cosine", "mse")
REDUCTIONS = ("sum", "mean", "none")


@dataclass(frozen=True)
class KDLossOptions:
    """The settings of the logit loss (KD, plus the student's CE), as one value for the fused losses and the trainer.

    Args:
        loss_type (`str`, *optional*, defaults to `"forward_kl"`): One of `KD_LOSSES`, see [`token_divergence`].
        temperature (`float`, *optional*, defaults to `1.0`): Softmax temperature of both distributions.
        beta (`float`, *optional*, defaults to `0.5`): Mixture weight of the JSD.
        top_k (`int`, *optional*): Restrict both distributions to the teacher's top-k tokens.
        kd_weight (`float`, *optional*, defaults to `1.0`): Weight of the KD term.
        ce_weight (`float`, *optional*, defaults to `0.0`): Weight of the student's cross-entropy term.
        chunk_size (`int`, *optional*): Tokens per chunk of the fused losses (default: see [`chunk_rows`]).
        student_softcap, teacher_softcap (`float`, *optional*): Gemma-2 `final_logit_softcapping` of each model.
    """

    loss_type: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    top_k: int | None = None
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    chunk_size: int | None = None
    student_softcap: float | None = None
    teacher_softcap: float | None = None

    def __post_init__(self):
        # Plain Python numbers whatever the caller passed: the chunk loop tests `temperature == 1` to pick its fast
        # path, steps `range` by `chunk_size` and hands the weights to an autograd Function as constants.
        for name in ("temperature", "beta", "kd_weight", "ce_weight"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.chunk_size is not None:
            object.__setattr__(self, "chunk_size", int(self.chunk_size))

    @classmethod
    def from_config(cls, config, student_softcap: float | None = None, teacher_softcap: float | None = None):
        """The options of a [`DistillationConfig`] (`kd_loss`, `kd_temperature`, `jsd_beta`, `kd_top_k`,
        `kd_loss_weight`, `ce_loss_weight`, `kd_chunk_size`), with the soft-capping of the two models."""
        return cls(
            loss_type=config.kd_loss,
            temperature=config.kd_temperature,
            beta=config.jsd_beta,
            top_k=config.kd_top_k,
            kd_weight=config.kd_loss_weight,
            ce_weight=config.ce_loss_weight,
            chunk_size=config.kd_chunk_size,
            student_softcap=student_softcap,
            teacher_softcap=teacher_softcap,
        )

    @property
    def divergence(self) -> dict:
        """The keyword arguments of [`kd_loss`] / [`topk_kd_loss`]: which divergence, at which temperature."""
        return {"loss_type": self.loss_type, "temperature": self.temperature, "beta": self.beta, "top_k": self.top_k}


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
    return _divergence(log_q, log_p, loss_type, beta) * temperature**2


def _divergence(log_q, log_p, loss_type, beta):
    """`D(p, q)` over the last dimension from log-probabilities (the buckets need not be single tokens)."""
    if loss_type == "forward_kl":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if loss_type == "reverse_kl":
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    if loss_type == "jsd":
        return _jsd_from_log_probs(log_q, log_p, beta)
    if loss_type == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise ValueError(f"loss_type={loss_type!r} is not supported: choose one of {list(KD_LOSSES)}.")


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


# ---------------------------------------------------------------------------------------------- cached top-k teacher
# Floor of the log-probabilities of a cached top-k teacher: exp(-1e4) is 0 in fp32, so a bucket without mass adds
# exactly 0 to every divergence (a stored -inf would give 0 * inf = nan).
LOG_PROB_FLOOR = -1e4


def _topk_log_probs(student_logits, teacher_ids, teacher_log_probs, teacher_rest, temperature, top_k):
    """`(log q, log p)` of student and teacher over the buckets of a cached top-k teacher, shape `[..., buckets]`.

    Without `top_k`: one bucket per cached token and one for the rest of the vocabulary (teacher mass
    `exp(teacher_rest)`, student mass outside the k tokens); with k = vocab there is no rest bucket. With `top_k`:
    the teacher's first `top_k` cached tokens, both distributions renormalised over them (as `kd_loss(top_k=...)`).
    """
    s = student_logits.float() / temperature
    ids = teacher_ids.long()
    log_p = teacher_log_probs.float().clamp_min(LOG_PROB_FLOOR)
    if top_k is not None:
        ids, log_p = ids[..., :top_k], log_p[..., :top_k]
        return F.log_softmax(s.gather(-1, ids), dim=-1), F.log_softmax(log_p, dim=-1)
    log_q = F.log_softmax(s, dim=-1)
    log_q_top = log_q.gather(-1, ids)
    if ids.shape[-1] >= s.shape[-1]:
        return log_q_top, log_p
    log_q_rest = log_q.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True).clamp_min(LOG_PROB_FLOOR)
    log_p_rest = teacher_rest.float().clamp_min(LOG_PROB_FLOOR).unsqueeze(-1)
    return torch.cat([log_q_top, log_q_rest], -1), torch.cat([log_p, log_p_rest], -1)


def topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    teacher_rest: torch.Tensor,
    labels: torch.Tensor | None = None,
    loss_type: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    top_k: int | None = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """Logit distillation from a cached top-k teacher, on full student logits (the reference of the fused version).

    The tail: the teacher's probability outside its k cached tokens, `exp(teacher_rest)`, is one bucket, compared
    with the student's probability outside the same k tokens. The divergence is taken between these `k + 1`-bucket
    distributions. For forward KL this equals KL to a teacher whose tail is spread like the student's own tail
    (gradient `q - p~`, with `p~ = p` on the k tokens and `p~ = exp(teacher_rest) * q / q_rest` elsewhere); it is a
    lower bound of the full-vocabulary KL and equals it when k is the vocabulary size (no tail).

    Args:
        student_logits (`torch.Tensor` of shape `[..., vocab]`): Student logits.
        teacher_ids (`torch.Tensor` of shape `[..., k]`): The teacher's k most likely tokens, most likely first.
        teacher_log_probs (`torch.Tensor` of shape `[..., k]`): Their log-probabilities, `log_softmax(z / T)` over
            the whole vocabulary at the loss temperature `T`.
        teacher_rest (`torch.Tensor` of shape `[...]`): Log of the teacher's remaining mass, `log(1 - sum p_top)`.
        labels (`torch.Tensor` of shape `[...]`, *optional*): As in [`kd_loss`].
        loss_type, temperature, beta: See [`token_divergence`]; only the student is divided by `temperature`.
        top_k (`int`, *optional*): Use the first `top_k` (<= k) cached tokens with both distributions renormalised
            over them (no tail bucket), as `kd_loss(top_k=...)` does with a live teacher.
        reduction (`str`, *optional*, defaults to `"sum"`): As in [`kd_loss`].
    """
    log_q, log_p = _topk_log_probs(student_logits, teacher_ids, teacher_log_probs, teacher_rest, temperature, top_k)
    return _reduce(_divergence(log_q, log_p, loss_type, beta) * temperature**2, labels, reduction)


# ---------------------------------------------------------------------------------------------- sampled teacher
def sampled_kd_loss(
    student_logits: torch.Tensor,
    sample_ids: torch.Tensor,
    sample_counts: torch.Tensor,
    num_samples: int,
    teacher_entropy: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """Forward KL from tokens sampled from the teacher (Sparse Logit Sampling, [Anshumann et al., 2025](
    https://arxiv.org/abs/2503.16870)), on full student logits (the reference of the fused version).

    With `q = softmax(z / T)` the student's distribution (`z` = `student_logits`), `p = softmax(z_t / T)` the
    teacher's, and `c_v` the number of times token `v` came up in `K = num_samples` draws with replacement from `p`,
    `p^_v = c_v / K` is an unbiased estimator of `p_v` (`E[c_v] = K p_v`). The loss is

        L^ = T**2 * (-sum_v p^_v log q_v - H(p)),    dL^/dz = T (q - p^)    (as sum_v p^_v = 1),

        E[dL^/dz] = T (q - p) = d/dz [T**2 KL(p || q)],

    the gradient of the forward KL of [`kd_loss`] (a live teacher, divergence at temperature `T` times `T**2`): an
    unbiased estimate, of covariance `T**2 (diag(p) - p p^T) / K` per token. With the teacher's entropy `H(p)` at `T`
    the value is unbiased too, `E[L^] = T**2 KL(p || q)` (a single token's estimate may be negative); without it
    `L^` is that plus the constant `T**2 H(p)`, with the same gradient. Only forward KL has this property: the other
    divergences are not linear in `p`.

    Args:
        student_logits (`torch.Tensor` of shape `[..., vocab]`): Student logits.
        sample_ids (`torch.Tensor` of shape `[..., w]`): The distinct sampled tokens of each position (`w <= K`;
            padding slots have count 0 and any id in the vocabulary).
        sample_counts (`torch.Tensor` of shape `[..., w]`): How many of the `K` draws gave each; they sum to `K`.
        num_samples (`int`): `K`, the draws per position.
        teacher_entropy (`torch.Tensor` of shape `[...]`, *optional*): `H(p)` in nats at `temperature`.
        labels (`torch.Tensor` of shape `[...]`, *optional*): As in [`kd_loss`].
        temperature (`float`, *optional*, defaults to `1.0`): `T`; the samples must come from `softmax(z_t / T)`.
        reduction (`str`, *optional*, defaults to `"sum"`): As in [`kd_loss`].

    Returns:
        `torch.Tensor`: a scalar, or `[...]` for `reduction="none"`.
    """
    return _reduce(
        _sampled_divergence(student_logits, sample_ids, sample_counts, num_samples, teacher_entropy, temperature),
        labels,
        reduction,
    )


def _sampled_divergence(student_logits, sample_ids, sample_counts, num_samples, teacher_entropy, temperature):
    """Per-token `T**2 * (-sum_v p^_v log q_v - H(p))` `[...]` (fp32), see [`sampled_kd_loss`]."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p_hat = sample_counts.float() / num_samples
    cross_entropy = -(p_hat * log_q.gather(-1, sample_ids.long())).sum(-1)
    if teacher_entropy is not None:
        cross_entropy = cross_entropy - teacher_entropy.float()
    return cross_entropy * temperature**2


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


# Rows per chunk when `chunk_size` is not given: one fp32 `[rows, vocab]` buffer of about this many bytes (the loss
# holds three). On a 2-core CPU with SmolLM2's 49152-token vocabulary the loss was fastest with one chunk per
# 512-token batch and clearly slower at 128 rows: every chunk re-reads both lm_head weights (75-113 MB) three times.
CHUNK_BYTES = 128 * 2**20


def chunk_rows(vocab: int, chunk_size: int | None = None) -> int:
    """Tokens per chunk of [`fused_kd_loss`]: `chunk_size`, or as many as fit `CHUNK_BYTES` of fp32 logits."""
    return chunk_size if chunk_size is not None else max(1, CHUNK_BYTES // (4 * vocab))


def _log_softmax_linear(hidden, weight, bias, logits, out):
    """`log_softmax(hidden @ weight.T + bias)` in fp32 into `out`; the logits (model dtype) go to the `logits` buffer."""
    if bias is None:
        torch.mm(hidden, weight.t(), out=logits)
    else:
        torch.addmm(bias, hidden, weight.t(), out=logits)
    # dtype=float32 upcasts a bf16 input inside the kernel (no separate fp32 copy of the logits).
    return torch.log_softmax(logits, -1, dtype=torch.float32, out=out)


def _forward_kl_chunk(h, ht, target, weights, buffers, kd_weight, ce_weight, need_grad):
    """Forward KL at T = 1 (Minitron's default) on one chunk, in three reused `[rows, vocab]` fp32 buffers.

    Returns `(kd_sum, ce_sum, grad)` with `grad = kd_weight (q - p) + ce_weight (q - onehot)` (fp32, in a buffer) or
    `None`. Every op writes into a buffer it owns: a fresh 100 MB tensor per op costs page faults on CPU.
    """
    rows = h.shape[0]
    student_weight, student_bias, teacher_weight, teacher_bias = weights
    logits, log_q, log_p, p = (buffer[:rows] for buffer in buffers)
    _log_softmax_linear(h, student_weight, student_bias, logits, log_q)
    _log_softmax_linear(ht, teacher_weight, teacher_bias, logits, log_p)
    torch.exp(log_p, out=p)
    log_ratio = log_p.sub_(log_q)  # log p - log q
    ce_sum = -log_q.gather(1, target[:, None]).sum()
    grad = None
    if need_grad:
        grad = log_q.exp_()  # q
        if kd_weight + ce_weight != 1:
            grad.mul_(kd_weight + ce_weight)
        if kd_weight:
            grad.sub_(p, alpha=kd_weight)
        if ce_weight:
            grad[torch.arange(rows, device=grad.device), target] -= ce_weight
    kd_sum = p.mul_(log_ratio).sum()  # p is not needed any more: no temporary for p * log(p / q)
    return kd_sum, ce_sum, grad


def _generic_chunk(h, ht, target, weights, options, need_grad):
    """Any loss kind, temperature, top-k and soft-capping on one chunk (fp32 after the matmuls)."""
    kd_weight, ce_weight, s_cap = options.kd_weight, options.ce_weight, options.student_softcap
    student_weight, student_bias, teacher_weight, teacher_bias = weights
    z = F.linear(h, student_weight, student_bias).float()
    zt = _softcap(F.linear(ht, teacher_weight, teacher_bias).float(), options.teacher_softcap)
    tanh = None
    if s_cap is not None:
        tanh = torch.tanh(z / s_cap)
        z = s_cap * tanh
    kd_tok, grad, log_probs = _kd_value_and_grad(
        z, zt, options.loss_type, options.temperature, options.beta, options.top_k, need_grad
    )
    # CE from the same chunk logits (at T = 1): the ground-truth LM loss, always computed for logging.
    if log_probs is None:
        log_probs = F.log_softmax(z, dim=-1)
    ce_sum = -log_probs.gather(-1, target[:, None]).sum()
    if not need_grad:
        return kd_tok.sum(), ce_sum, None
    if kd_weight != 1:
        grad.mul_(kd_weight)
    if ce_weight:
        probs = log_probs.exp_()
        probs[torch.arange(len(target), device=probs.device), target] -= 1
        grad.add_(probs, alpha=ce_weight)
    if tanh is not None:
        grad.mul_(1 - tanh.pow(2))  # d(cap * tanh(x / cap)) / dx
    return kd_tok.sum(), ce_sum, grad


def _chunk_loop(student_hidden, student_weight, student_bias, labels, rows, chunk_loss, need_grads):
    """The chunk loop of the fused losses: KD and CE sums, and (when `need_grads`) the gradients of their weighted sum.

    `chunk_loss(start, h, target, need_grad)` returns the chunk's `(kd_sum, ce_sum, grad)`, `grad` being the gradient
    w.r.t. the chunk's logits (fp32) or `None`. The gradients are unscaled sums over tokens: `grad_hidden` in the
    hidden states' dtype, `grad_weight` in the weight's dtype for a single chunk, else an fp32 accumulator.
    """
    tokens = student_hidden.shape[0]
    single_chunk = rows >= tokens
    need_weight_grad = need_grads and student_weight.requires_grad
    need_bias_grad = need_grads and student_bias is not None and student_bias.requires_grad
    grad_hidden = torch.empty_like(student_hidden) if need_grads else None
    grad_weight = grad_bias = None
    kd_sum = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
    ce_sum = torch.zeros_like(kd_sum)
    for start in range(0, tokens, rows):
        h = student_hidden[start : start + rows]
        target = labels[start : start + rows]
        kd, ce, grad = chunk_loss(start, h, target, need_grads)
        kd_sum += kd
        ce_sum += ce
        if not need_grads:
            continue
        g = grad.to(h.dtype)
        torch.mm(g, student_weight, out=grad_hidden[start : start + rows])
        if need_weight_grad:
            if single_chunk:
                grad_weight = g.t() @ h
            elif grad_weight is None:
                grad_weight = (g.t() @ h).float()
            elif g.dtype == torch.float32:
                grad_weight.addmm_(g.t(), h)  # accumulates in place: no [vocab, hidden] temporary per chunk
            else:
                grad_weight.add_(g.t() @ h)
        if need_bias_grad:
            grad_bias = grad.sum(0) if grad_bias is None else grad_bias.add_(grad.sum(0))
    return kd_sum, ce_sum, (grad_hidden, grad_weight, grad_bias)


def _fused_kd_forward(student_hidden, student_weight, student_bias, teacher, labels, options, need_grads):
    """[`_chunk_loop`] with the teacher's logits recomputed chunk by chunk from `teacher = (hidden, weight, bias)`."""
    teacher_hidden, teacher_weight, teacher_bias = teacher
    vocab = student_weight.shape[0]
    teacher_weight = teacher_weight[:vocab]  # a teacher vocab padded beyond the student's: same tokens, extra rows
    teacher_bias = None if teacher_bias is None else teacher_bias[:vocab]
    weights = (student_weight, student_bias, teacher_weight, teacher_bias)
    rows = min(chunk_rows(vocab, options.chunk_size), max(student_hidden.shape[0], 1))
    dtype = student_weight.dtype
    fast = (
        options.loss_type == "forward_kl"
        and options.temperature == 1
        and options.top_k is None
        and options.student_softcap is None
        and options.teacher_softcap is None
        and all(t.dtype == dtype for t in (student_hidden, teacher_hidden, teacher_weight))
    )
    if fast:
        device = student_hidden.device
        log_q, log_p, p = (torch.empty(rows, vocab, dtype=torch.float32, device=device) for _ in range(3))
        # p is written only after both logits were turned into log-probabilities: fp32 logits can share its buffer.
        logits = p if dtype == torch.float32 else torch.empty(rows, vocab, dtype=dtype, device=device)
        buffers = (logits, log_q, log_p, p)

    def chunk_loss(start, h, target, need_grad):
        ht = teacher_hidden[start : start + h.shape[0]]
        if fast:
            return _forward_kl_chunk(h, ht, target, weights, buffers, options.kd_weight, options.ce_weight, need_grad)
        return _generic_chunk(h, ht, target, weights, options, need_grad)

    return _chunk_loop(student_hidden, student_weight, student_bias, labels, rows, chunk_loss, need_grads)


def _topk_forward_kl_chunk(h, teacher, target, weights, buffers, kd_weight, ce_weight, need_grad):
    """Forward KL at T = 1 from a cached top-k teacher on one chunk, in two reused `[rows, vocab]` buffers.

    With `p~` the teacher's k probabilities plus its rest mass spread like the student's tail (see [`topk_kd_loss`]),
    `grad = kd_weight (q - p~) + ce_weight (q - onehot)`.
    """
    ids, log_p, log_rest = teacher
    rows, k = ids.shape
    logits, log_q = (buffer[:rows] for buffer in buffers)
    _log_softmax_linear(h, *weights, logits, log_q)
    ce_sum = -log_q.gather(1, target[:, None]).sum()
    log_q_top = log_q.gather(1, ids)
    # The student's tail from its own small terms, in log space (1 - sum(q_top) would lose them to rounding).
    log_q.scatter_(1, ids, float("-inf"))
    log_q_rest = torch.logsumexp(log_q, -1).clamp_min_(LOG_PROB_FLOOR)
    p_top = log_p.exp()
    kd_sum = (p_top * (log_p - log_q_top)).sum()
    tail = k < log_q.shape[1]
    if tail:
        kd_sum += (log_rest.exp() * (log_rest - log_q_rest)).sum()
    if not need_grad:
        return kd_sum, ce_sum, None
    grad = log_q.exp_()  # q outside the top k, 0 on it
    scale = torch.full_like(log_q_rest, kd_weight + ce_weight)
    if tail:
        # p_rest / q_rest is bounded only by q_j <= q_rest: cap it so 0 * ratio stays 0 where the tail underflowed.
        scale -= kd_weight * (log_rest - log_q_rest).exp().clamp_max(1e30)
    grad.mul_(scale[:, None])
    grad.scatter_(1, ids, log_q_top.exp_().mul_(kd_weight + ce_weight).sub_(p_top, alpha=kd_weight))
    if ce_weight:
        grad[torch.arange(rows, device=grad.device), target] -= ce_weight
    return kd_sum, ce_sum, grad


def _autograd_chunk(h, target, weights, options, need_grad, kd_sum_of):
    """One chunk with autograd on its logits, for a cached teacher: `kd_sum_of(student logits)` is the chunk's summed
    KD term (the logits soft-capped like the student's); the CE term and the weighted gradient follow."""
    z = F.linear(h, *weights).float()
    grad = None
    with torch.enable_grad():
        z.requires_grad_(need_grad)
        capped = _softcap(z, options.student_softcap)
        kd = kd_sum_of(capped)
        ce = F.cross_entropy(capped, target, reduction="sum")
        if need_grad:
            (grad,) = torch.autograd.grad(options.kd_weight * kd + options.ce_weight * ce, z)
    return kd.detach(), ce.detach(), grad


def _topk_generic_chunk(h, teacher, target, weights, options, need_grad):
    """Any loss kind, temperature, `top_k` and soft-capping from a cached top-k teacher on one chunk."""
    temperature = options.temperature

    def kd_sum_of(logits):
        log_q, log_p = _topk_log_probs(logits, *teacher, temperature, options.top_k)
        return _divergence(log_q, log_p, options.loss_type, options.beta).sum() * temperature**2

    return _autograd_chunk(h, target, weights, options, need_grad, kd_sum_of)


def _fused_topk_forward(student_hidden, student_weight, student_bias, teacher, labels, options, need_grads):
    """[`_chunk_loop`] with the teacher's cached top-k log-probabilities `teacher = (ids, log_probs, rest)`."""
    vocab = student_weight.shape[0]
    rows = min(chunk_rows(vocab, options.chunk_size), max(student_hidden.shape[0], 1))
    ids, log_p, log_rest = teacher[0].long(), teacher[1].float(), teacher[2].float()
    log_p, log_rest = log_p.clamp_min(LOG_PROB_FLOOR), log_rest.clamp_min(LOG_PROB_FLOOR)
    fast = (
        options.loss_type == "forward_kl"
        and options.temperature == 1
        and options.top_k is None
        and options.student_softcap is None
    )
    weights = (student_weight, student_bias)
    if fast:
        device = student_hidden.device
        log_q = torch.empty(rows, vocab, dtype=torch.float32, device=device)
        dtype = student_weight.dtype
        logits = torch.empty(rows, vocab, dtype=dtype, device=device)
        buffers = (logits, log_q)

    def chunk_loss(start, h, target, need_grad):
        stop = start + h.shape[0]
        chunk = (ids[start:stop], log_p[start:stop], log_rest[start:stop])
        if fast:
            kd_weight, ce_weight = options.kd_weight, options.ce_weight
            return _topk_forward_kl_chunk(h, chunk, target, weights, buffers, kd_weight, ce_weight, need_grad)
        return _topk_generic_chunk(h, chunk, target, weights, options, need_grad)

    return _chunk_loop(student_hidden, student_weight, student_bias, labels, rows, chunk_loss, need_grads)


def _fused_sampled_forward(
    student_hidden, student_weight, student_bias, teacher, labels, options, num_samples, need_grads
):
    """[`_chunk_loop`] with a sampled teacher `teacher = (ids, counts, entropy)` (autograd on each chunk's logits:
    the loss is a gather and a log-softmax, cheap next to the matmuls)."""
    rows = min(chunk_rows(student_weight.shape[0], options.chunk_size), max(student_hidden.shape[0], 1))
    weights = (student_weight, student_bias)

    def chunk_loss(start, h, target, need_grad):
        ids, counts, entropy = (None if t is None else t[start : start + h.shape[0]] for t in teacher)

        def kd_sum_of(logits):
            return _sampled_divergence(logits, ids, counts, num_samples, entropy, options.temperature).sum()

        return _autograd_chunk(h, target, weights, options, need_grad, kd_sum_of)

    return _chunk_loop(student_hidden, student_weight, student_bias, labels, rows, chunk_loss, need_grads)


class _FusedKDLoss(torch.autograd.Function):
    """Chunked KD (+ CE) loss whose gradients are computed chunk by chunk in `forward` and replayed in `backward`.

    `run(need_grads)` is the chunk loop over the student tensors given to `apply` (and a teacher it holds).
    """

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, run, kd_weight, ce_weight):
        kd_sum, ce_sum, grads = run(need_grads=True)
        ctx.save_for_backward(*grads)
        ctx.dtypes = (student_hidden.dtype, student_weight.dtype)
        ctx.replayed = False
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return kd_weight * kd_sum + ce_weight * ce_sum, kd_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        if ctx.replayed:
            raise RuntimeError(
                "fused_kd_loss supports one backward pass per forward: its gradients are computed in forward and "
                "scaled in place in backward. Recompute the loss for a second backward (or use kd_loss on logits)."
            )
        ctx.replayed = True
        hidden_dtype, weight_dtype = ctx.dtypes
        # In place: the buffers are ours and used once, so scaling them allocates nothing.
        grad_hidden, grad_weight, grad_bias = (None if g is None else g.mul_(grad_loss) for g in ctx.saved_tensors)
        grad_hidden = grad_hidden.to(hidden_dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight_dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(weight_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def _apply_fused(forward, student_hidden, student_weight, student_bias, options):
    """Runs `forward(student_hidden, student_weight, student_bias, need_grads=...)`: through [`_FusedKDLoss`] when a
    gradient is needed, values only otherwise (evaluation: no gradient buffers)."""
    kd_weight, ce_weight = options.kd_weight, options.ce_weight
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (student_hidden, student_weight, student_bias)
    )
    run = partial(forward, student_hidden, student_weight, student_bias)
    if not needs_grad:
        kd_sum, ce_sum, _ = run(need_grads=False)
        return kd_weight * kd_sum + ce_weight * ce_sum, kd_sum, ce_sum
    return _FusedKDLoss.apply(student_hidden, student_weight, student_bias, run, kd_weight, ce_weight)


def _apply_fused_to_labelled(
    forward, student_hidden, student_weight, student_bias, labels, options, teacher_rows, teacher_fixed=(), **kwargs
):
    """[`_apply_fused`] on the tokens whose label is not `-100`: those rows are dropped from the student's hidden
    states, the labels and every per-token tensor of the teacher (`teacher_rows`; `None` stays `None`) before the loop,
    and the teacher (`teacher_rows + teacher_fixed`, e.g. its `lm_head`) is detached."""
    keep = labels.ne(-100)
    if not bool(keep.all()):
        student_hidden, labels = student_hidden[keep], labels[keep]
        teacher_rows = tuple(None if t is None else t[keep] for t in teacher_rows)
    teacher = tuple(None if t is None else t.detach() for t in (*teacher_rows, *teacher_fixed))
    forward = partial(forward, teacher=teacher, labels=labels, options=options, **kwargs)
    return _apply_fused(forward, student_hidden, student_weight, student_bias, options)


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
    chunk_size: int | None = None,
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
        teacher_hidden (`torch.Tensor` of shape `[tokens, hidden_t]`): Post-norm final hidden states of the teacher
            (from a live teacher, or from a `mode="hidden"` teacher cache, see [`cache_teacher`]).
        teacher_weight (`torch.Tensor` of shape `[vocab_t, hidden_t]`):
            Teacher `lm_head` weight; rows beyond the student's vocabulary (padding) are ignored.
        labels (`torch.Tensor` of shape `[tokens]`): Next-token targets; `-100` rows are dropped before the loop.
        loss_type, temperature, beta, top_k: See [`token_divergence`].
        kd_weight (`float`, *optional*, defaults to `1.0`): Weight of the KD term in the returned loss.
        ce_weight (`float`, *optional*, defaults to `0.0`): Weight of the student's cross-entropy term.
        chunk_size (`int`, *optional*):
            Tokens per chunk; by default as many as fit `CHUNK_BYTES` of fp32 `[chunk, vocab]` logits (the loss holds
            three such buffers, reused across chunks).
        student_bias, teacher_bias (`torch.Tensor` of shape `[vocab]`, *optional*): `lm_head` biases.
        student_softcap, teacher_softcap (`float`, *optional*): Gemma-2 `final_logit_softcapping` of each model.

    Returns:
        `tuple(torch.Tensor, torch.Tensor, torch.Tensor)`: the weighted loss sum (differentiable), and the KD and CE
        sums (detached, for logging).
    """
    options = KDLossOptions(
        loss_type, temperature, beta, top_k, kd_weight, ce_weight, chunk_size, student_softcap, teacher_softcap
    )
    return fused_kd_loss_with_options(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, options, student_bias, teacher_bias
    )


def fused_kd_loss_with_options(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    options: KDLossOptions,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[`fused_kd_loss`] with its loss settings as one [`KDLossOptions`] (what the trainer holds); same tensors and
    shapes, same return value."""
    return _apply_fused_to_labelled(
        _fused_kd_forward,
        student_hidden,
        student_weight,
        student_bias,
        labels,
        options,
        teacher_rows=(teacher_hidden,),
        teacher_fixed=(teacher_weight, teacher_bias),
    )


def fused_topk_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    teacher_rest: torch.Tensor,
    labels: torch.Tensor,
    loss_type: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    top_k: int | None = None,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    chunk_size: int | None = None,
    student_bias: torch.Tensor | None = None,
    student_softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KD (+ CE) loss from the student's final hidden states and a cached top-k teacher, chunk by chunk.

    Equal in value and gradient to `kd_weight * topk_kd_loss(...) + ce_weight * cross_entropy(...)` on the full
    student logits (see [`topk_kd_loss`] for the treatment of the teacher's tail), with only `[chunk_size, vocab]`
    logits at a time, like [`fused_kd_loss`].

    Args:
        student_hidden (`torch.Tensor` of shape `[tokens, hidden]`): Post-norm final hidden states of the student.
        student_weight (`torch.Tensor` of shape `[vocab, hidden]`): Student `lm_head` weight.
        teacher_ids (`torch.Tensor` of shape `[tokens, k]`): The teacher's k most likely tokens, most likely first.
        teacher_log_probs (`torch.Tensor` of shape `[tokens, k]`): Their log-probabilities at `temperature`.
        teacher_rest (`torch.Tensor` of shape `[tokens]`): Log of the teacher's remaining probability mass.
        labels (`torch.Tensor` of shape `[tokens]`): Next-token targets; `-100` rows are dropped before the loop.
        loss_type, temperature, beta, top_k, kd_weight, ce_weight, chunk_size, student_bias, student_softcap:
            As in [`fused_kd_loss`]; `top_k` must not exceed k.

    Returns:
        `tuple(torch.Tensor, torch.Tensor, torch.Tensor)`: the weighted loss sum (differentiable), and the KD and CE
        sums (detached, for logging).
    """
    options = KDLossOptions(loss_type, temperature, beta, top_k, kd_weight, ce_weight, chunk_size, student_softcap)
    teacher = (teacher_ids, teacher_log_probs, teacher_rest)
    return fused_topk_kd_loss_with_options(student_hidden, student_weight, *teacher, labels, options, student_bias)


def fused_topk_kd_loss_with_options(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    teacher_rest: torch.Tensor,
    labels: torch.Tensor,
    options: KDLossOptions,
    student_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[`fused_topk_kd_loss`] with its loss settings as one [`KDLossOptions`] (`teacher_softcap` is not used: the
    cached log-probabilities are those of the capped logits); same tensors and shapes, same return value."""
    if options.top_k is not None and options.top_k > teacher_ids.shape[-1]:
        raise ValueError(
            f"top_k={options.top_k} exceeds the {teacher_ids.shape[-1]} tokens cached per position: use top_k <= "
            f"{teacher_ids.shape[-1]}, or write the cache with a larger top_k."
        )
    teacher = (teacher_ids, teacher_log_probs, teacher_rest)
    return _apply_fused_to_labelled(
        _fused_topk_forward, student_hidden, student_weight, student_bias, labels, options, teacher_rows=teacher
    )


def fused_sampled_kd_loss_with_options(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    sample_ids: torch.Tensor,
    sample_counts: torch.Tensor,
    num_samples: int,
    teacher_entropy: torch.Tensor | None,
    labels: torch.Tensor,
    options: KDLossOptions,
    student_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KD (+ CE) loss from the student's final hidden states and a sampled teacher, chunk by chunk.

    Equal in value and gradient to `kd_weight * sampled_kd_loss(...) + ce_weight * cross_entropy(...)` on the full
    student logits, with only `[chunk_size, vocab]` logits at a time, like [`fused_kd_loss`]. Of the options only
    `temperature`, `kd_weight`, `ce_weight`, `chunk_size` and `student_softcap` apply: the loss is forward KL.

    Args:
        student_hidden (`torch.Tensor` of shape `[tokens, hidden]`): Post-norm final hidden states of the student.
        student_weight (`torch.Tensor` of shape `[vocab, hidden]`): Student `lm_head` weight.
        sample_ids, sample_counts (`torch.Tensor` of shape `[tokens, w]`), num_samples (`int`), teacher_entropy
            (`torch.Tensor` of shape `[tokens]`, *optional*): The sampled teacher, see [`sampled_kd_loss`].
        labels (`torch.Tensor` of shape `[tokens]`): Next-token targets; `-100` rows are dropped before the loop.
        options ([`KDLossOptions`]): The loss settings.
        student_bias (`torch.Tensor` of shape `[vocab]`, *optional*): The student's `lm_head` bias.

    Returns:
        `tuple(torch.Tensor, torch.Tensor, torch.Tensor)`: the weighted loss sum (differentiable), and the KD and CE
        sums (detached, for logging).
    """
    teacher = (sample_ids, sample_counts, teacher_entropy)
    return _apply_fused_to_labelled(
        _fused_sampled_forward,
        student_hidden,
        student_weight,
        student_bias,
        labels,
        options,
        teacher_rows=teacher,
        num_samples=num_samples,
    )
