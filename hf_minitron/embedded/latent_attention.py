"""A real-weight multi-head latent attention (MLA) model to measure MLA pruning on, built from the embedded SmolLM2.

No model with multi-head latent attention ships small on PyPI, and a randomly initialised one says nothing about
which MLA heads or latent channels matter. So we convert the embedded dense teacher (SmolLM2-135M-Instruct: Llama,
hidden 576, 30 layers, 9 query / 3 KV heads of dim 64 with RoPE on all 64 dims, SwiGLU 1536, tied embeddings) into a
stock transformers `DeepseekV3ForCausalLM` (`deepseek_v3`, loaded by `AutoModelForCausalLM` without remote code) with
every layer dense (`first_k_dense_replace` = 30): embeddings, norms and the 30 MLPs are copied, and each attention
becomes MLA with 9 heads, each a position-free key/query of `qk_nope_head_dim` = 64, a rotary one of
`qk_rope_head_dim` = 64 (DeepSeek-V3's rotary dims set its RoPE frequencies, so only 64 gives SmolLM2's; rotate-half
layout, `rope_interleave=False`) and a value of `v_head_dim` = 64.

MLA cannot hold grouped-query attention with RoPE on every dim exactly: its rotary key is ONE key shared by all
heads, and its position-free part sees no position. The map:

1. **One pass of SmolLM2** over the calibration tokens gives the second moment of every attention's input (steps
   2-3) and the dense residual stream after every attention and MLP (step 4).
2. **The rotary key is the best rank-1 summary of the KV heads' keys, per RoPE frequency** (`split_rope`). RoPE
   multiplies each pair of dims `(j, j + 32)`, read as a complex number, by `e^{i theta_j pos}`, so a score is
   `sum_j Re(q_j conj(k_j) e^{i theta_j (t - s)})`. Per frequency, the 3 KV heads' keys `k_gj(x)` are summarised by one
   `u_j(x)` with `k_gj ~ lambda_gj u_j`: the top eigenvector of their 3 x 3 covariance, each KV head weighted by the
   query energy that reads it. Each query head's rotary query is its own pair times `conj(lambda_gj)`, so the part of
   every key on `u_j` keeps its rotation exactly. The residual `k_gj - lambda_gj u_j` becomes the position-free key
   (with the query head's own 64 dims as the position-free query): exact at distance 0, unrotated elsewhere. The
   queries carry `sqrt(2)`: MLA divides the scores by `sqrt(128)`, SmolLM2 by `sqrt(64)`.
3. **The latents are exact at full rank** (`latent_projections`). MLA normalises each latent by its RMS before the
   up-projection, a per-token scale that no linear map undoes. The attention's input is itself an RMSNorm's output,
   `x = w * h / rms(h)`, so `x / w` has an RMS of exactly 1 (up to the norm's eps), and so has any rotation of it: at
   `kv_lora_rank` = `q_lora_rank` = 576 the latents are `x / w` in the basis of the right singular vectors of the
   map they feed, in order of gain: the 9 heads' position-free keys and values (1152 rows of rank 320: the 3 KV
   heads' key residuals of step 2 span two of three complex dims per frequency, 128 real dims, plus 192 of values),
   and the 9 heads' queries (1152 rows of rank up to 576). The up-projections are the map in that basis; the latent
   norms' weights are 1. The key/value latent's last 256 channels are the map's null space: they carry nothing but
   keep the RMS exact. Below 576 (`RECIPE` overrides) the latent is the whitened top principal components of the
   map's output, its up-projection scaled by the latent's mean RMS, then refit (step 4).
4. **Layer-wise closed-form fits** in ONE forward pass of the MLA model (pre-hooks fit each projection on its actual
   input, layer by layer, as `embedded.hybrid` does): below full rank, each latent's up-projection towards the map's
   keys/values or queries on that layer's input (`latent_ridge`); then every `o_proj` and every MLP's `down_proj`, by
   ridge least squares shrunk towards SmolLM2's weights (`projection_ridge`), towards the dense residual stream after
   them (`refit_projections`), so each layer also undoes the error of the layers before it.

There is no gradient training.

Measured while designing the recipe (held-out loss on 8 validation samples of 256 tokens, 16 calibration samples;
SmolLM2: 2.926): full-rank key/value latent, queries straight from the hidden size (`q_lora_rank=None`), 2.977 (3.038
without step 4); the same without the keys' residual as position-free key (`residual_in_nope=False`: the part of the
keys off the rotary key dropped), 3.976 (4.289); both latents at rank 384 (whitened principal components, refit),
3.273, and 9.572 without step 4: the latent RMSNorm's per-token scale is what a low-rank latent cannot absorb. The
rotary key carries 84% of the query-weighted key energy (mean over layers and frequencies, 78-89% per layer;
`build_info.json` has it per layer and frequency). The built recipe (both latents at 576, 32 calibration samples)
on 16 validation samples of 256 tokens: SmolLM2 2.884, the MLA model 2.920, without step 4 3.012; the greedy
continuations of a prompt by both are in `build_info.json`. Pruning it: `benchmarks/mla_prune_quality.py`, whose
results (`docs/moe.md`) show that halving `kv_lora_rank` of THIS model fails every estimator: 256 of the key/value
latent's 576 channels are the null space of step 3, which the activation score cannot tell from the rest.

What this model is not: a compression of SmolLM2. Its key/value cache is 576 + 64 = 640 values per token and layer
against SmolLM2's 2 x 3 x 64 = 384, and its latents add 44M parameters (179M in all): full rank is what makes the
latents exact. It is a real-weight MLA model whose heads and latent channels carry SmolLM2's attention, to measure
pruning them (`benchmarks/mla_prune_quality.py`; halving `kv_lora_rank` brings the cache to 352).

[`embedded_mla_path`] builds the model once into `$HF_MINITRON_CACHE` (see `embedded.cache_dir`), written
atomically, and reuses it after; [`load_embedded_mla`] returns `(model, tokenizer)`.

One module, past 500 lines: the conversion is one recipe (attention to MLA, layer by layer), documented step by step
above; its steps are only meaningful in this order.
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
from .hybrid import evaluate_conversion, fit_projection


logger = logging.getLogger(__name__)

# The directory name carries the recipe: a change of recipe builds a new cache entry instead of reusing a stale one.
EMBEDDED_MLA_NAME = "smollm2-135m-instruct-mla-kv576-q576-fit-v1"
RECIPE = dict(
    kv_lora_rank=576,
    q_lora_rank=576,
    residual_in_nope=True,
    latent_ridge=1e-3,
    refit_projections=True,
    projection_ridge=1e-1,
    calibration_samples=32,
    seq_length=256,
    validation_samples=16,
    seed=0,
)


# ---------------------------------------------------------------------------------------------- configuration
def mla_config(dense_config, kv_lora_rank: int, q_lora_rank: int | None):
    """The `DeepseekV3Config` of the MLA version of a dense Llama config: every layer dense (`first_k_dense_replace`
    = the layer count, so the MLPs are copied), one head per query head with a key of `qk_nope_head_dim` +
    `qk_rope_head_dim` = head_dim + head_dim and a value of head_dim, SmolLM2's RoPE on the rotary half
    (`rope_interleave=False`: Llama's rotate-half layout), its norms and tied embeddings."""
    from transformers import DeepseekV3Config

    heads, hidden = dense_config.num_attention_heads, dense_config.hidden_size
    head_dim = getattr(dense_config, "head_dim", None) or hidden // heads
    if getattr(dense_config, "attention_bias", False) or getattr(dense_config, "mlp_bias", False):
        raise ValueError("The dense model has attention or MLP biases; the MLA map assumes none.")
    if heads % dense_config.num_key_value_heads:
        raise ValueError(f"num_attention_heads={heads} must be a multiple of num_key_value_heads.")
    rope = dict(dense_config.rope_parameters)
    if rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"Only a default RoPE on the full head dim can be mapped; got rope_parameters={rope}.")
    return DeepseekV3Config(
        vocab_size=dense_config.vocab_size,
        hidden_size=hidden,
        intermediate_size=dense_config.intermediate_size,
        num_hidden_layers=dense_config.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,  # MLA: every head its own key and value
        q_lora_rank=q_lora_rank,
        kv_lora_rank=kv_lora_rank,
        # The rotary dims set the RoPE frequencies (`head_dim = qk_rope_head_dim` in DeepseekV3Config): only the
        # dense head_dim gives SmolLM2's.
        qk_rope_head_dim=head_dim,
        qk_nope_head_dim=head_dim,
        v_head_dim=head_dim,
        first_k_dense_replace=dense_config.num_hidden_layers,
        # No MoE layer is built; the router fields only have to be consistent.
        n_routed_experts=1,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=1,
        n_shared_experts=1,
        moe_intermediate_size=dense_config.intermediate_size,
        hidden_act=dense_config.hidden_act,
        max_position_embeddings=dense_config.max_position_embeddings,
        rms_norm_eps=dense_config.rms_norm_eps,
        tie_word_embeddings=dense_config.tie_word_embeddings,
        rope_parameters=rope,
        rope_interleave=False,
        attention_bias=False,
        bos_token_id=dense_config.bos_token_id,
        eos_token_id=dense_config.eos_token_id,
        pad_token_id=dense_config.pad_token_id,
    )


