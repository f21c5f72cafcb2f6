"""A real-weight hybrid Mamba2-attention model to measure hybrid pruning on, built from the embedded SmolLM2-135M.

No hybrid model ships on PyPI, and a randomly initialised one says nothing about which Mamba heads matter. So we
convert the embedded dense teacher (SmolLM2-135M-Instruct: Llama, hidden 576, 30 layers, 9 query / 3 KV heads of
dim 64, SwiGLU 1536, tied embeddings) into a stock transformers `BambaForCausalLM` (`bamba`, loaded by
`AutoModelForCausalLM` without remote code): every layer holds attention OR a Mamba2 mixer, then a SwiGLU MLP.

1. **Attention is kept where a mixer would miss most**: in the 10 of 30 layers (`num_attention_layers`) whose
   attention output is explained worst by the best affine map of each token's own input (`token_linear_error`,
   ridge least squares on the calibration tokens). A Mamba2 mixer can always do as well as such a map; what it
   cannot reproduce is the context the softmax gathers (layers 0, 1 and 24 of SmolLM2 leave a relative error of
   0.04-0.1, the middle layers 0.4-0.6). Everything else is copied: embeddings (tied), RMSNorms, all 30 MLPs and the
   kept attention. Bamba hard-codes `partial_rotary_factor=0.5` unless the RoPE parameters say otherwise, so the
   config carries SmolLM2's RoPE with `partial_rotary_factor=1.0`: its attention layers compute exactly SmolLM2's.
2. **Each other attention becomes a Mamba2 mixer initialised from its weights**, the map of "The Mamba in the Llama"
   (https://arxiv.org/abs/2408.15237, §3: linear attention is a Mamba2 with `C <- W_Q`, `B <- W_K`, `x <- W_V`,
   `out_proj <- W_O`). One B/C group per query head (`mamba_n_groups` = 9, `mamba_d_state` = head_dim 64): group
   `g` reads `C` from query head `g` and `B` from its KV head, as GQA repeats keys. `mamba_expand=2` gives 18 heads
   of 64 channels, two per group, both reading the value head of the group's KV head, with a fast and a slow decay
   (`time_steps`, dt of 0.5 and 0.05 with A = 1: e^-0.5 and e^-0.05 per token). With expand 2 the pruning targets of
   the benchmark stay valid Bamba shapes (heads x head_dim a multiple of the hidden size): 18 -> 9 heads, head_dim
   64 -> 32, hidden 576 -> 384.
3. **The non-linearities are put in their linear regimes**, because a Mamba2 mixer is not linear attention as it
   stands: the SiLU after the causal conv, and the gated RMSNorm over each group's channels before `out_proj`. The
   conv is the identity (last tap 1). Keys and queries are scaled to `kernel_scale` standard deviations, so
   `silu(C) . silu(B)` is close to a ReLU kernel (non-negative, as a softmax's scores are); values are scaled to one
   standard deviation and shifted by a conv bias `value_bias` = 10, where SiLU is the identity to 0.1%. The constant
   channel makes the scan carry the kernel's normaliser next to its output, `y = 10 S + sum_s M_ts v_s` with `S =
   sum_s M_ts`, and the group RMSNorm then divides by it: the normalised features are `1 + (sum_s M_ts v_s / S) / 10`
   (less their mean over the group), a normalised linear attention (a softmax's normalisation) plus a constant that
   `out_proj` turns into a bias. The gate `z` is one direction `u` in every row, fit so that `u . x = 1` on the
   calibration tokens (least squares; the minimum over SmolLM2's layers is 0.66): `silu(z)` is then a positive
   per-token scalar, which the RMSNorm cancels.
4. **`out_proj` by layer-wise distillation**: a ridge least-squares fit (shrunk towards the copy of `W_O`) so that
   the mixer's output takes the hybrid's residual stream to the dense model's after that attention, on the
   calibration tokens (`drift_correction=1`: the target is the dense residual after attention minus the hybrid's
   residual before the mixer, so each mixer also undoes what the layers before it got wrong; 0 would target the
   attention's output on the mixer's input alone).
5. **The kept projections are refit the same way** (`refit_projections`): every kept attention's `o_proj` and every
   MLP's `down_proj`, shrunk towards SmolLM2's weights (`projection_ridge`), towards the dense residual stream after
   them.

Steps 2-5 run layer by layer inside ONE forward pass of the hybrid over the calibration batch (pre-hooks fit each
projection from its actual input, so layer l is fit on the outputs of the already-converted layers 0..l-1), after
one pass of SmolLM2 for step 1 and the residual targets. There is no gradient training: on a shared 2-core CPU one
end-to-end distillation step costs tens of seconds, and the closed-form layer-wise fit costs about one forward pass.

Measured while designing the recipe (held-out loss on 8 validation samples of 256 tokens; SmolLM2: 2.93; 16
calibration samples unless said): attention kept in every third layer (2, 5, ..., 29) with only step 4 targeting the
attention output, 4.63; with `drift_correction` 1 (0.5), 4.27 (4.31); with step 5, 4.19 (`projection_ridge` 0.01:
4.73, 0.3: 4.20, 1: 4.33; a mixer ridge of 0.1 instead of 0.01: 4.23); with the layers of step 1, 4.06; with 32
calibration samples, 3.86. The time steps, `D` and `kernel_scale` moved a mixer's fit error by a few hundredths only,
and a gate carrying each token's input (a first-order linear term) did not help. The build writes the held-out
losses of SmolLM2, of the hybrid, of the hybrid without any fit (steps 1-3 alone: the mixers' copied `out_proj`,
SmolLM2's `o_proj` and `down_proj`), and of SmolLM2 with the replaced attention removed, to `build_info.json` next
to the weights, with a greedy continuation of a prompt by SmolLM2 and by the hybrid.

**Distilling it** (e.g. a pruned student in `benchmarks/hybrid_prune_quality.py`): the constant in the mixers'
`out_proj` input makes Adam's first, sign-like steps move every row of `out_proj` the same way, a shift of the residual
stream; 10 KD steps at LR 2e-5 took a student pruned to MLP 1024 from 4.83 to 6.46, and to 4.62 with the mixers'
`out_proj` frozen. Freeze it (or warm the LR up) for short runs.

[`embedded_hybrid_path`] builds the model once into `$HF_MINITRON_CACHE` (see `embedded.cache_dir`), written
atomically, and reuses it after; [`load_embedded_hybrid`] returns `(model, tokenizer)`.

One module, past 500 lines: the conversion is one recipe (attention to Mamba2 mixers, layer by layer), documented step
by step above; its steps are only meaningful in this order.
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
    validation_rows,
)
from .moe import ridge_solve


logger = logging.getLogger(__name__)

# The directory name carries the recipe: a change of recipe builds a new cache entry instead of reusing a stale one.
EMBEDDED_HYBRID_NAME = "smollm2-135m-instruct-bamba-a10-m18x64-g9-c128-fit-v1"
RECIPE = dict(
    num_attention_layers=10,
    attention_layers=None,
    mamba_expand=2,
    time_steps=[0.5, 0.05],
    decay_rate=1.0,
    value_bias=10.0,
    kernel_scale=3.0,
    gate_gain=4.0,
    ridge=1e-2,
    drift_correction=1.0,
    refit_projections=True,
    projection_ridge=1e-1,
    calibration_samples=32,
    seq_length=256,
    validation_samples=16,
    seed=0,
)
SAMPLE_PROMPT = "The for statement is used to iterate over"


# ---------------------------------------------------------------------------------------------- configuration
@torch.no_grad()
def token_linear_error(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-1) -> float:
    """Relative squared error of the best (ridge) affine map from each token's input `x` `[..., hidden]` alone to
    the attention output `y` `[..., hidden]`: how much of the attention a context-free map already explains."""
    x = x.reshape(-1, x.shape[-1]).float()
    y = y.reshape(-1, y.shape[-1]).float()
    features = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
    fitted = features @ ridge_solve(features, y, ridge).float()
    return ((fitted - y).pow(2).sum() / y.pow(2).sum()).item()


def select_attention_layers(errors: list[float], count: int) -> list[int]:
    """The `count` layers of largest `errors` (`token_linear_error`), in layer order: the attention to keep."""
    if not 0 <= count <= len(errors):
        raise ValueError(f"num_attention_layers={count} must be in [0, {len(errors)}] (the model's layers).")
    return sorted(torch.tensor(errors).argsort(descending=True, stable=True)[:count].tolist())


def hybrid_config(dense_config, attn_layer_indices: list[int], mamba_expand: int = 2):
    """The `BambaConfig` of the hybrid of a dense Llama config: the same attention, MLP, norms, RoPE and tied
    embeddings; Mamba2 mixers of `mamba_expand x hidden_size` channels in heads of the attention's head_dim, one
    B/C group per query head with a state of head_dim (the map of `mixer_from_attention`)."""
    from transformers import BambaConfig

    heads, hidden = dense_config.num_attention_heads, dense_config.hidden_size
    head_dim = getattr(dense_config, "head_dim", None) or hidden // heads
    if head_dim * heads != hidden:
        raise ValueError(
            f"head_dim={head_dim} x num_attention_heads={heads} != hidden_size={hidden}: bamba derives head_dim from "
            "hidden_size, so this attention cannot be copied."
        )
    if getattr(dense_config, "attention_bias", False) or getattr(dense_config, "mlp_bias", False):
        raise ValueError("The dense model has attention or MLP biases; the hybrid's Mamba2 map assumes none.")
    if mamba_expand < 1 or (mamba_expand * hidden) % (head_dim * heads):
        raise ValueError(f"mamba_expand={mamba_expand} must be a positive integer (heads per B/C group).")
    rope = {**dense_config.rope_parameters, "partial_rotary_factor": 1.0}  # Bamba's own default is 0.5
    return BambaConfig(
        vocab_size=dense_config.vocab_size,
        hidden_size=hidden,
        intermediate_size=dense_config.intermediate_size,
        num_hidden_layers=dense_config.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=dense_config.num_key_value_heads,
        hidden_act=dense_config.hidden_act,
        max_position_embeddings=dense_config.max_position_embeddings,
        rms_norm_eps=dense_config.rms_norm_eps,
        tie_word_embeddings=dense_config.tie_word_embeddings,
        rope_parameters=rope,
        attention_bias=False,
        mlp_bias=False,
        attn_layer_indices=list(attn_layer_indices),
        mamba_n_heads=mamba_expand * hidden // head_dim,
        mamba_d_head=head_dim,
        mamba_n_groups=heads,
        mamba_d_state=head_dim,
        mamba_expand=mamba_expand,
        mamba_d_conv=4,
        # The torch scan (no CUDA kernels) pads the sequence to a multiple of the chunk and builds chunk x chunk
        # decay matrices per head: at 128 a forward + backward of 2 x 128 tokens took 5.5 s here, at Bamba's 256, 21 s.
        mamba_chunk_size=128,
        mamba_conv_bias=True,
        mamba_proj_bias=False,
        bos_token_id=dense_config.bos_token_id,
        eos_token_id=dense_config.eos_token_id,
        pad_token_id=dense_config.pad_token_id,
    )


def hybrid_state_dict(dense_state_dict: dict, attn_layer_indices: list[int]) -> dict:
    """SmolLM2's tensors under Bamba's names: MLPs (`mlp` -> `feed_forward`), norms (`post_attention_layernorm` ->
    `pre_ff_layernorm`, `norm` -> `final_layernorm`), embeddings and the attention of `attn_layer_indices`."""
    kept = {f"model.layers.{i}.self_attn." for i in attn_layer_indices}
    renamed = {}
    for name, tensor in dense_state_dict.items():
        if ".self_attn." in name and not any(name.startswith(prefix) for prefix in kept):
            continue
        name = name.replace(".mlp.", ".feed_forward.").replace(".post_attention_layernorm.", ".pre_ff_layernorm.")
        renamed[name.replace("model.norm.", "model.final_layernorm.")] = tensor
    return renamed


# ---------------------------------------------------------------------------------------------- the map
def mixer_from_attention(
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    v_weight: torch.Tensor,
    num_heads: int,
    gate: torch.Tensor,
    value_scale: torch.Tensor,
    key_scale: torch.Tensor,
    query_scale: torch.Tensor,
) -> torch.Tensor:
    """The `in_proj` weight of a Mamba2 mixer that computes linear attention with the attention's projections
    ("The Mamba in the Llama", §3): `C` of group `g` is query head `g`, `B` its KV head's key, and every head of group
    `g` reads that KV head's value as its `x`.

    Args:
        q_weight (`torch.Tensor` of shape `[groups * head_dim, hidden]`), k_weight, v_weight (`torch.Tensor` of
            shape `[kv_heads * head_dim, hidden]`): the attention's projections; one B/C group per query head.
        num_heads (`int`): Mamba heads, a multiple of the groups (heads per group); each head has head_dim channels.
        gate (`torch.Tensor` of shape `[hidden]`): the row of every `z` channel.
        value_scale, key_scale (`torch.Tensor` of shape `[kv_heads]`), query_scale (`torch.Tensor` of shape
            `[groups]`): multipliers of each head's rows.

    Returns:
        `torch.Tensor` of shape `[2 * heads * head_dim + 2 * groups * head_dim + heads, hidden]`: the rows `[z, x, B,
        C, dt]` of Bamba's `in_proj`; the `dt` rows are zero (the time step is `dt_bias` alone).
    """
    hidden = q_weight.shape[1]
    kv_heads, head_dim = key_scale.numel(), k_weight.shape[0] // key_scale.numel()
    groups = q_weight.shape[0] // head_dim
    if num_heads % groups or groups % kv_heads:
        raise ValueError(
            f"num_heads={num_heads} must be a multiple of the {groups} query heads (B/C groups), themselves a "
            f"multiple of the {kv_heads} KV heads."
        )
    kv_of_group = torch.arange(groups) // (groups // kv_heads)
    q = q_weight.view(groups, head_dim, hidden) * query_scale.view(-1, 1, 1)
    k = (k_weight.view(kv_heads, head_dim, hidden) * key_scale.view(-1, 1, 1))[kv_of_group]
    v = (v_weight.view(kv_heads, head_dim, hidden) * value_scale.view(-1, 1, 1))[kv_of_group]
    x = v.repeat_interleave(num_heads // groups, dim=0)  # the heads of group g are consecutive
    z = gate.expand(num_heads * head_dim, hidden)
    dt = torch.zeros(num_heads, hidden, dtype=q.dtype)
    return torch.cat([z, x.reshape(-1, hidden), k.reshape(-1, hidden), q.reshape(-1, hidden), dt])


def copied_out_proj(
    o_weight: torch.Tensor, num_heads: int, head_dim: int, value_bias: float, value_scale: torch.Tensor
) -> torch.Tensor:
    """`out_proj` copied from `W_O` (the no-fit baseline, and the prior of the fit).

    The mixer's normalised features are `1 + (y_c - mean_c y) / value_bias` (module docstring, step 3), `y` the
    normalised linear attention of the values scaled by `value_scale`. So each head gets its query head's `W_O`
    columns times `value_bias / value_scale`, centred over the head's channels (the constant part gives no output),
    and divided among the heads of its group.

    Args:
        o_weight (`torch.Tensor` of shape `[hidden, groups * head_dim]`): the attention's output projection.
        num_heads (`int`): Mamba heads, a multiple of the groups (query heads).
        head_dim (`int`): the attention's (and the Mamba heads') head_dim.
        value_bias (`float`): the conv bias of the `x` channels.
        value_scale (`torch.Tensor` of shape `[kv_heads]`): the multiplier of each KV head's value rows.

    Returns:
        `torch.Tensor` of shape `[hidden, heads * head_dim]`.
    """
    hidden, groups = o_weight.shape[0], o_weight.shape[1] // head_dim
    per_group = num_heads // groups
    kv_of_group = torch.arange(groups) // (groups // value_scale.numel())
    columns = o_weight.view(hidden, groups, head_dim) * (value_bias / value_scale[kv_of_group]).view(1, -1, 1)
    columns = (columns - columns.mean(-1, keepdim=True)) / per_group
    return columns.repeat_interleave(per_group, dim=1).reshape(hidden, num_heads * head_dim)


# ---------------------------------------------------------------------------------------------- one layer
def causal_attention_output(attention, rotary_emb, x: torch.Tensor) -> torch.Tensor:
    """The output of a (Llama) attention block on its normalised input `x` `[batch, seq, hidden]`, causal."""
    positions = torch.arange(x.shape[1]).unsqueeze(0)
    mask = torch.full((x.shape[1], x.shape[1]), torch.finfo(x.dtype).min).triu(1)[None, None]
    return attention(hidden_states=x, position_embeddings=rotary_emb(x, positions), attention_mask=mask.to(x.dtype))[0]


def mixer_features(mixer, x: torch.Tensor) -> torch.Tensor:
    """The input of the mixer's `out_proj` (gated, normalised SSM output) on `x`, `[tokens, heads * head_dim]`."""
    captured = []
    handle = mixer.out_proj.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        mixer(x)
    finally:
        handle.remove()
    return captured[0].reshape(-1, captured[0].shape[-1]).float()


