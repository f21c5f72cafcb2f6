"""The embedded MLA model (`hf_minitron/embedded/latent_attention.py`): the grouped-query attention -> multi-head
latent attention map and its closed-form fit on tiny Llamas, and (slow) the real model."""

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM, DeepseekV3ForCausalLM

from hf_minitron.embedded.latent_attention import (
    _complex_rows,
    _real_rows,
    convert_to_mla,
    latent_projections,
    mla_config,
    split_rope,
)


# hidden 32 = 4 query heads x 8. The input norms' eps is tiny: the tiny model's residual stream has an RMS of about
# 0.02, where SmolLM2's eps of 1e-5 would take 1% off the normalised input's RMS that the exact latent relies on.
DENSE = dict(hidden_size=32, num_attention_heads=4, head_dim=8, intermediate_size=48, rms_norm_eps=1e-12)


def _dense(kv_heads=2, seed=0):
    return tiny_model("llama", seed=seed, num_key_value_heads=kv_heads, **DENSE)


def _ids(batch=4, seq=24, seed=0):
    return torch.randint(3, 96, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _convert(dense, **recipe):
    model, unfitted, stats = convert_to_mla(dense, _ids(), **recipe)
    model.config._attn_implementation = "eager"  # the tiny dense model's
    return model, unfitted, stats


@torch.no_grad()
def _max_logit_error(a, b, seq=20):
    ids = _ids(2, seq, seed=1)
    return (a(ids).logits - b(ids).logits).abs().max().item()


# ---------------------------------------------------------------------------------------------- the map
def test_rotate_half_rows_round_trip_as_complex_pairs():
    w = torch.randn(3 * 8, 5, dtype=torch.float64)
    c = _complex_rows(w, 3)
    assert c.shape == (3, 4, 5) and torch.equal(c.real[1, 2], w[8 + 2]) and torch.equal(c.imag[1, 2], w[8 + 2 + 4])
    torch.testing.assert_close(_real_rows(c), w)


def test_split_rope_is_exact_where_the_kv_heads_share_their_keys_and_exact_at_distance_zero_always():
    g = torch.Generator().manual_seed(0)
    hidden, half = 6, 3
    q = torch.randn(4, half, hidden, dtype=torch.complex128, generator=g)
    k = torch.randn(2, half, hidden, dtype=torch.complex128, generator=g)
    x_cov = torch.eye(hidden)
    q_rope, k_rope, k_nope, captured = split_rope(q, k, x_cov)
    group = torch.tensor([0, 0, 1, 1])
    x, y = torch.randn(2, hidden, dtype=torch.float64, generator=g).to(torch.complex128)
    for delta in (0.0, 0.7, 2.0):  # the score of query x and key y at a rotation of delta per pair
        rotation = torch.exp(1j * delta * torch.arange(1, half + 1))
        dense = ((q @ x) * (k[group] @ y).conj() * rotation).real.sum(-1)
        rope = ((q_rope @ x) * (k_rope @ y).conj() * rotation).real.sum(-1)
        nope = ((q @ x) * (k_nope[group] @ y).conj()).real.sum(-1)
        if delta == 0:
            torch.testing.assert_close(rope + nope, dense)
        else:
            assert not torch.allclose(rope + nope, dense)  # two KV heads, one rotary key: approximate
    assert ((0 < captured) & (captured <= 1)).all()

    # KV heads whose keys are complex multiples of one another share one rotary key without loss.
    k = torch.stack([k[0], (0.5 - 2j) * k[0]])
    q_rope, k_rope, k_nope, captured = split_rope(q, k, x_cov)
    torch.testing.assert_close(captured, torch.ones(half, dtype=captured.dtype))
    assert k_nope.abs().max() < 1e-12


def test_a_full_rank_latent_is_exact_through_its_rms_norm():
    g = torch.Generator().manual_seed(0)
    hidden = 8
    target = torch.randn(5, hidden, generator=g)
    norm_weight = torch.rand(hidden, generator=g) + 0.5
    down, up = latent_projections(target, norm_weight, torch.eye(hidden), hidden)
    h = torch.randn(7, hidden, generator=g)
    x = norm_weight * h / h.pow(2).mean(-1, keepdim=True).sqrt()  # the attention's input: an RMSNorm's output
    latent = down @ x.T
    latent = latent / latent.pow(2).mean(0, keepdim=True).sqrt()  # MLA's latent RMSNorm (weight 1)
    torch.testing.assert_close(up @ latent, target @ x.T)
    with pytest.raises(ValueError, match="above the hidden size"):
        latent_projections(target, norm_weight, torch.eye(hidden), hidden + 1)


# ---------------------------------------------------------------------------------------------- the conversion
def test_one_kv_head_converts_exactly_and_reloads_as_a_stock_deepseek_v3(tmp_path):
    dense = _dense(kv_heads=1)
    for q_lora_rank in (None, 32):
        model, _, stats = _convert(dense, kv_lora_rank=32, q_lora_rank=q_lora_rank, refit_projections=False)
        assert _max_logit_error(dense, model) < 1e-5
        assert all(c == pytest.approx(1.0) for s in stats for c in s["rope_captured"])
    config = model.config
    assert config.model_type == "deepseek_v3" and config.first_k_dense_replace == config.num_hidden_layers
    assert (config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim) == (8, 8, 8)
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path, trust_remote_code=False, attn_implementation="eager", output_loading_info=True
    )
    assert type(reloaded) is DeepseekV3ForCausalLM and not info["missing_keys"] and not info["unexpected_keys"]
    assert _max_logit_error(model, reloaded.eval()) == 0