# ---------------------------------------------------------------------------------------------- the map
def _complex_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """`[heads * head_dim, hidden]` rows in RoPE's rotate-half layout -> `[heads, head_dim / 2, hidden]` complex rows:
    pair `j` is dims `j` (real) and `j + head_dim / 2` (imaginary), which RoPE multiplies by `e^{i theta_j pos}`."""
    w = weight.double().view(heads, -1, weight.shape[-1])
    half = w.shape[1] // 2
    return torch.complex(w[:, :half], w[:, half:])


def _real_rows(rows: torch.Tensor) -> torch.Tensor:
    """The inverse of `_complex_rows`: `[heads, half, hidden]` complex -> `[heads * 2 * half, hidden]` real."""
    return torch.cat([rows.real, rows.imag], dim=1).reshape(-1, rows.shape[-1])


@torch.no_grad()
def split_rope(q: torch.Tensor, k: torch.Tensor, x_cov: torch.Tensor, residual_in_nope: bool = True):
    """Splits grouped-query attention with RoPE on every dim into MLA's rotary part (one key shared by all heads) and
    its position-free part (module docstring, step 2).

    Per RoPE frequency `j`, the keys of the KV heads are complex linear functions `k_gj(x)`; the shared rotary key is
    their best weighted rank-1 summary `k_gj ~ lambda_gj u_j(x)` (the top eigenvector of the keys' `kv x kv`
    covariance, each KV head weighted by the query energy that reads it), and each query head's rotary query is its
    own pair times `conj(lambda_gj)`: the scores are then exact for the part of the keys on `u_j`, at every distance.
    The rest, `k_gj - lambda_gj u_j`, becomes the position-free key (exact at distance 0) when `residual_in_nope`,
    else zero.

    Args:
        q (`torch.Tensor` of shape `[heads, head_dim / 2, hidden]`), k (`torch.Tensor` of shape `[kv_heads,
            head_dim / 2, hidden]`): the query and key projections as complex rows (`_complex_rows`).
        x_cov (`torch.Tensor` of shape `[hidden, hidden]`): the second moment of the attention's input.
        residual_in_nope (`bool`): keep the keys' residual as the position-free key.

    Returns:
        `(q_rope, k_rope, k_nope, captured)` as complex rows: the rotary queries `[heads, half, hidden]`, the shared
        rotary key `[1, half, hidden]`, the position-free keys `[kv_heads, half, hidden]` (the position-free queries
        are `q` itself), and the share of the weighted key energy the shared key carries per frequency `[half]`.
    """
    heads, kv_heads = q.shape[0], k.shape[0]
    group = torch.arange(heads) // (heads // kv_heads)
    cov = x_cov.double().to(torch.complex128)
    # E[k_g conj(k_g')] per frequency: [half, kv, kv]; E|q_hj|^2: [heads, half].
    key_cov = torch.einsum("gjd,de,hje->jgh", k, cov, k.conj())
    query_energy = torch.einsum("hjd,de,hje->hj", q, cov, q.conj()).real
    weight = torch.zeros(kv_heads, q.shape[1], dtype=torch.float64).index_add_(0, group, query_energy)
    weight = weight.clamp_min(1e-12 * weight.max()).sqrt().T  # [half, kv]
    weighted = weight[:, :, None] * key_cov * weight[:, None, :]
    values, vectors = torch.linalg.eigh(weighted)
    top = vectors[..., -1]  # [half, kv]
    coefficients = top.conj() * weight  # u_j = sum_g c_gj k_gj
    shared = torch.einsum("jg,gjd->jd", coefficients, k)  # [half, hidden]
    scale = (top / weight).T  # lambda_gj: [kv, half]
    residual = k - scale[:, :, None] * shared[None]
    captured = values[:, -1] / values.sum(-1).clamp_min(1e-30)
    q_rope = q * scale.conj()[group][:, :, None]
    k_nope = residual if residual_in_nope else torch.zeros_like(residual)
    return q_rope, shared[None], k_nope, captured


