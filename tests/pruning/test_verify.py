"""A pruned model is checked against its own config before it is returned: a wrong custom `spec=` (a norm left out,
two projections swapped) is an error that says what is wrong, never a model that cannot run or reload."""

import dataclasses

import pytest
from conftest import random_samples, tiny_model

from hf_minitron import PrunedConfig, get_architecture, prune_model
from hf_minitron.pruning.verify import check_pruned_model


def _spec(model, **changes):
    return dataclasses.replace(get_architecture(model.config), **changes)


def test_a_norm_left_out_of_the_spec_is_refused_naming_the_tensor():
    model = tiny_model("llama")
    spec = _spec(model, residual_norms=("input_layernorm",))  # post_attention_layernorm forgotten
    config = PrunedConfig(hidden_size=24, importance="magnitude")
    with pytest.raises(
        ValueError, match=r"does not match its own config.*post_attention_layernorm.*spec= is the likely"
    ):
        prune_model(model, config, random_samples(4), spec=spec, show_progress=False)


def test_swapped_projections_are_refused():
    model = tiny_model("llama")  # 4 query heads in 2 KV groups: q_proj and k_proj differ in shape
    spec = _spec(model, q_proj="k_proj", k_proj="q_proj")
    config = PrunedConfig(num_attention_heads=2, importance="magnitude")
    with pytest.raises(
        ValueError, match=r"(does not match its own config|fails a forward pass|Slicing failed).*spec="
    ):
        prune_model(model, config, random_samples(4), spec=spec, show_progress=False)


def test_a_model_that_cannot_run_is_refused(monkeypatch):
    model = tiny_model("llama")

    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(model, "forward", broken)
    with pytest.raises(ValueError, match=r"fails a forward pass \(RuntimeError: mat1 and mat2.*report it"):
        check_pruned_model(model)


def test_a_right_model_passes_for_every_kind_of_family():
    for model_type in ("llama", "qwen3_moe", "nemotron_h", "jetmoe"):
        check_pruned_model(tiny_model(model_type))  # raises on any mismatch


@pytest.mark.parametrize("target, field", [({"moe_intermediate_size": 22}, "moe_intermediate_size=22"),
                                           ({"hidden_size": 30, "num_attention_heads": 2}, "hidden_size=30")])  # fmt: skip
def test_an_unaligned_moe_width_is_refused_before_any_forward(target, field):
    model = tiny_model("mixtral")
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    with pytest.raises(ValueError, match=rf"PrunedConfig\.{field} would give a model that cannot run.*Use \d+ or \d+"):
        prune_model(model, PrunedConfig(**target), random_samples(4), show_progress=False)
    assert forwards == []
