"""Gemma 3n's text model (`gemma3n_text`) and per-layer MLP widths.

Gemma 3n's modelling reads `config.intermediate_size[layer_idx]`: its MLP widths may differ by layer, given
(`intermediate_size_per_layer`) or chosen by importance under the uniform target's budget
(`mlp_width_allocation="global"`), and the pruned model still reloads with stock `from_pretrained`. Its query heads are
pruned too, its KV heads (a layer reading another's keys and values keeps that layer's), its depth (the per-layer
input tables sliced with the layers, the layers whose keys and values later layers read kept) and its hidden size
(AltUp, LAuReL and the per-layer-input weights sliced alike, the inputs scaled by a power of hidden_size rescaled). The tiny config is
`PER_LAYER_OVERRIDES` of `tests/conftest.py`: 4 layers, the last 2 reusing the first 2's keys and values, layer 0's
MLP sparsifying its gate; the depth tests use 6 layers, the last 2 reading layers 2 and 3.
"""

import copy

import pytest
import torch
from conftest import _static_scores, random_samples, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from hf_minitron import PrunedConfig, count_parameters, prune_model
from hf_minitron.architectures import get_decoder_layers
from hf_minitron.pruning.candidates import searched_axes
from hf_minitron.pruning.summary import shape_summary


IDS = torch.arange(3, 19)[None]
CALIBRATION = dict(calibration_samples=8, calibration_batch_size=4)
FAMILY = "gemma3n_text"

AXES = {
    "mlp": {"intermediate_size": 40},
    "heads": {"num_attention_heads": 2},
    "per_layer": {"intermediate_size_per_layer": [64, 32, 48, 16]},
    "global": {"intermediate_size": 32, "mlp_width_allocation": "global"},
    "all": {"intermediate_size": 24, "mlp_width_allocation": "global", "num_attention_heads": 2},
    "kv_heads": {"num_key_value_heads": 1, "num_attention_heads": 2},
    "hidden": {"hidden_size": 24},
}


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _widths(model) -> list[int]:
    return [layer.mlp.down_proj.in_features for layer in get_decoder_layers(model)]


