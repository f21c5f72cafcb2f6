"""The embedded hybrid (`hf_minitron/embedded/hybrid.py`): the attention -> Mamba2 map and the closed-form fit on tiny
models, and (slow) the real model."""

import math

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM, BambaForCausalLM
from transformers.models.bamba.modeling_bamba import BambaMixer

from hf_minitron.embedded.hybrid import (
    RECIPE,
    causal_attention_output,
    convert_to_hybrid,
    copied_out_proj,
    fit_out_proj,
    hybrid_config,
    hybrid_state_dict,
    init_mixer,
    mixer_features,
    mixer_from_attention,
    select_attention_layers,
    token_linear_error,
)


# hidden 32 = 4 query heads x 8; 2 KV heads. The hybrid's mixers: 8 heads of 8 in 4 B/C groups (expand 2).
DENSE = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48)


def _dense(seed=0):
    return tiny_model("llama", seed=seed, **DENSE)


def _ids(batch=4, seq=24, seed=0):
    return torch.randint(3, 96, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_mixer_from_attention_maps_q_k_v_to_c_b_x():
    g = torch.Generator().manual_seed(0)
    groups, kv_heads, head_dim, hidden, heads = 4, 2, 3, 5, 8
    q = torch.randn(groups * head_dim, hidden, generator=g)
    k, v = torch.randn(2, kv_heads * head_dim, hidden, generator=g)
    gate = torch.randn(hidden, generator=g)
    v_scale, k_scale, q_scale = torch.tensor([2.0, 3.0]), torch.tensor([0.5, 4.0]), torch.arange(1.0, 5.0)
    w = mixer_from_attention(q, k, v, heads, gate, v_scale, k_scale, q_scale)
    inner, state = heads * head_dim, groups * head_dim
    assert w.shape == (2 * inner + 2 * state + heads, hidden)
    z, x, b, c, dt = w.split([inner, inner, state, state, heads])
    torch.testing.assert_close(z, gate.expand(inner, hidden))
    assert not dt.any()  # the time step is dt_bias alone
    for head in range(heads):
        group = head // (heads // groups)  # two consecutive heads per group
        kv = group // (groups // kv_heads)  # GQA: two query heads per KV head
        rows = slice(kv * head_dim, (kv + 1) * head_dim)
        torch.testing.assert_close(x[head * head_dim : (head + 1) * head_dim], v_scale[kv] * v[rows])
    for group in range(groups):
        kv = group // 2
        rows = slice(group * head_dim, (group + 1) * head_dim)
        torch.testing.assert_close(b[rows], k_scale[kv] * k[kv * head_dim : (kv + 1) * head_dim])
        torch.testing.assert_close(c[rows], q_scale[group] * q[rows])
    with pytest.raises(ValueError, match="multiple of the 4 query heads"):
        mixer_from_attention(q, k, v, 6, gate, v_scale, k_scale, q_scale)


def test_copied_out_proj_is_w_o_centred_and_shared_by_each_group():
    o = torch.randn(5, 4 * 3, generator=torch.Generator().manual_seed(0))
    scale = torch.tensor([2.0, 4.0])
    w = copied_out_proj(o, num_heads=8, head_dim=3, value_bias=10.0, value_scale=scale).view(5, 8, 3)
    torch.testing.assert_close(w.sum(-1), torch.zeros(5, 8), atol=1e-5, rtol=0)  # no output from the constant
    for head in range(8):
        group = head // 2
        block = o[:, group * 3 : (group + 1) * 3] * 10.0 / scale[group // 2]
        torch.testing.assert_close(w[:, head], (block - block.mean(-1, keepdim=True)) / 2)


def test_attention_layers_are_those_a_token_wise_map_explains_worst():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 8, generator=g)
    linear = x @ torch.randn(8, 8, generator=g) + 1.0  # an affine map of each token: nothing left to explain
    assert token_linear_error(x, linear, ridge=1e-6) < 1e-6
    assert token_linear_error(x, torch.randn(4, 64, 8, generator=g)) > 0.5
    assert select_attention_layers([0.1, 0.9, 0.3, 0.8, 0.2], 2) == [1, 3]
    assert select_attention_layers([0.5, 0.5, 0.5], 0) == []
    with pytest.raises(ValueError, match="num_attention_layers=4"):
        select_attention_layers([0.1, 0.2, 0.3], 4)


def test_hybrid_config():
    dense = _dense().config
    config = hybrid_config(dense, [1, 3])
    assert (config.model_type, config.mamba_n_heads, config.mamba_d_head) == ("bamba", 8, 8)
    assert (config.mamba_n_groups, config.mamba_d_state, config.mamba_expand) == (4, 8, 2)
    assert config.layers_block_type == ["linear_attention", "full_attention"] * 2
    # Bamba rotates half of each head unless told otherwise; the copied attention needs the whole head.
    assert config.rope_parameters["partial_rotary_factor"] == 1.0
    with pytest.raises(ValueError, match="head_dim"):
        hybrid_config(tiny_model("llama", head_dim=16).config, [1])
    with pytest.raises(ValueError, match="Unknown recipe keys"):
        convert_to_hybrid(_dense(), _ids(), attention_every=2)


@pytest.mark.parametrize("refit", [False, True])
def test_hybrid_with_attention_everywhere_is_the_dense_model(refit):
    """Step 1 alone (every layer keeps its attention): Bamba computes exactly the Llama it was copied from, and the
    layer-wise refit of the projections (whose targets are then met already) keeps it so."""
    dense = _dense()
    model, copied, stats = convert_to_hybrid(dense, _ids(), num_attention_layers=4, refit_projections=refit)
    assert copied == {} and set(model.config.layers_block_type) == {"full_attention"}
    assert len(stats) == 4 + (8 if refit else 0)  # the token-wise errors of the 4 layers, then 2 refits per layer
    ids = _ids(2, 16, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)


def test_hybrid_state_dict_renames_and_drops_the_replaced_attention():
    renamed = hybrid_state_dict(_dense().state_dict(), [1])
    assert "model.layers.1.self_attn.q_proj.weight" in renamed
    assert not any(k.startswith("model.layers.0.self_attn.") for k in renamed)
    assert "model.layers.0.feed_forward.down_proj.weight" in renamed and "model.final_layernorm.weight" in renamed
    assert "model.layers.2.pre_ff_layernorm.weight" in renamed
    assert not any(".mlp." in k or "post_attention_layernorm" in k for k in renamed)


def test_fit_reduces_the_reconstruction_error_of_the_attention():
    dense = _dense()
    config = hybrid_config(dense.config, [1])
    mixer = BambaMixer(config, 0).eval()
    x = torch.randn(8, 32, 32, generator=torch.Generator().manual_seed(0))
    attention = dense.model.layers[0].self_attn
    with torch.no_grad():
        copied = init_mixer(mixer, attention, x, RECIPE)
        target = causal_attention_output(attention, dense.model.rotary_emb, x)
    torch.testing.assert_close(mixer.out_proj.weight, copied)
    errors = fit_out_proj(mixer, x, target, ridge=1e-3)
    assert errors["relative_error"] < min(errors["relative_error_copied"], 1.0)
    with torch.no_grad():  # the mixer now computes the fitted map
        fitted = mixer(x).reshape(-1, 32)
    error = (fitted - target.reshape(-1, 32)).pow(2).sum() / target.pow(2).sum()
    assert error.item() == pytest.approx(errors["relative_error"], rel=1e-3)
    # The gate cancels in the gated RMSNorm: a positive per-token scalar, the same for every channel.
    features = mixer_features(mixer, x)
    assert torch.isfinite(features).all() and features.shape == (8 * 32, 64)


def test_converted_hybrid_fits_every_mamba_layer_saves_reloads_and_prunes(tmp_path):
    from hf_minitron import PrunedConfig, prune_model

    dense = _dense()
    model, copied, stats = convert_to_hybrid(dense, _ids(8, 32), attention_layers=[1, 3])
    assert model.config.layers_block_type == ["linear_attention", "full_attention"] * 2
    mixers = [s for s in stats if "relative_error_copied" in s]
    assert sorted(copied) == [s["layer"] for s in mixers] == [0, 2]
    assert all(s["relative_error"] < s["relative_error_copied"] for s in mixers)
    refits = [s for s in stats if "down_proj_relative_error" in s]
    assert len(refits) == 4 and all(
        s["down_proj_relative_error"] <= s["down_proj_relative_error_before"] for s in refits
    )

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=False)
    assert type(reloaded) is BambaForCausalLM and reloaded.config.rope_parameters["partial_rotary_factor"] == 1.0
    ids = _ids(2, 16, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)

    # Group-aware head pruning keeps the same number of heads in each of the 4 B/C groups: 8 -> 4 (one per group).
    samples = [{"input_ids": i, "attention_mask": torch.ones_like(i)} for i in _ids(8, 16, seed=2)]
    target = PrunedConfig(mamba_num_heads=4, calibration_samples=8, calibration_batch_size=4)
    pruned = prune_model(model, target, samples, show_progress=False)
    assert pruned.config.mamba_n_heads == 4 and pruned.config.mamba_n_groups == 4
    with torch.no_grad():
        assert torch.isfinite(pruned(ids).logits).all()


