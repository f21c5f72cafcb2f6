"""`structures/short_conv_channels.py`: the channels of LFM2's gated short convolutions, pruned to the pruned hidden
size (the tiny LFM2 of `tests/conftest.py`: conv layers 0, 2 and 3 of 5, 32 channels)."""

import copy

import pytest
import torch
from conftest import random_samples, tiny_model
from structure_helpers import collect, samples
from transformers import AutoModelForCausalLM

from hf_minitron import (
    ARCHITECTURES,
    PrunedConfig,
    count_parameters,
    estimate_importance,
    magnitude_importance,
    prune_model,
    random_importance,
)
from hf_minitron.architectures import get_decoder_layers
from hf_minitron.pruning.structures import short_conv_channels


IDS = torch.arange(3, 19)[None]
CONV_LAYERS = [0, 2, 3]
WIDTH = 32


def _dead_channel(model, channel: int) -> None:
    """Zeroes channel `channel`'s B, C and x rows of `in_proj` in every conv layer: its output is 0."""
    with torch.no_grad():
        for i in CONV_LAYERS:
            weight = get_decoder_layers(model)[i].conv.in_proj.weight
            weight[[channel, WIDTH + channel, 2 * WIDTH + channel]] = 0


def test_present_exactly_for_lfm2():
    assert {name for name, spec in ARCHITECTURES.items() if short_conv_channels.present(spec)} == {"lfm2"}


def test_hooks_record_the_input_of_out_proj_in_conv_layers_only():
    model = tiny_model("lfm2")
    _dead_channel(model, 5)
    collector = collect(model, short_conv_channels, samples())
    stats = collector.stacked(short_conv_channels.KEY, WIDTH, 1, ("sum",), "cpu")["sum"]
    assert [bool(stats[i].any()) for i in range(5)] == [True, False, True, True, False]
    assert (stats[CONV_LAYERS, 5] == 0).all() and (stats[CONV_LAYERS].sum(1) > 0).all()


def test_magnitude_is_the_norm_of_each_channels_rows_filter_and_column():
    model = tiny_model("lfm2")
    operator = get_decoder_layers(model)[0].conv
    shape = {"hidden_size": WIDTH}
    scores = short_conv_channels.magnitude(get_decoder_layers(model)[0], ARCHITECTURES["lfm2"], shape)
    c = 7
    rows = operator.in_proj.weight[[c, WIDTH + c, 2 * WIDTH + c]]
    expected = rows.pow(2).sum() + operator.conv.weight[c].pow(2).sum() + operator.out_proj.weight[:, c].pow(2).sum()
    torch.testing.assert_close(scores[c], expected.sqrt().detach())
    layer = get_decoder_layers(model)[1]  # attention
    assert torch.equal(short_conv_channels.magnitude(layer, ARCHITECTURES["lfm2"], shape), torch.zeros(WIDTH))


def test_slicing_all_channels_or_only_a_dead_one_keeps_the_logits_exactly():
    model = tiny_model("lfm2")
    _dead_channel(model, 5)
    before = model(IDS).logits
    with torch.no_grad():
        for i in CONV_LAYERS:
            short_conv_channels.slice_channels(get_decoder_layers(model)[i].conv, WIDTH, torch.arange(WIDTH))
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)
    kept = torch.tensor([c for c in range(WIDTH) if c != 5])
    with torch.no_grad():
        for i in CONV_LAYERS:
            short_conv_channels.slice_channels(get_decoder_layers(model)[i].conv, WIDTH, kept)
    assert get_decoder_layers(model)[0].conv.conv.groups == WIDTH - 1
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)


def test_the_dead_channel_is_the_one_removed():
    model = tiny_model("lfm2")
    _dead_channel(model, 5)
    config = PrunedConfig(hidden_size=24, calibration_samples=8, calibration_batch_size=4)
    prune_model(model, config, random_samples(8), show_progress=False)
    kept = model.pruning_record.conv_channels
    assert sorted(kept) == CONV_LAYERS and all(5 not in k and len(k) == 24 for k in kept.values())


@pytest.mark.parametrize("importance", ["activation", "magnitude", "random"])
def test_pruned_model_reloads_generates_and_is_counted_exactly(importance, tmp_path):
    # One of them with the biases of in_proj, conv and out_proj, and an untied LM head.
    model = tiny_model("lfm2", **(dict(conv_bias=True, tie_word_embeddings=False) if importance == "random" else {}))
    source = copy.deepcopy(model.config)
    config = PrunedConfig(hidden_size=16, num_attention_heads=2, calibration_samples=8, calibration_batch_size=4)
    scores = {
        "activation": lambda: estimate_importance(model, random_samples(8), config, show_progress=False),
        "magnitude": lambda: magnitude_importance(model),
        "random": lambda: random_importance(model.config, seed=1),
    }[importance]()
    prune_model(model, config, scores=scores, show_progress=False)
    n = sum(p.numel() for p in model.parameters())
    assert n == count_parameters(source, config) == count_parameters(model.config)
    for i in CONV_LAYERS:
        operator = get_decoder_layers(model)[i].conv
        assert operator.in_proj.weight.shape == (48, 16) and operator.out_proj.weight.shape == (16, 16)
        assert operator.conv.weight.shape[0] == operator.conv.groups == 16
    logits = model(IDS).logits
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    reloaded.eval()
    torch.testing.assert_close(reloaded(IDS).logits, logits, rtol=0, atol=0)
    cached = reloaded.generate(IDS, max_new_tokens=4, do_sample=False, use_cache=True)
    assert torch.equal(cached, reloaded.generate(IDS, max_new_tokens=4, do_sample=False, use_cache=False))


def test_count_terms_describe_the_operator():
    model = tiny_model("lfm2")
    roles = short_conv_channels.count_roles(ARCHITECTURES["lfm2"], get_decoder_layers(model)[0])
    assert roles == {
        "conv.in_proj": ("3h", "h"),
        "conv.conv.weight": ("h", 1, 3),
        "conv.conv": ("h",),
        "conv.out_proj": ("h", "h"),
    }
    assert short_conv_channels.count_sizes({"hidden_size": 24}) == {"3h": 72}


def test_its_target_is_the_hidden_size():
    assert short_conv_channels.FIELDS == ("hidden_size",) and short_conv_channels.CONFIG_FIELDS == ()
    with pytest.raises(ValueError, match="larger than the source model's hidden_size=32"):
        prune_model(tiny_model("lfm2"), PrunedConfig(hidden_size=40), calibration_data=None)
