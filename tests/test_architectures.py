import pytest
from conftest import (
    ARCHITECTURE_NAMES,
    HYBRID_ARCHITECTURE_NAMES,
    MOE_ARCHITECTURE_NAMES,
    PER_LAYER_ARCHITECTURE_NAMES,
)

from hf_minitron import ARCHITECTURES, PrunedConfig, get_architecture, prune_model
from hf_minitron.architectures import get_decoder_layers


def test_every_supported_architecture_has_a_tiny_model_test():
    assert sorted(ARCHITECTURES) == sorted(
        ARCHITECTURE_NAMES + MOE_ARCHITECTURE_NAMES + HYBRID_ARCHITECTURE_NAMES + PER_LAYER_ARCHITECTURE_NAMES
    )


@pytest.mark.parametrize("model_type", ARCHITECTURE_NAMES)
def test_spec_names_exist_on_the_model(model_type):
    from conftest import tiny_model

    model = tiny_model(model_type)
    spec = get_architecture(model.config)
    layer = get_decoder_layers(model)[0]
    attn, mlp = getattr(layer, spec.attention), getattr(layer, spec.mlp)
    for name in (spec.q_proj, spec.k_proj, spec.v_proj, spec.qkv_proj, spec.o_proj):
        if name:
            assert hasattr(attn, name), name
    for name in (spec.gate_proj, spec.up_proj, spec.gate_up_proj, spec.down_proj):
        if name:
            assert hasattr(mlp, name), name
    for name in (*spec.residual_norms, spec.attn_input_norm, spec.mlp_input_norm):
        assert name is None or hasattr(layer, name), name


def test_unsupported_architecture_fails_at_once_listing_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match="Unsupported architecture: model_type='gpt2'.*llama.*qwen3"):
        prune_model(model, PrunedConfig(num_hidden_layers=1))
    with pytest.raises(ValueError, match="supports"):
        get_architecture(GPT2Config())


@pytest.mark.parametrize("model_type", ARCHITECTURE_NAMES + MOE_ARCHITECTURE_NAMES)
def test_count_parameters_is_exact_for_every_family(model_type):
    import copy

    from conftest import random_samples, tiny_model

    from hf_minitron import count_parameters, random_importance

    model = tiny_model(model_type)
    source = copy.deepcopy(model.config)
    assert count_parameters(source) == sum(p.numel() for p in model.parameters())
    hidden = {"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1} if model_type == "olmoe" else {}
    # Dense then MoE layers (DeepSeek-V3): which layers go decides the count, so the depth target names them.
    depth = {"layers_to_drop": [1]} if ARCHITECTURES[model_type].dense_layers_field else {"num_hidden_layers": 3}
    target = {**depth, "hidden_size": 24, **hidden}
    target.update({"num_experts": 3} if model_type in MOE_ARCHITECTURE_NAMES else {"intermediate_size": 40})
    config = PrunedConfig(**target, depth_method="explicit" if "layers_to_drop" in depth else "block_influence")
    prune_model(model, config, scores=random_importance(model.config), calibration_data=random_samples(2))
    assert count_parameters(source, config) == sum(p.numel() for p in model.parameters())


def test_per_layer_lists_and_scales_of_the_2026_families_follow_pruning(tmp_path):
    from conftest import random_samples, tiny_model
    from transformers import AutoModelForCausalLM

    smollm3 = tiny_model("smollm3")  # no_rope_layers = [1, 1, 1, 0]: the last layer has no RoPE
    prune_model(smollm3, PrunedConfig(layers_to_drop=[1]), random_samples(4))
    assert smollm3.config.no_rope_layers == [1, 1, 0]
    assert [layer.self_attn.use_rope for layer in get_decoder_layers(smollm3)] == [1, 1, 0]

    granite = tiny_model("granite", embedding_multiplier=3.0, residual_multiplier=0.5, logits_scaling=2.0)
    prune_model(granite, PrunedConfig(hidden_size=24, intermediate_size=40), random_samples(4))
    granite.save_pretrained(tmp_path / "granite")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "granite")
    assert (reloaded.config.embedding_multiplier, reloaded.config.residual_multiplier) == (3.0, 0.5)
    assert reloaded.config.logits_scaling == 2.0

    gemma3 = tiny_model("gemma3_text")
    prune_model(gemma3, PrunedConfig(hidden_size=24), random_samples(4))
    assert gemma3.get_input_embeddings().embed_scale.item() == pytest.approx(24**0.5)

    olmo2 = tiny_model("olmo2")  # q_norm / k_norm over all heads x head_dim
    prune_model(olmo2, PrunedConfig(num_attention_heads=2, num_key_value_heads=1), random_samples(4))
    attn = get_decoder_layers(olmo2)[0].self_attn
    assert attn.q_norm.weight.shape == (2 * 8,) and attn.k_norm.weight.shape == (1 * 8,)