@torch.no_grad()
def latent_projections(target: torch.Tensor, norm_weight: torch.Tensor, x_cov: torch.Tensor, rank: int):
    """The down- and up-projection of a latent of `rank` channels that reproduces `target @ x` through MLA's RMSNorm
    on the latent (module docstring, step 3).

    At `rank >= hidden` the latent is the attention's input with the layer's input-norm weight divided out (the
    RMS-normalised residual stream, whose RMS is 1) rotated into the right singular vectors of the map, in order of
    gain: a rotation keeps the RMS at 1, so the latent norm changes nothing and the map is exact.
    Below, the latent is the whitened top-`rank` principal components of `target @ x` (equal variances, so its RMS is
    an average over all of them), and the up-projection their loadings times the latent's mean RMS.

    Args:
        target (`torch.Tensor` of shape `[out, hidden]`): the map to reproduce (keys and values, or queries).
        norm_weight (`torch.Tensor` of shape `[hidden]`): the weight of the layer's input RMSNorm.
        x_cov (`torch.Tensor` of shape `[hidden, hidden]`): the second moment of the attention's input.
        rank (`int`): the latent's channels.

    Returns:
        `(down, up)`: `[rank, hidden]` and `[out, rank]`, float32.
    """
    hidden = target.shape[1]
    if rank >= hidden:
        if rank > hidden:
            raise ValueError(f"A latent rank of {rank} above the hidden size {hidden} has nothing to add.")
        mapped = target.double() * norm_weight.double()  # the map from the normalised stream
        basis = torch.linalg.svd(mapped, full_matrices=True).Vh  # orthogonal: the latent's RMS stays 1
        return (basis / norm_weight.double()).float(), (mapped @ basis.T).float()
    out_cov = target.double() @ x_cov.double() @ target.double().T
    values, vectors = torch.linalg.eigh(out_cov)
    values, vectors = values.flip(0)[:rank].clamp_min(1e-12), vectors.flip(1)[:, :rank]
    down = (vectors / values.sqrt()).T @ target.double()  # whitened components: unit second moment each
    up = vectors * values.sqrt()  # target @ x = up @ (down @ x) on the component space
    return down.float(), up.float()


