"""The embedded Qwen3.5 (`hf_minitron/embedded/qwen35.py`): the Llama -> gated attention / Gated DeltaNet map and the
closed-form fit on tiny models, and (slow) the real model."""

import math

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM, Qwen3_5ForCausalLM

from hf_minitron.embedded.hybrid import causal_attention_output
from hf_minitron.embedded.qwen35 import (
    RECIPE,
    convert_to_qwen35,
    copied_out_proj,
    deltanet_from_attention,
    fit_qk_norm,
    gated_q_proj,
    qwen35_config,
    qwen35_state_dict,
    tune_qk_norms,
)


# hidden 32 = 4 query heads x 8; 2 KV heads. The mixers: 4 key heads and 8 value heads of 8.
DENSE = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48)


def _dense(seed=0):
    return tiny_model("llama", seed=seed, **DENSE)


def _ids(batch=4, seq=24, seed=0):
    return torch.randint(3, 96, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_qwen35_config():
    config = qwen35_config(_dense().config, [1, 3])
    assert config.model_type == "qwen3_5_text" and config.head_dim == 8
    assert config.layer_types == ["linear_attention", "full_attention"] * 2
    assert (config.linear_num_key_heads, config.linear_num_value_heads) == (4, 8)
    assert (config.linear_key_head_dim, config.linear_value_head_dim) == (8, 8)
    # Qwen3.5 rotates a quarter of each head unless told otherwise; the copied attention needs the whole head.
    assert config.rope_parameters["partial_rotary_factor"] == 1.0
    with pytest.raises(ValueError, match="attention_layers"):
        qwen35_config(_dense().config, [4])
    with pytest.raises(ValueError, match="Unknown recipe keys"):
        convert_to_qwen35(_dense(), _ids(), attention_every=2)
    with pytest.raises(ValueError, match="qk_norm"):
        convert_to_qwen35(_dense(), _ids(), qk_norm="none")


def test_gated_q_proj_interleaves_query_and_zero_gate_rows_per_head():
    q = torch.randn(3 * 4, 5)
    w = gated_q_proj(q, head_dim=4).view(3, 2, 4, 5)
    torch.testing.assert_close(w[:, 0].reshape(12, 5), q)
    assert not w[:, 1].any()


def test_state_dict_zero_centres_norms_doubles_o_proj_and_drops_the_replaced_attention():
    dense = _dense()
    converted = qwen35_state_dict(dense.state_dict(), [1], head_dim=8)
    layer = dense.model.layers[1]
    torch.testing.assert_close(converted["model.layers.1.input_layernorm.weight"], layer.input_layernorm.weight - 1)
    torch.testing.assert_close(converted["model.norm.weight"], dense.model.norm.weight - 1)
    torch.testing.assert_close(converted["model.layers.1.self_attn.o_proj.weight"], 2 * layer.self_attn.o_proj.weight)
    assert converted["model.layers.1.self_attn.q_proj.weight"].shape == (2 * 32, 32)
    assert not any(k.startswith("model.layers.0.self_attn.") for k in converted)


def test_deltanet_from_attention_maps_each_key_head_to_its_query_head_and_kv_head():
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, head_dim, hidden = 4, 2, 3, 5
    q = torch.randn(heads * head_dim, hidden, generator=g)
    k, v = torch.randn(2, kv_heads * head_dim, hidden, generator=g)
    q_scale, k_scale, v_scale = torch.arange(1.0, 5.0), torch.tensor([0.5, 4.0]), torch.tensor([2.0, 3.0])
    w = deltanet_from_attention(q, k, v, 2, q_scale, k_scale, v_scale)
    wq, wk, wv = w.split([heads * head_dim, heads * head_dim, 2 * heads * head_dim])
    for head in range(heads):
        kv = head // 2
        rows, kv_rows = slice(head * head_dim, (head + 1) * head_dim), slice(kv * head_dim, (kv + 1) * head_dim)
        torch.testing.assert_close(wq[rows], q_scale[head] * q[rows])
        torch.testing.assert_close(wk[rows], k_scale[kv] * k[kv_rows])
        for value_head in (2 * head, 2 * head + 1):  # two consecutive value heads per key head
            torch.testing.assert_close(
                wv[value_head * head_dim : (value_head + 1) * head_dim], v_scale[kv] * v[kv_rows]
            )


def test_copied_out_proj_shares_each_heads_columns_among_its_value_heads():
    o = torch.randn(5, 2 * 3)
    w = copied_out_proj(o, torch.tensor([2.0, 4.0]), 2, gate=4.0).view(5, 4, 3)
    for value_head in range(4):
        head = value_head // 2
        torch.testing.assert_close(w[:, value_head], o[:, head * 3 : (head + 1) * 3] * [2.0, 4.0][head] / 8)


def test_fit_qk_norm_is_the_least_squares_gain():
    q = torch.randn(64, 3, 8) * torch.linspace(0.5, 2, 8)
    norm = torch.nn.Module()
    norm.weight = torch.nn.Parameter(torch.zeros(8))
    errors = fit_qk_norm(norm, q, eps=1e-6)
    assert errors["relative_error"] < errors["relative_error_unit"]
    r = q.pow(2).mean(-1, keepdim=True).sqrt()
    for scale in (0.99, 1.01):  # a minimum: a scaled gain fits worse
        worse = ((scale * (1 + norm.weight) * q / r - q).pow(2).sum() / q.pow(2).sum()).item()
        assert worse > errors["relative_error"]


def test_tune_qk_norms_lowers_the_attention_error():
    dense = _dense()
    model, _, _ = convert_to_qwen35(dense, _ids(), num_attention_layers=4, refit_projections=False)
    attention = model.model.layers[0].self_attn
    x = torch.randn(4, 24, 32, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(24).unsqueeze(0)
    with torch.no_grad():
        target = causal_attention_output(dense.model.layers[0].self_attn, dense.model.rotary_emb, x)
        attention.q_norm.weight.fill_(2.0)  # a gain of 3: far sharper attention than the dense model's
    kwargs = {"position_embeddings": model.model.rotary_emb(x, positions), "attention_mask": None}
    errors = tune_qk_norms(attention, x, kwargs, target, steps=20, lr=0.1)
    assert errors["attention_relative_error"] < 0.5 * errors["attention_relative_error_before_tuning"]


def test_gated_attention_everywhere_with_linear_qk_norms_is_the_dense_model(tmp_path):
    """Steps 1-2 alone (every layer keeps its attention, q/k norms in their linear regime): Qwen3.5 computes exactly
    the Llama it was copied from, and so does its reload with stock `from_pretrained`."""
    dense = _dense()
    eps = dense.config.rms_norm_eps
    model, copied, _ = convert_to_qwen35(dense, _ids(), num_attention_layers=4, qk_norm="linear", rms_norm_eps=eps)
    assert copied == {} and set(model.config.layer_types) == {"full_attention"}
    ids = _ids(2, 16, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=False)
    assert type(reloaded) is Qwen3_5ForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)


def test_converted_model_fits_every_deltanet_layer_saves_reloads_and_prunes(tmp_path):
    from hf_minitron import PrunedConfig, prune_model

    dense = _dense()
    model, copied, stats = convert_to_qwen35(
        dense, _ids(8, 32), attention_layers=[1, 3], qk_norm_steps=5, refit_projections=True
    )
    assert model.config.layer_types == ["linear_attention", "full_attention"] * 2
    mixers = [s for s in stats if "relative_error_copied" in s]
    assert sorted(copied) == [s["layer"] for s in mixers] == [0, 2]
    assert all(s["relative_error"] < s["relative_error_copied"] for s in mixers)
    norms = [s for s in stats if "q_norm_relative_error" in s]
    assert [s["layer"] for s in norms] == [1, 3]
    assert all(s["q_norm_relative_error"] <= s["q_norm_relative_error_unit"] for s in norms)
    assert all(math.isfinite(s["attention_relative_error"]) for s in norms)
    refits = [s for s in stats if "down_proj_relative_error" in s]
    assert len(refits) == 4 and all(
        s["down_proj_relative_error"] <= s["down_proj_relative_error_before"] for s in refits
    )

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=False)
    assert type(reloaded) is Qwen3_5ForCausalLM and reloaded.config.rope_parameters["partial_rotary_factor"] == 1.0
    ids = _ids(2, 16, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
        assert torch.isfinite(model(ids).logits).all()

    # Value heads within their key heads (8 -> 4: one per key head), then attention heads (4 -> 2, one per KV head).
    samples = [{"input_ids": i, "attention_mask": torch.ones_like(i)} for i in _ids(8, 16, seed=2)]
    target = PrunedConfig(
        linear_num_value_heads=4, num_attention_heads=2, calibration_samples=8, calibration_batch_size=4
    )
    pruned = prune_model(model, target, samples, show_progress=False)
    assert (pruned.config.linear_num_value_heads, pruned.config.num_attention_heads) == (4, 2)
    with torch.no_grad():
        assert torch.isfinite(pruned(ids).logits).all()


# ---------------------------------------------------------------------------------------------- the real model
# Building the real model costs about 22 minutes on a loaded 2-core CPU (transformers' PyTorch fallback of the gated
# delta rule), more than the rest of the real-model tests together: the suite builds it only when asked, and checks it
# whenever a build (benchmarks/qwen35_prune_quality.py) left it in the cache. The tiny-model tests above check the map.
def _qwen35_available() -> bool:
    import os

    from hf_minitron.embedded import cache_dir
    from hf_minitron.embedded.qwen35 import EMBEDDED_QWEN35_NAME

    built = (cache_dir() / EMBEDDED_QWEN35_NAME / "build_info.json").is_file()
    return os.environ.get("HF_MINITRON_BUILD_QWEN35") == "1" or built


@pytest.mark.slow
@pytest.mark.skipif(
    "not _qwen35_available()", reason="builds in ~20 min: set HF_MINITRON_BUILD_QWEN35=1 (or build it once)"
)
def test_embedded_qwen35_is_a_stock_qwen35_that_models_text():
    from hf_minitron.data import embedded_datasets
    from hf_minitron.embedded.qwen35 import embedded_qwen35_info, load_embedded_qwen35
    from hf_minitron.evaluation import lm_loss

    model, tokenizer = load_embedded_qwen35()
    model.eval()
    assert type(model) is Qwen3_5ForCausalLM
    kinds = model.config.layer_types
    assert kinds.count("full_attention") == RECIPE["num_attention_layers"]
    data = embedded_datasets(tokenizer, 128)
    validation = [
        {"input_ids": torch.tensor(r["input_ids"]), "attention_mask": torch.tensor(r["attention_mask"])}
        for r in data["validation"].select(range(4))
    ]
    assert lm_loss(model, validation) < 0.6 * math.log(model.config.vocab_size)
    info = embedded_qwen35_info()
    assert info["qwen35_loss"] < info["unfitted_loss"] and info["qwen35_loss"] < info["attention_removed_loss"]