@torch.no_grad()
def init_mixer(mixer, attention, x: torch.Tensor, recipe: dict) -> torch.Tensor:
    """Fills a `BambaMixer` from `attention` (the map of `mixer_from_attention`, steps 2-3 of the module docstring),
    its scales measured on its input `x` `[batch, seq, hidden]`. Returns the copied `out_proj` (`copied_out_proj`),
    which it also loads."""
    num_heads, head_dim, hidden = mixer.num_heads, mixer.head_dim, mixer.hidden_size
    kv_heads = attention.k_proj.weight.shape[0] // head_dim
    tokens = x.reshape(-1, hidden).float()
    q_w, k_w, v_w = (p.weight.float() for p in (attention.q_proj, attention.k_proj, attention.v_proj))

    def spread(weight, heads):  # each head's standard deviation over tokens and channels
        return (tokens @ weight.T).view(-1, heads, head_dim).transpose(0, 1).reshape(heads, -1).std(dim=1)

    value_scale = 1 / spread(v_w, kv_heads)
    key_scale = recipe["kernel_scale"] / spread(k_w, kv_heads)
    query_scale = recipe["kernel_scale"] / spread(q_w, q_w.shape[0] // head_dim)
    # The gate: one direction with u . x = 1 on every token (least squares), so silu(z) is a positive scalar.
    gate = torch.linalg.lstsq(tokens.double(), torch.ones(tokens.shape[0], 1, dtype=torch.float64)).solution
    gate = recipe["gate_gain"] * gate.squeeze(1).float()
    in_proj = mixer_from_attention(q_w, k_w, v_w, num_heads, gate, value_scale, key_scale, query_scale)
    mixer.in_proj.weight.copy_(in_proj)
    mixer.conv1d.weight.zero_()
    mixer.conv1d.weight[:, 0, -1] = 1.0  # the identity: the causal conv's last tap is the current token
    mixer.conv1d.bias.zero_()
    mixer.conv1d.bias[: num_heads * head_dim] = recipe["value_bias"]
    steps = torch.tensor(recipe["time_steps"], dtype=torch.float32)
    steps = steps[torch.arange(num_heads) % len(steps)]  # the heads of a group cycle through the time steps
    mixer.dt_bias.copy_(torch.log(torch.expm1(steps)))  # softplus(dt_bias) = time step
    mixer.A_log.fill_(math.log(recipe["decay_rate"]))
    mixer.D.zero_()
    mixer.norm.weight.fill_(1.0)
    copied = copied_out_proj(attention.o_proj.weight.float(), num_heads, head_dim, recipe["value_bias"], value_scale)
    mixer.out_proj.weight.copy_(copied)
    return copied


@torch.no_grad()
def fit_out_proj(mixer, x: torch.Tensor, target: torch.Tensor, ridge: float, prior: torch.Tensor | None = None):
    """Refits the mixer's `out_proj` in closed form (`embedded_moe.ridge_solve`, shrunk towards `prior` `[hidden,
    heads * head_dim]`) so that the mixer's output on `x` reproduces `target` `[batch, seq, hidden]`. Returns the
    relative squared errors before and after."""
    features = mixer_features(mixer, x)
    target = target.reshape(-1, target.shape[-1]).float()
    before = features @ mixer.out_proj.weight.float().T
    weight = ridge_solve(features, target, ridge, prior=None if prior is None else prior.T).T.float()
    mixer.out_proj.weight.copy_(weight)
    energy = target.pow(2).sum()
    return {
        "relative_error_copied": ((before - target).pow(2).sum() / energy).item(),
        "relative_error": ((features @ weight.T - target).pow(2).sum() / energy).item(),
    }


# ---------------------------------------------------------------------------------------------- construction
@torch.no_grad()
def fit_projection(linear, features: torch.Tensor, target: torch.Tensor, ridge: float) -> dict:
    """Refits a bias-free `nn.Linear` in closed form, shrunk towards its weight, so that `linear(features)` reproduces
    `target` `[..., out]`. Returns the relative squared errors before and after."""
    features = features.reshape(-1, features.shape[-1]).float()
    target = target.reshape(-1, target.shape[-1]).float()
    old = linear.weight.detach().float().clone()  # `float()` of a float32 weight is the weight, refit in place below
    new = ridge_solve(features, target, ridge, prior=old.T).T.float()
    linear.weight.copy_(new)
    energy = target.pow(2).sum()
    return {
        "relative_error_before": ((features @ old.T - target).pow(2).sum() / energy).item(),
        "relative_error": ((features @ new.T - target).pow(2).sum() / energy).item(),
    }


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def convert_to_hybrid(dense, calibration_ids: torch.Tensor, **recipe):
    """Converts a dense Llama-style `dense` into a `BambaForCausalLM` (module docstring, steps 1-5), fitting it on
    `calibration_ids` `[batch, seq]` in one forward pass (plus one of `dense` for the residual targets).

    Args:
        dense (`PreTrainedModel`): a dense causal LM without attention or MLP biases, with `model.layers[i].self_attn`
            (`q_proj`, `k_proj`, `v_proj`, `o_proj`), `model.rotary_emb` and `hidden_size = heads x head_dim`.
        calibration_ids (`torch.LongTensor` of shape `[batch, seq]`): packed calibration tokens (no padding).
        recipe: overrides of `RECIPE` (`num_attention_layers`, `attention_layers`, `mamba_expand`, `time_steps`,
            `decay_rate`, `value_bias`, `kernel_scale`, `gate_gain`, `ridge`, `drift_correction`,
            `refit_projections`, `projection_ridge`).

    Returns:
        `(model, copied, stats)`: the hybrid in eval mode, the copied `out_proj` of every Mamba layer (`{layer:
        weight}`, for the no-fit baseline) and fit statistics (`token_linear_error` of every layer's attention when
        the layers were selected, then one entry per fitted projection).
    """
    from transformers import BambaForCausalLM

    unknown = set(recipe) - set(RECIPE)
    if unknown:
        raise ValueError(f"Unknown recipe keys {sorted(unknown)}: use {sorted(RECIPE)}.")
    recipe = {**RECIPE, **recipe}
    drift, refit = recipe["drift_correction"], recipe["refit_projections"]

    # One pass of the dense model: how well a context-free map explains each attention (step 1), and the dense
    # residual stream after each attention (`mid`) and each layer (`out`) on the dense model's own trajectory, the
    # targets that pull the hybrid's residual stream back to the dense one (steps 4-5).
    dense_stream, linear_errors, hooks = {}, {}, []

    def measure(index):
        def hook(attention, args, kwargs, output):
            linear_errors[index] = token_linear_error(kwargs["hidden_states"], output[0])

        return hook

    for i, layer in enumerate(dense.model.layers):
        if recipe["attention_layers"] is None:
            hooks.append(layer.self_attn.register_forward_hook(measure(i), with_kwargs=True))
        if drift or refit:
            hooks.append(
                layer.post_attention_layernorm.register_forward_pre_hook(
                    lambda module, args, i=i: dense_stream.__setitem__(("mid", i), args[0])
                )
            )
        if refit:
            hooks.append(
                layer.register_forward_hook(
                    lambda module, args, output, i=i: dense_stream.__setitem__(("out", i), _first(output))
                )
            )
    try:
        if hooks:
            dense.model(input_ids=calibration_ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    layers = recipe["attention_layers"]
    if layers is None:
        errors = [linear_errors[i] for i in range(dense.config.num_hidden_layers)]
        layers = select_attention_layers(errors, recipe["num_attention_layers"])

    config = hybrid_config(dense.config, layers, recipe["mamba_expand"])
    model = BambaForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(hybrid_state_dict(dense.state_dict(), layers), strict=False)
    if unexpected or any(".mamba." not in k for k in missing if k != "lm_head.weight"):
        raise RuntimeError(
            f"Copying {type(dense).__name__} into {type(model).__name__} failed: {missing=}, {unexpected=}"
        )
    mamba_layers = [i for i, kind in enumerate(config.layers_block_type) if kind == "linear_attention"]

    copied, stream, hooks = {}, {}, []
    stats = [{"layer": i, "token_linear_error": e} for i, e in sorted(linear_errors.items())]

    def record(key):
        def pre_hook(module, args, kwargs):
            stream[key] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        return pre_hook

    def fit_mixer(index):
        def pre_hook(mixer, args, kwargs):
            hooks[mixer_hooks[index]].remove()  # the fit runs the mixer again, which must not refit it
            started = time.perf_counter()
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            attention = dense.model.layers[index].self_attn
            copied[index] = init_mixer(mixer, attention, x, recipe)
            target = causal_attention_output(attention, dense.model.rotary_emb, x)
            if drift:
                target = target + drift * (dense_stream.pop(("mid", index)) - stream.pop(("in", index)) - target)
            errors = fit_out_proj(mixer, x, target, recipe["ridge"], prior=copied[index])
            stats.append(errors | {"layer": index, "seconds": round(time.perf_counter() - started, 2)})
            logger.info("Mamba layer %d: %s", index, stats[-1])

        return pre_hook

    def fit_output(index, name, residual, dense_key):
        def pre_hook(linear, args):
            target = dense_stream.pop((dense_key, index)) - stream.pop((residual, index))
            errors = fit_projection(linear, args[0], target, recipe["projection_ridge"])
            logger.info("Layer %d %s: %s", index, name, errors)
            stats.append({f"{name}_{k}": v for k, v in errors.items()} | {"layer": index})

        return pre_hook

    mixer_hooks = {}
    for i, layer in enumerate(model.model.layers):
        if (i in mamba_layers and drift) or (i not in mamba_layers and refit):
            hooks.append(layer.register_forward_pre_hook(record(("in", i)), with_kwargs=True))
        if i in mamba_layers:
            mixer_hooks[i] = len(hooks)
            hooks.append(layer.mamba.register_forward_pre_hook(fit_mixer(i), with_kwargs=True))
        elif refit:
            hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(fit_output(i, "o_proj", "in", "mid")))
        if refit:
            hooks.append(layer.pre_ff_layernorm.register_forward_pre_hook(record(("mid", i)), with_kwargs=True))
            down_proj = layer.feed_forward.down_proj
            hooks.append(down_proj.register_forward_pre_hook(fit_output(i, "down_proj", "mid", "out")))
    try:
        model.model(input_ids=calibration_ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return model, copied, stats


class _swapped_weights:
    """Context manager: the weights of some linear layers of `model` replaced by `weights` (`{module name:
    weight}`), restored on exit."""

    def __init__(self, model, weights: dict):
        self.model, self.weights, self.saved = model, weights, {}

    def __enter__(self):
        for name, weight in self.weights.items():
            linear = self.model.get_submodule(name)
            self.saved[name] = linear.weight.detach().clone()
            linear.weight.data.copy_(weight)

    def __exit__(self, *exc):
        for name, weight in self.saved.items():
            self.model.get_submodule(name).weight.data.copy_(weight)


def _unfitted_weights(model, dense, copied: dict) -> dict:
    """The weights of the hybrid without any fit: the mixers' copied `out_proj` and SmolLM2's own `o_proj` and
    `down_proj` (the Mamba in the Llama's initialisation alone)."""
    weights = {f"model.layers.{i}.mamba.out_proj": weight for i, weight in copied.items()}
    for i, layer in enumerate(model.model.layers):
        if layer.block_type == "full_attention":
            weights[f"model.layers.{i}.self_attn.o_proj"] = dense.model.layers[i].self_attn.o_proj.weight
        weights[f"model.layers.{i}.feed_forward.down_proj"] = dense.model.layers[i].mlp.down_proj.weight
    return weights


def _loss_without_attention(dense, layers: list[int], validation: list[dict]) -> float:
    """SmolLM2's held-out loss with the attention of `layers` removed (its output zeroed): what the mixers replace."""
    from ..evaluation import lm_loss

    def zero(module, args, output):
        return (torch.zeros_like(output[0]),) + tuple(output[1:])

    handles = [dense.model.layers[i].self_attn.register_forward_hook(zero) for i in layers]
    try:
        return lm_loss(dense, validation)
    finally:
        for handle in handles:
            handle.remove()


def _greedy(model, tokenizer, prompt: str, tokens: int = 24) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def evaluate_conversion(info: dict, inputs: dict, model, name: str, unfitted: dict, replaced: list | None = None):
    """Adds to a conversion's build `info` (see `embedded.conversion_info`) its held-out losses on the recipe's
    `validation_samples`: uniform, SmolLM2's, the converted model's (`<name>_loss`), the converted model's with the
    `unfitted` weights (`{module name: weight}`) swapped in, and SmolLM2's without the attention of the `replaced`
    layers when given; greedy continuations of `SAMPLE_PROMPT` by both, and the time it took."""
    from ..evaluation import lm_loss

    started = time.perf_counter()
    dense, tokenizer = inputs["dense"], inputs["tokenizer"]
    validation = validation_rows(inputs["data"]["validation"], inputs["recipe"]["validation_samples"])
    info["validation_tokens"] = sum(len(v["input_ids"]) for v in validation)
    info["uniform_loss"] = math.log(model.config.vocab_size)
    info["teacher_loss"] = lm_loss(dense, validation)
    info[f"{name}_loss"] = lm_loss(model, validation)
    with _swapped_weights(model, unfitted):
        info["unfitted_loss"] = lm_loss(model, validation)
    if replaced is not None:
        info["attention_removed_loss"] = _loss_without_attention(dense, sorted(replaced), validation)
    info["sample"] = {
        "prompt": SAMPLE_PROMPT,
        "teacher": _greedy(dense, tokenizer, SAMPLE_PROMPT),
        name: _greedy(model, tokenizer, SAMPLE_PROMPT),
    }
    info["eval_seconds"] = round(time.perf_counter() - started, 1)


def build_embedded_hybrid(output_dir: str | Path, validation_samples: int | None = None, **recipe) -> dict:
    """Builds the hybrid SmolLM2 (module docstring) into `output_dir` (written atomically) and returns its build
    info (recipe, timings, per-layer fit errors, held-out losses of SmolLM2, of the hybrid, of the hybrid without
    any fit and of SmolLM2 without the replaced attention; greedy continuations of a prompt).

    Args:
        output_dir (`str` or `Path`): where to write the checkpoint, its tokenizer and `build_info.json`.
        validation_samples (`int`, *optional*): held-out samples for the losses (`RECIPE["validation_samples"]`);
            0 skips the evaluation.
        recipe: overrides of `RECIPE`.
    """
    inputs = conversion_inputs(RECIPE, recipe, validation_samples)
    recipe, started, dense, tokenizer = (inputs[k] for k in ("recipe", "started", "dense", "tokenizer"))
    model, copied, stats = convert_to_hybrid(dense, inputs["calibration"], **inputs["fit"])
    model.config.name_or_path = "hf-minitron/smollm2-135m-instruct-bamba"
    build_seconds = time.perf_counter() - started

    info = conversion_info(
        inputs,
        model,
        build_seconds,
        stats,
        attention_layers=model.config.attn_layer_indices,
    )
    if recipe["validation_samples"]:
        evaluate_conversion(info, inputs, model, "hybrid", _unfitted_weights(model, dense, copied), replaced=copied)
    dense = inputs["dense"] = None  # frees the dense teacher before the save
    save_derived(output_dir, model, tokenizer, info)
    return info


def embedded_hybrid_path() -> Path:
    """Path of the cached hybrid SmolLM2 checkpoint, built on first use (minutes on a CPU; see `build_info.json`)."""
    return derived_path(EMBEDDED_HYBRID_NAME, build_embedded_hybrid, "hybrid model")


def load_embedded_hybrid(**kwargs):
    """`(model, tokenizer)` of the embedded hybrid: a stock `BambaForCausalLM` converted from SmolLM2-135M-Instruct
    (attention in 10 of its 30 layers, Mamba2 mixers of 18 heads x 64 in 9 B/C groups in the others; module
    docstring)."""
    return load_checkpoint(embedded_hybrid_path(), **kwargs)


def embedded_hybrid_info() -> dict:
    """The `build_info.json` of the cached embedded hybrid (building it if needed)."""
    return read_build_info(embedded_hybrid_path())