# ---------------------------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_embedded_hybrid_is_a_stock_bamba_that_models_text_and_generates():
    from hf_minitron.data import embedded_datasets
    from hf_minitron.embedded.hybrid import embedded_hybrid_info, embedded_hybrid_path, load_embedded_hybrid
    from hf_minitron.evaluation import lm_loss

    model, tokenizer = load_embedded_hybrid()
    model.eval()
    assert type(model).__name__ == "BambaForCausalLM" and type(model).__module__.startswith("transformers.")
    config = model.config
    kinds = config.layers_block_type
    assert kinds.count("full_attention") == 10 and kinds.count("linear_attention") == 20
    assert (config.mamba_n_heads, config.mamba_d_head, config.mamba_n_groups) == (18, 64, 9)
    reloaded = AutoModelForCausalLM.from_pretrained(embedded_hybrid_path(), trust_remote_code=False)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    del reloaded

    data = embedded_datasets(tokenizer, 128)
    validation = [
        {"input_ids": torch.tensor(r["input_ids"]), "attention_mask": torch.tensor(r["attention_mask"])}
        for r in data["validation"].select(range(6))
    ]
    loss = lm_loss(model, validation)
    torch.manual_seed(0)
    random_loss = lm_loss(BambaForCausalLM(config).eval(), validation)
    assert loss < 0.6 * math.log(config.vocab_size) and loss < random_loss - 4, (loss, random_loss)
    info = embedded_hybrid_info()
    assert info["hybrid_loss"] < info["unfitted_loss"] and info["hybrid_loss"] < info["attention_removed_loss"]

    # Generation with the cache (Mamba's recurrent step, attention's KV cache) follows the full forward pass.
    ids = tokenizer("The for statement is used to iterate over", return_tensors="pt").input_ids
    out = model.generate(
        ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True, use_cache=True
    )
    with torch.no_grad():
        full = model(out.sequences, use_cache=False).logits[0, ids.shape[1] - 1 : -1]
    torch.testing.assert_close(torch.cat(out.logits), full, rtol=1e-3, atol=1e-3)