def test_with_grouped_kv_heads_the_position_free_part_is_exact():
    dense = _dense(kv_heads=2)
    model, _, _ = _convert(dense, kv_lora_rank=32, q_lora_rank=32, refit_projections=False)
    # One token: only distance 0, where the split is exact, and the values, which the full-rank latent keeps exactly.
    assert _max_logit_error(dense, model, seq=1) < 1e-5
    # Longer: the part of the keys off the shared rotary key loses its rotation.
    assert _max_logit_error(dense, model) > 1e-4
    # The latents reproduce the keys and values and the queries the map asks for, on any input.
    x = torch.randn(3, 32, dtype=torch.float64)
    x = (dense.model.layers[0].input_layernorm.weight.double() * x / x.pow(2).mean(-1, keepdim=True).sqrt()).float()
    attention = model.model.layers[0].self_attn
    kv = attention.kv_b_proj(attention.kv_a_layernorm(attention.kv_a_proj_with_mqa(x)[:, :32]))
    values = kv.view(3, 4, 16)[..., 8:]  # per head: 8 position-free key rows, then 8 value rows
    expected = dense.model.layers[0].self_attn.v_proj(x).view(3, 2, 8).repeat_interleave(2, dim=1)
    torch.testing.assert_close(values, expected, rtol=1e-4, atol=1e-5)


def test_low_rank_latents_are_refit_and_the_projections_fit_reduces_the_error():
    dense = _dense(kv_heads=2)
    model, unfitted, stats = _convert(dense, kv_lora_rank=16, q_lora_rank=12)
    attention = model.model.layers[0].self_attn
    assert (attention.kv_a_proj_with_mqa.out_features, attention.q_a_proj.out_features) == (16 + 8, 12)
    fits = [s for s in stats if "kv_b_proj_relative_error" in s or "q_b_proj_relative_error" in s]
    layers = dense.config.num_hidden_layers
    assert len(fits) == 2 * layers  # both latents of every layer
    for s in stats:
        for name in ("kv_b_proj", "q_b_proj", "o_proj", "down_proj"):
            if f"{name}_relative_error" in s:
                assert s[f"{name}_relative_error"] <= s[f"{name}_relative_error_before"] + 1e-6, s
    assert sorted(unfitted) == sorted(
        f"model.layers.{i}.{name}"
        for i in range(layers)
        for name in ("self_attn.kv_b_proj", "self_attn.q_b_proj", "self_attn.o_proj", "mlp.down_proj")
    )
    assert _max_logit_error(dense, model) < 1.0


def test_bad_recipes_and_models_are_refused():
    with pytest.raises(ValueError, match="Unknown recipe keys"):
        convert_to_mla(_dense(), _ids(), kv_rank=8)
    with pytest.raises(ValueError, match="full head dim"):
        mla_config(
            tiny_model("llama", **DENSE, rope_parameters={"rope_type": "linear", "factor": 2.0}).config, 8, None
        )


# ---------------------------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_embedded_mla_is_a_stock_deepseek_v3_close_to_smollm2():
    from hf_minitron.embedded.latent_attention import embedded_mla_info, embedded_mla_path, load_embedded_mla

    model, _ = load_embedded_mla()
    assert type(model) is DeepseekV3ForCausalLM
    config = model.config
    assert config.first_k_dense_replace == config.num_hidden_layers == 30
    info = embedded_mla_info()
    assert info["mla_loss"] < info["teacher_loss"] + 0.5 < info["uniform_loss"]
    assert info["mla_loss"] < info["unfitted_loss"]
    reloaded = AutoModelForCausalLM.from_pretrained(embedded_mla_path(), trust_remote_code=False)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