@pytest.mark.parametrize("axis", list(AXES))
def test_prune_axis_reloads_with_stock_transformers_and_generates(axis, tmp_path):
    model = tiny_model(FAMILY)
    source = copy.deepcopy(model.config)
    fields = AXES[axis]
    prune_model(model, PrunedConfig(**fields, **CALIBRATION), random_samples(8), show_progress=False)

    widths = _widths(model)
    assert list(model.config.intermediate_size) == widths
    assert [layer.mlp.intermediate_size for layer in get_decoder_layers(model)] == widths
    if "intermediate_size_per_layer" in fields:
        assert widths == fields["intermediate_size_per_layer"]
    elif fields.get("mlp_width_allocation") == "global":
        # The uniform target's budget, shared out by importance (multiples of 8: exactly).
        assert sum(widths) == 4 * fields["intermediate_size"]
        assert model.pruning_record.target_shape["intermediate_size_per_layer"] == widths

    n = _numel(model)
    fresh = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
    assert _numel(fresh) == n == count_parameters(model.config) < count_parameters(source)
    # From the source and the target alone: a global allocation counts as its uniform target (the same budget).
    assert count_parameters(source, PrunedConfig(**fields)) == n
    assert count_parameters(model.config, count="active") == n

    logits = model(IDS).logits
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reloaded.eval()
    assert _widths(reloaded) == widths
    torch.testing.assert_close(reloaded(IDS).logits, logits, rtol=0, atol=0)
    # The last two layers read the first two's keys and values, from the cache or not.
    cached = reloaded.generate(IDS, max_new_tokens=4, do_sample=False, use_cache=True)
    uncached = reloaded.generate(IDS, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize(
    "fields",
    [
        {"intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 32},
        {"intermediate_size_per_layer": [64, 64, 64, 64]},
        {"intermediate_size": 64, "mlp_width_allocation": "global", "mlp_width_floor": 1.0},
    ],
    ids=["uniform", "per_layer", "global"],
)
def test_identity_pruning_keeps_logits_exactly(fields, tmp_path):
    model = tiny_model(FAMILY)
    before = model(IDS).logits
    prune_model(model, PrunedConfig(**fields, **CALIBRATION), random_samples(8), show_progress=False)
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(reloaded(IDS).logits, before, rtol=0, atol=0)


def _kill_neurons(mlp, neurons) -> None:
    with torch.no_grad():
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight[neurons] = 0
        mlp.down_proj.weight[:, neurons] = 0


def test_dead_units_are_the_ones_removed():
    """A neuron zeroed on purpose in each layer is what pruning one neuron removes (activation importance). Layer 0
    sparsifies its gate: most of its activations are zero, so its zeroed neuron ties with many others and is not
    asserted there."""
    model = tiny_model(FAMILY)
    for layer in get_decoder_layers(model):
        _kill_neurons(layer.mlp, [5])
    prune_model(model, PrunedConfig(intermediate_size=63, **CALIBRATION), random_samples(8))
    record = model.pruning_record
    assert all(5 not in record.neurons[i] and len(record.neurons[i]) == 63 for i in (1, 2, 3))


def test_a_zeroed_query_head_is_the_one_removed_in_every_layer():
    """Query head 1 zeroed (its query rows and output columns) in every layer, the KV-sharing layers included, is the
    head of its KV group that pruning to one head per group removes. A head's activation (its attention output) does
    not vanish with its query, so the weight-magnitude scores are the ones that see it."""
    model = tiny_model(FAMILY)
    with torch.no_grad():
        for layer in get_decoder_layers(model):
            layer.self_attn.q_proj.weight[8:16] = 0
            layer.self_attn.o_proj.weight[:, 8:16] = 0
    prune_model(model, PrunedConfig(num_attention_heads=2, importance="magnitude"))
    heads = model.pruning_record.heads
    assert sorted(heads) == [0, 1, 2, 3] and all(kept[0] == 0 and kept[1] in (2, 3) for kept in heads.values())


def test_global_allocation_moves_the_budget_to_the_layers_whose_neurons_matter():
    """Layer 1 keeps 16 live neurons of 64 (48 zeroed on purpose): a uniform target of 32 keeps 16 dead ones there, the
    global allocation keeps its 16 live ones and gives the 16 freed neurons to the other layers, for the same total."""
    live = torch.arange(0, 64, 4)
    dead = [i for i in range(64) if i not in set(live.tolist())]
    uniform, global_ = (tiny_model(FAMILY) for _ in range(2))
    for model in (uniform, global_):
        _kill_neurons(get_decoder_layers(model)[1].mlp, dead)
    source = copy.deepcopy(uniform.config)
    prune_model(uniform, PrunedConfig(intermediate_size=32, **CALIBRATION), random_samples(8))
    target = PrunedConfig(intermediate_size=32, mlp_width_allocation="global", **CALIBRATION)
    prune_model(global_, target, random_samples(8))

    assert _widths(uniform) == [32, 32, 32, 32]
    widths = _widths(global_)
    assert widths[1] == 16 and global_.pruning_record.neurons[1] == live.tolist()
    assert sum(widths) == 128 and max(widths) > 32 and all(w % 8 == 0 and w >= 8 for w in widths)
    assert _numel(global_) == _numel(uniform) == count_parameters(source, target)


def test_counts_and_search_axes():
    """Exact counts of a heterogeneous config; the per-layer input embeddings are embeddings; the search varies the
    hidden size, the MLP width and the query and KV heads."""
    config = tiny_config(FAMILY, intermediate_size=[64, 24, 48, 8])
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    assert count_parameters(config) == _numel(model)
    base = model.model
    tables = base.embed_tokens.weight.numel() + base.embed_tokens_per_layer.weight.numel()
    assert count_parameters(config, count="non_embedding") == _numel(model) - tables
    # Not depth: a candidate's size would depend on which layers go.
    axes = [axis.name for axis in searched_axes(tiny_config(FAMILY))]
    assert axes == ["hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"]


def _no_forward(model):
    model.register_forward_pre_hook(lambda *args: pytest.fail("a forward pass ran before the target was refused"))
    return model


@pytest.mark.parametrize(
    "family,fields,message",
    [
        # Per-layer widths: only for a family whose modelling reads them; one entry per layer, each within its layer.
        ("llama", {"intermediate_size_per_layer": [32] * 4}, "does not apply to model_type='llama'.*would not reload"),
        ("llama", {"intermediate_size": 32, "mlp_width_allocation": "global"}, "mlp_width_allocation='global'"),
        (FAMILY, {"intermediate_size_per_layer": [32] * 3}, r"has 3 entries.*4 layers.*e\.g\. \[32, 32, 32, 32\]"),
        (FAMILY, {"intermediate_size_per_layer": [32, 80, 32, 32]}, r"intermediate_size_per_layer\[1\]=80.*<= 64"),
        (FAMILY, {"intermediate_size_per_layer": [32] * 4, "intermediate_size": 32}, "set only one"),
        (FAMILY, {"mlp_width_allocation": "global"}, "set intermediate_size"),
        # What Gemma 3n's structures do not prune, with the reason and the valid value.
        # Depth keeps the layers whose keys and values the last num_kv_shared_layers layers read (0 and 1 here).
        (FAMILY, {"layers_to_drop": [1]}, r"removes layers \[1\], whose keys and values.*\(\[2, 3\]\).*read"),
        (FAMILY, {"num_hidden_layers": 1}, r"num_hidden_layers=1 is too few.*layers \[0, 1\].*>= 2"),
        (FAMILY, {"intermediate_size": 80}, "larger than the source model's intermediate_size=64"),
    ],
)
def test_bad_targets_are_refused_before_any_work(family, fields, message):
    with pytest.raises(ValueError, match=message):
        prune_model(_no_forward(tiny_model(family)), PrunedConfig(**fields), random_samples(8))


def test_a_model_of_different_widths_is_not_pruned_again():
    model = _no_forward(tiny_model(FAMILY, intermediate_size=[64, 32, 64, 64]))
    with pytest.raises(ValueError, match=r"already differ by layer \(\[64, 32, 64, 64\]\)"):
        prune_model(model, PrunedConfig(num_attention_heads=2), random_samples(8))


def test_summary_counts_the_per_layer_embeddings_as_embeddings_and_lists_the_widths():
    model = tiny_model(FAMILY)
    prune_model(model, PrunedConfig(intermediate_size_per_layer=[64, 32, 48, 16], **CALIBRATION), random_samples(8))
    summary = shape_summary(model)
    assert summary["intermediate_size"] == 64 and summary["intermediate_size_per_layer"] == [64, 32, 48, 16]
    assert summary["parameters"]["non_embedding"] == count_parameters(model.config, count="non_embedding")


# ---------------------------------------------------------------------------------------------- depth
SIX = dict(
    num_hidden_layers=6,
    layer_types=["sliding_attention", "full_attention"] * 3,
    intermediate_size=[64] * 6,
    activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0, 0.0, 0.0],
)


def test_dropped_layers_give_the_logits_of_the_model_without_them_and_reload(tmp_path):
    from hf_minitron.pruning.structures.depth import layers_skipped

    model = tiny_model(FAMILY, **SIX).eval()
    source = copy.deepcopy(model.config)
    with torch.no_grad(), layers_skipped(model, [0, 5]):  # each kept layer still reads its own per-layer input
        expected = model(IDS).logits
    prune_model(model, PrunedConfig(layers_to_drop=[0, 5], **CALIBRATION), random_samples(8), show_progress=False)
    config = model.config
    assert (config.num_hidden_layers, config.num_kv_shared_layers) == (4, 1)
    assert config.layer_types == ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    assert list(config.intermediate_size) == [64] * 4 == _widths(model)
    assert config.activation_sparsity_pattern == [0.0] * 4
    assert model.model.embed_tokens_per_layer.weight.shape[1] == 4 * config.hidden_size_per_layer_input
    torch.testing.assert_close(model(IDS).logits, expected, rtol=0, atol=0)

    n = _numel(model)
    assert n == _numel(AutoModelForCausalLM.from_config(copy.deepcopy(config))) == count_parameters(config)
    assert count_parameters(source, PrunedConfig(layers_to_drop=[0, 5])) == n
    with pytest.raises(ValueError, match=r"layers_to_drop=\[\.\.\.\]"):
        count_parameters(source, PrunedConfig(num_hidden_layers=4))  # which layers go decides the count
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reloaded.eval()
    torch.testing.assert_close(reloaded(IDS).logits, expected, rtol=0, atol=0)
    cached = reloaded.generate(IDS, max_new_tokens=4, do_sample=False, use_cache=True)
    assert torch.equal(cached, reloaded.generate(IDS, max_new_tokens=4, do_sample=False, use_cache=False))


@pytest.mark.parametrize(
    "fields",
    [
        {"depth_method": "block_influence"},
        {"depth_method": "lm_loss"},
        {"depth_method": "contiguous", "contiguous_score": "block_influence"},
    ],
    ids=["block_influence", "lm_loss", "contiguous"],
)
def test_every_depth_method_keeps_the_layers_later_layers_read(fields, tmp_path):
    model = tiny_model(FAMILY, **SIX)
    # Two layers from 6: the producers 2 and 3 are never candidates (contiguous: only block [4, 5] avoids them).
    prune_model(
        model, PrunedConfig(num_hidden_layers=4, **fields, **CALIBRATION), random_samples(8), show_progress=False
    )
    dropped = model.pruning_record.dropped_layers
    assert len(dropped) == 2 and not {2, 3} & set(dropped)
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert _numel(reloaded) == _numel(model) == count_parameters(model.config)


def test_a_contiguous_block_that_must_hold_a_kept_layer_is_refused_before_any_work():
    model = _no_forward(tiny_model(FAMILY, **SIX))
    with pytest.raises(ValueError, match=r"every such block holds one of layers \[2, 3\].*'block_influence'"):
        prune_model(model, PrunedConfig(num_hidden_layers=3, depth_method="contiguous"), random_samples(8))


# ---------------------------------------------------------------------------------------------- KV heads
def test_a_layer_reading_another_layers_keys_and_values_keeps_its_kv_heads():
    model = tiny_model(FAMILY).eval()  # layers 2 and 3 read the keys and values of layers 0 and 1
    # Query heads 0-1 read KV head 0, heads 2-3 KV head 1. Layer 0 prefers KV head 0 a little, the layer reading it
    # (2) KV head 1 much more: they keep KV head 1 together. Layers 1 and 3 both prefer KV head 0.
    heads = torch.tensor(
        [[1.1, 1.1, 1.0, 1.0], [3.0, 3.0, 1.0, 1.0], [0.1, 0.1, 5.0, 5.0], [2.0, 2.0, 0.5, 0.5]], dtype=torch.float64
    )
    scores = _static_scores(model, heads=heads)
    prune_model(model, PrunedConfig(num_key_value_heads=1, num_attention_heads=2), scores=scores, show_progress=False)
    record = model.pruning_record
    assert record.kv_heads == {0: [1], 1: [0], 2: [1], 3: [0]}
    assert record.heads == {0: [2, 3], 1: [0, 1], 2: [2, 3], 3: [0, 1]}
    cached = model.generate(IDS, max_new_tokens=4, do_sample=False, use_cache=True)
    assert torch.equal(cached, model.generate(IDS, max_new_tokens=4, do_sample=False, use_cache=False))


def test_a_dead_kv_group_is_the_one_removed_and_the_logits_stay():
    model = tiny_model(FAMILY).eval()
    with torch.no_grad():
        for layer in get_decoder_layers(model):  # KV head 0's query heads (0, 1) write nothing
            layer.self_attn.o_proj.weight[:, : 2 * model.config.head_dim] = 0
    before = model(IDS).logits
    target = PrunedConfig(num_key_value_heads=1, num_attention_heads=2, **CALIBRATION)
    prune_model(model, target, random_samples(8), show_progress=False)
    assert model.pruning_record.kv_heads == {i: [1] for i in range(4)}
    torch.testing.assert_close(model(IDS).logits, before, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- hidden size
def test_a_channel_no_block_reads_is_the_one_removed_with_every_weight_over_the_hidden_size():
    model = tiny_model(FAMILY).eval()
    dead = [3, 5, 10, 20]
    with torch.no_grad():
        for layer in get_decoder_layers(model):  # the norms feeding attention and the MLP zero these channels
            layer.input_layernorm.weight[dead] = 0
            layer.pre_feedforward_layernorm.weight[dead] = 0
    # 28: a multiple of the 4 heads, which Gemma3nTextConfig checks.
    prune_model(model, PrunedConfig(hidden_size=28, **CALIBRATION), random_samples(8), show_progress=False)
    kept = model.pruning_record.hidden
    assert kept == [c for c in range(32) if c not in dead]
    base, layer = model.model, get_decoder_layers(model)[0]
    assert base.altup_projections[0].weight.shape == base.altup_unembed_projections[0].weight.shape == (28, 28)
    assert base.per_layer_model_projection.in_features == layer.altup.modality_router.in_features == 28
    assert layer.laurel.linear_right.out_features == layer.per_layer_projection.out_features == 28
    assert layer.altup.correct_output_scale.shape == layer.post_per_layer_input_norm.weight.shape == (28,)
    # The inputs Gemma 3n scales by a power of hidden_size: the buffers are a reload's, the weights rescaled.
    assert layer.altup.router_input_scale.item() == pytest.approx(1 / 28)
    assert base.per_layer_projection_scale.item() == pytest.approx(28**-0.5)


def test_hidden_pruning_keeps_what_each_kept_channel_adds_through_the_scaled_inputs():
    model = tiny_model(FAMILY).eval()
    router = get_decoder_layers(model)[0].altup.modality_router.weight.detach().clone()
    projection = model.model.per_layer_model_projection.weight.detach().clone()
    prune_model(model, PrunedConfig(hidden_size=16, **CALIBRATION), random_samples(8), show_progress=False)
    kept = torch.tensor(model.pruning_record.hidden)
    # router input x scaled by 1 / hidden: W' / 16 == W / 32 on the kept columns; the projection by hidden**-0.5.
    torch.testing.assert_close(get_decoder_layers(model)[0].altup.modality_router.weight, router[:, kept] / 2)
    torch.testing.assert_close(model.model.per_layer_model_projection.weight, projection[:, kept] * 0.5**0.5)


# ---------------------------------------------------------------------------------------------- per_layer_config
def test_transformers_per_layer_config_is_refused_with_the_reason():
    # transformers' heterogeneous configs: no supported family's stock modelling reads them (a Llama with per-layer
    # overrides does not even build), so they are refused, not half-read.
    config = tiny_config("llama", per_layer_config={0: {"intermediate_size": 32}})
    assert config.is_heterogeneous
    with pytest.raises(Exception, match="per-layer attribute"):
        AutoModelForCausalLM.from_config(copy.deepcopy(config))
    message = r"sets per_layer_config.*\{0: \{'intermediate_size': 32\}\}.*does not read.*intermediate_size_per_layer"
    with pytest.raises(ValueError, match=message):
        count_parameters(config)
    with pytest.raises(ValueError, match=message):
        PrunedConfig(intermediate_size=32).resolve(config)