def _mean_rms(down: torch.Tensor, x_cov: torch.Tensor) -> float:
    """sqrt(E[mean of (down @ x)^2]): the latent's typical RMS, by which its norm divides."""
    return math.sqrt((down.double() @ x_cov.double() @ down.double().T).diagonal().mean().clamp_min(1e-30).item())


@torch.no_grad()
def attention_weights(attention, norm_weight: torch.Tensor, x_cov: torch.Tensor, config, residual_in_nope=True):
    """The MLA weights of one Llama attention (module docstring, steps 2-3): `{name: weight}` under
    `DeepseekV3Attention`'s parameter names, and the share of key energy carried by the rotary key."""
    heads, kv_heads = config.num_attention_heads, attention.k_proj.out_features // config.v_head_dim
    head_dim = config.v_head_dim
    group = torch.arange(heads) // (heads // kv_heads)
    q = _complex_rows(attention.q_proj.weight, heads)
    k = _complex_rows(attention.k_proj.weight, kv_heads)
    q_rope, k_rope, k_nope, captured = split_rope(q, k, x_cov, residual_in_nope)
    # MLA scales the scores by 1 / sqrt(nope + rope dims); the dense model by 1 / sqrt(head_dim).
    gain = math.sqrt((config.qk_nope_head_dim + config.qk_rope_head_dim) / head_dim)
    q_rows = torch.cat([_real_rows(q).view(heads, head_dim, -1), _real_rows(q_rope).view(heads, head_dim, -1)], 1)
    q_rows = (q_rows * gain).reshape(heads * 2 * head_dim, -1)
    v = attention.v_proj.weight.double().view(kv_heads, head_dim, -1)
    kv_rows = torch.cat([_real_rows(k_nope).view(kv_heads, head_dim, -1), v], 1)[group].reshape(-1, v.shape[-1])
    weights = {"o_proj.weight": attention.o_proj.weight.float().clone()}
    kv_down, kv_up = latent_projections(kv_rows, norm_weight, x_cov, config.kv_lora_rank)
    kv_up = kv_up * _mean_rms(kv_down, x_cov) if config.kv_lora_rank < kv_rows.shape[1] else kv_up
    weights["kv_a_proj_with_mqa.weight"] = torch.cat([kv_down, _real_rows(k_rope).float()])
    weights["kv_b_proj.weight"] = kv_up
    weights["kv_a_layernorm.weight"] = torch.ones(config.kv_lora_rank)
    if config.q_lora_rank is None:
        weights["q_proj.weight"] = q_rows.float()
    else:
        q_down, q_up = latent_projections(q_rows, norm_weight, x_cov, config.q_lora_rank)
        q_up = q_up * _mean_rms(q_down, x_cov) if config.q_lora_rank < q_rows.shape[1] else q_up
        weights |= {"q_a_proj.weight": q_down, "q_b_proj.weight": q_up}
        weights["q_a_layernorm.weight"] = torch.ones(config.q_lora_rank)
    targets = {"kv_b_proj": kv_rows.float(), "q_b_proj": q_rows.float()}
    return weights, targets, captured


