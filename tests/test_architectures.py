import pytest
from conftest import ARCHITECTURE_NAMES, MOE_ARCHITECTURE_NAMES

from hf_minitron import ARCHITECTURES, PrunedConfig, get_architecture, prune_model
from hf_minitron.architectures import get_decoder_layers


def test_every_supported_architecture_has_a_tiny_model_test():
    assert sorted(ARCHITECTURES) == sorted(ARCHITECTURE_NAMES + MOE_ARCHITECTURE_NAMES)


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
        assert hasattr(layer, name), name


def test_unsupported_architecture_fails_at_once_listing_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match="Unsupported architecture: model_type='gpt2'.*llama.*qwen3"):
        prune_model(model, PrunedConfig(num_hidden_layers=1))
    with pytest.raises(ValueError, match="supports"):
        get_architecture(GPT2Config())