def mla_state_dict(dense_state_dict: dict) -> dict:
    """SmolLM2's tensors that DeepSeek-V3 names alike (embeddings, norms, MLPs); its attention is mapped apart."""
    return {name: tensor for name, tensor in dense_state_dict.items() if ".self_attn." not in name}


# ---------------------------------------------------------------------------------------------- construction
def _first(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def convert_to_mla(dense, calibration_ids: torch.Tensor, **recipe):
    """Converts a dense Llama-style `dense` into a `DeepseekV3ForCausalLM` with multi-head latent attention (module
    docstring, steps 1-4), fitting it on `calibration_ids` `[batch, seq]` in one forward pass (plus one of `dense`
    for the input moments and the residual targets).

    Args:
        dense (`PreTrainedModel`): a dense causal LM without attention or MLP biases, with `model.layers[i].self_attn`
            (`q_proj`, `k_proj`, `v_proj`, `o_proj`), `input_layernorm` and a default RoPE on the full head dim.
        calibration_ids (`torch.LongTensor` of shape `[batch, seq]`): packed calibration tokens (no padding).
        recipe: overrides of `RECIPE` (`kv_lora_rank`, `q_lora_rank`, `residual_in_nope`, `latent_ridge`,
            `refit_projections`, `projection_ridge`).

    Returns:
        `(model, unfitted, stats)`: the MLA model in eval mode, the weights before any fit (`{module name: weight}`,
        for the no-fit baseline) and statistics (per layer, the share of key energy on the rotary key, then one entry
        per fitted projection).
    """
    from transformers import DeepseekV3ForCausalLM

    fit_keys = {"kv_lora_rank", "q_lora_rank", "residual_in_nope", "latent_ridge", "refit_projections"}
    fit_keys |= {"projection_ridge"}
    unknown = set(recipe) - fit_keys
    if unknown:
        raise ValueError(f"Unknown recipe keys {sorted(unknown)}: use {sorted(fit_keys)}.")
    recipe = {**{k: RECIPE[k] for k in fit_keys}, **recipe}
    refit = recipe["refit_projections"]
    config = mla_config(dense.config, recipe["kv_lora_rank"], recipe["q_lora_rank"])
    hidden = config.hidden_size

    # One pass of the dense model: the second moment of every attention's input (steps 2-3), and the dense residual
    # stream after each attention (`mid`) and each layer (`out`), the targets of step 4.
    moments, dense_stream, hooks = {}, {}, []

    def moment(index):
        def pre_hook(attention, args, kwargs):
            x = kwargs["hidden_states"].reshape(-1, hidden).double()
            moments[index] = x.T @ x / x.shape[0]

        return pre_hook

    for i, layer in enumerate(dense.model.layers):
        hooks.append(layer.self_attn.register_forward_pre_hook(moment(i), with_kwargs=True))
        if refit:
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

    model = DeepseekV3ForCausalLM(config).eval()
    state = mla_state_dict(dense.state_dict())
    stats, targets = [], {}
    for i, layer in enumerate(dense.model.layers):
        weights, targets[i], captured = attention_weights(
            layer.self_attn, layer.input_layernorm.weight, moments[i], config, recipe["residual_in_nope"]
        )
        state |= {f"model.layers.{i}.self_attn.{name}": w for name, w in weights.items()}
        stats.append({"layer": i, "rope_captured": [round(c, 4) for c in captured.tolist()]})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise RuntimeError(
            f"Copying {type(dense).__name__} into {type(model).__name__} failed: {missing=}, {unexpected=}"
        )
    model.tie_weights()
    unfitted = {}
    inputs, stream, hooks = {}, {}, []

    def record(store, key):
        def pre_hook(module, args, kwargs):
            store[key] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        return pre_hook

    def fit_latent(index, name, ridge):
        def pre_hook(linear, args):
            x = inputs.pop((name, index))
            target = x.reshape(-1, hidden).float() @ targets[index][name].T
            unfitted[f"model.layers.{index}.self_attn.{name}"] = linear.weight.detach().clone()
            errors = fit_projection(linear, args[0], target, ridge)
            stats.append({f"{name}_{k}": v for k, v in errors.items()} | {"layer": index})
            logger.info("Layer %d %s: %s", index, name, errors)

        return pre_hook

    def fit_output(index, name, residual, dense_key):
        def pre_hook(linear, args):
            target = dense_stream.pop((dense_key, index)) - stream.pop((residual, index))
            unfitted[f"model.layers.{index}.{name}"] = linear.weight.detach().clone()
            errors = fit_projection(linear, args[0], target, recipe["projection_ridge"])
            stats.append({f"{name.split('.')[-1]}_{k}": v for k, v in errors.items()} | {"layer": index})
            logger.info("Layer %d %s: %s", index, name, errors)

        return pre_hook

    fit_kv = config.kv_lora_rank < hidden
    fit_q = config.q_lora_rank is not None and config.q_lora_rank < hidden
    for i, layer in enumerate(model.model.layers):
        attention = layer.self_attn
        if fit_kv or fit_q:
            names = [n for n, on in (("kv_b_proj", fit_kv), ("q_b_proj", fit_q)) if on]
            for name in names:
                hooks.append(attention.register_forward_pre_hook(record(inputs, (name, i)), with_kwargs=True))
                ridge = recipe["latent_ridge"]
                hooks.append(getattr(attention, name).register_forward_pre_hook(fit_latent(i, name, ridge)))
        if refit:
            hooks.append(layer.register_forward_pre_hook(record(stream, ("in", i)), with_kwargs=True))
            hooks.append(attention.o_proj.register_forward_pre_hook(fit_output(i, "self_attn.o_proj", "in", "mid")))
            hooks.append(
                layer.post_attention_layernorm.register_forward_pre_hook(record(stream, ("mid", i)), with_kwargs=True)
            )
            hooks.append(layer.mlp.down_proj.register_forward_pre_hook(fit_output(i, "mlp.down_proj", "mid", "out")))
    try:
        model.model(input_ids=calibration_ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return model, unfitted, stats


def build_embedded_mla(output_dir: str | Path, validation_samples: int | None = None, **recipe) -> dict:
    """Builds the MLA SmolLM2 (module docstring) into `output_dir` (written atomically) and returns its build info
    (recipe, timings, per-layer fit statistics, held-out losses of SmolLM2, of the MLA model and of the MLA model
    without any fit; greedy continuations of a prompt).

    Args:
        output_dir (`str` or `Path`): where to write the checkpoint, its tokenizer and `build_info.json`.
        validation_samples (`int`, *optional*): held-out samples for the losses (`RECIPE["validation_samples"]`);
            0 skips the evaluation.
        recipe: overrides of `RECIPE`.
    """
    inputs = conversion_inputs(RECIPE, recipe, validation_samples)
    recipe, started, dense, tokenizer = (inputs[k] for k in ("recipe", "started", "dense", "tokenizer"))
    model, unfitted, stats = convert_to_mla(dense, inputs["calibration"], **inputs["fit"])
    model.config.name_or_path = "hf-minitron/smollm2-135m-instruct-mla"
    build_seconds = time.perf_counter() - started

    info = conversion_info(
        inputs,
        model,
        build_seconds,
        stats,
        kv_cache_per_token_per_layer={
            "teacher": 2 * dense.config.num_key_value_heads * model.config.v_head_dim,
            "mla": model.config.kv_lora_rank + model.config.qk_rope_head_dim,
        },
    )
    if recipe["validation_samples"]:
        evaluate_conversion(info, inputs, model, "mla", unfitted)
    dense = inputs["dense"] = None  # frees the dense teacher before the save
    save_derived(output_dir, model, tokenizer, info)
    return info


def embedded_mla_path() -> Path:
    """Path of the cached MLA SmolLM2 checkpoint, built on first use (minutes on a CPU; see `build_info.json`)."""
    return derived_path(EMBEDDED_MLA_NAME, build_embedded_mla, "MLA model")


def load_embedded_mla(**kwargs):
    """`(model, tokenizer)` of the embedded MLA model: a stock `DeepseekV3ForCausalLM` (every layer dense) converted
    from SmolLM2-135M-Instruct (module docstring)."""
    return load_checkpoint(embedded_mla_path(), **kwargs)


def embedded_mla_info() -> dict:
    """The `build_info.json` of the cached embedded MLA model (building it if needed)."""
    return read_build_info(embedded_mla_path())
