"""Hybrid Mamba2-attention families (issue 13, Minitron-SSM): Mamba heads and head channels, and every other axis through
layers of different block types."""

import copy

import pytest
import torch
from conftest import HYBRID_PATTERN, random_samples, tiny_config, tiny_model
from transformers import AutoModelForCausalLM

from hf_minitron import ImportanceScores, PrunedConfig, count_parameters, estimate_importance, prune_model
from hf_minitron.architectures import get_architecture, get_decoder_layers
from hf_minitron.pruning.importance import magnitude_importance, random_importance


IDS = torch.arange(3, 19)[None]
MAMBA_LAYERS = [i for i, kind in enumerate(HYBRID_PATTERN) if kind == "linear_attention"]  # [0, 3]


def _calibration():
    return dict(calibration_samples=8, calibration_batch_size=4, depth_calibration_samples=4)


AXES = {
    "mamba_heads": {"mamba_num_heads": 4},
    "mamba_head_dim": {"mamba_head_dim": 2},
    "mamba_group_blind": {"mamba_num_heads": 6, "mamba_group_aware": False},
    "hidden": {"hidden_size": 24},
    "mlp": {"intermediate_size": 40},
    "heads": {"num_attention_heads": 2, "num_key_value_heads": 1},
    "depth": {"layers_to_drop": [2, 3]},
    "all": {
        "mamba_num_heads": 4,
        "mamba_head_dim": 3,
        "hidden_size": 24,
        "intermediate_size": 40,
        "num_attention_heads": 2,
        "num_hidden_layers": 4,
        "depth_method": "block_influence",
    },
}


@pytest.mark.parametrize("axis", list(AXES))
def test_prune_axis_reloads_with_stock_transformers_and_generates(axis, tmp_path):
    model = tiny_model("nemotron_h")
    source = copy.deepcopy(model.config)
    config = PrunedConfig(**AXES[axis], **_calibration())
    prune_model(model, config, random_samples(8), show_progress=False)
    record = model.pruning_record

    # Exact counts: the layers that depth pruning dropped decide the block types that remain.
    n = sum(p.numel() for p in model.parameters())
    target = {**AXES[axis], "num_hidden_layers": None, "layers_to_drop": record.dropped_layers or None}
    assert n == count_parameters(source, PrunedConfig(**target)) < count_parameters(source)
    assert count_parameters(source) == sum(p.numel() for p in tiny_model("nemotron_h").parameters())
    fresh = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
    assert sum(p.numel() for p in fresh.parameters()) == n
    assert model.config.layers_block_type == [HYBRID_PATTERN[i] for i in record.kept_layers]
    assert model.config.num_hidden_layers == len(record.kept_layers)
    for name in ("mamba_num_heads", "mamba_head_dim", "hidden_size", "intermediate_size", "num_attention_heads"):
        if AXES[axis].get(name):
            assert getattr(model.config, name) == AXES[axis][name]

    logits = model(IDS).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(reloaded(IDS).logits, logits, rtol=0, atol=0)
    # The Mamba cache (conv and SSM states) of the pruned mixers: cached generation equals uncached.
    cached = reloaded.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = reloaded.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)

    mamba_layers = [new for new, src in enumerate(record.kept_layers) if HYBRID_PATTERN[src] == "linear_attention"]
    if config.mamba_num_heads or config.mamba_head_dim:
        assert sorted(record.mamba_heads) == mamba_layers
        assert all(len(kept) == model.config.mamba_num_heads for kept in record.mamba_heads.values())
        assert all(len(kept) == model.config.mamba_head_dim for kept in record.mamba_head_channels.values())
    if config.intermediate_size:
        assert sorted(record.neurons) == [n for n, s in enumerate(record.kept_layers) if HYBRID_PATTERN[s] == "mlp"]


def test_identity_pruning_keeps_logits_exactly():
    model = tiny_model("nemotron_h")
    before = model(IDS).logits
    c = model.config
    same = PrunedConfig(
        mamba_num_heads=c.mamba_num_heads,
        mamba_head_dim=c.mamba_head_dim,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        **_calibration(),
    )
    prune_model(model, same, random_samples(8), show_progress=False)
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)


def _out_proj_inputs(model, samples):
    """Per Mamba layer, `[samples, heads * head_dim]`: each sample's mean |out_proj input| over its tokens."""
    layers = get_decoder_layers(model)
    seen = {i: [] for i in MAMBA_LAYERS}
    handles = [
        layers[i].mixer.out_proj.register_forward_pre_hook(lambda m, args, i=i: seen[i].append(args[0][0]))
        for i in MAMBA_LAYERS
    ]
    with torch.no_grad():
        for sample in samples:  # one at a time: no padding
            model(input_ids=sample["input_ids"][None])
    for handle in handles:
        handle.remove()
    return {i: torch.stack([y.abs().mean(0).double() for y in ys]) for i, ys in seen.items()}


def test_group_aware_selection_equals_a_direct_computation():
    """Minitron-SSM's nested selection, computed here with plain torch: channels by L2 over heads, then heads by L2 over
    the kept channels, the top 2 of each group's 4 heads."""
    model = tiny_model("nemotron_h")
    original = copy.deepcopy(model)
    samples = random_samples(8)
    scores = estimate_importance(model, samples, PrunedConfig(**_calibration()), show_progress=False)
    prune_model(model, PrunedConfig(mamba_num_heads=4, mamba_head_dim=3), scores=scores)
    record = model.pruning_record
    per_sample = _out_proj_inputs(original, samples)
    for layer in MAMBA_LAYERS:
        statistic = per_sample[layer].pow(2).sum(0).sqrt().view(8, 4)  # batch L2, as [heads, head_dim]
        torch.testing.assert_close(scores.mamba_head_scores()[layer], statistic.norm(dim=1), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(scores.mamba_head_dim_scores()[layer], statistic.norm(dim=0), rtol=1e-4, atol=1e-7)
        channels = torch.sort(torch.topk(statistic.norm(dim=0), 3).indices).values
        heads = statistic[:, channels].norm(dim=1)
        expected = [sorted((torch.topk(heads[g * 4 : g * 4 + 4], 2).indices + g * 4).tolist()) for g in range(2)]
        assert record.mamba_head_channels[layer] == channels.tolist()
        assert record.mamba_heads[layer] == expected[0] + expected[1]  # 2 heads from each B/C group

        # Every per-head tensor follows: rows [z, x, B, C, dt] of in_proj, conv channels [x, B, C], A/D/dt_bias, the
        # gated norm and out_proj's columns; B and C stay whole.
        src, dst = get_decoder_layers(original)[layer].mixer, get_decoder_layers(model)[layer].mixer
        kept_heads = torch.tensor(record.mamba_heads[layer])
        inner = (kept_heads[:, None] * 4 + channels[None, :]).reshape(-1)
        b_c = torch.arange(32)  # 2 groups x state 8, for B and C
        rows = torch.cat([inner, inner + 32, b_c + 64, kept_heads + 96])
        torch.testing.assert_close(dst.in_proj.weight, src.in_proj.weight[rows], rtol=0, atol=0)
        torch.testing.assert_close(dst.conv1d.weight, src.conv1d.weight[torch.cat([inner, b_c + 32])], rtol=0, atol=0)
        torch.testing.assert_close(dst.conv1d.bias, src.conv1d.bias[torch.cat([inner, b_c + 32])], rtol=0, atol=0)
        for name in ("A_log", "D", "dt_bias"):
            torch.testing.assert_close(getattr(dst, name), getattr(src, name)[kept_heads], rtol=0, atol=0)
        torch.testing.assert_close(dst.norm.weight, src.norm.weight[inner], rtol=0, atol=0)
        torch.testing.assert_close(dst.out_proj.weight, src.out_proj.weight[:, inner], rtol=0, atol=0)
        assert dst.norm.group_size == 6 and dst.conv_dim == 12 + 32 and dst.num_heads == 4 and dst.head_dim == 3


def _scores_with_mamba(model, mamba):
    """Random scores of `model` whose Mamba statistic is `mamba` (`[layers, heads * head_dim]`)."""
    scores = random_importance(model.config)
    scores.mamba = {"score": mamba.double()}
    return scores


def test_group_blind_baseline_takes_the_top_heads_overall():
    """When group 0 holds the 4 best heads, the group-blind baseline keeps them all (group 1's B/C then serves two of
    them), the group-aware selection keeps 2 per group."""
    model = tiny_model("nemotron_h")
    head_values = torch.tensor([8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    mamba = head_values.repeat_interleave(4).expand(5, 32)
    blind = prune_model(
        copy.deepcopy(model),
        PrunedConfig(mamba_num_heads=4, mamba_group_aware=False),
        scores=_scores_with_mamba(model, mamba),
    )
    aware = prune_model(copy.deepcopy(model), PrunedConfig(mamba_num_heads=4), scores=_scores_with_mamba(model, mamba))
    assert blind.pruning_record.mamba_heads[0] == [0, 1, 2, 3]
    assert aware.pruning_record.mamba_heads[0] == [0, 1, 4, 5]
    assert torch.isfinite(blind(IDS).logits).all()


def test_statistics_rows_of_layers_without_the_block_stay_zero():
    model = tiny_model("nemotron_h")
    scores = estimate_importance(model, random_samples(8), PrunedConfig(**_calibration()), show_progress=False)
    for i, kind in enumerate(HYBRID_PATTERN):
        assert bool(scores.mamba["sum"][i].any()) == (kind == "linear_attention")
        assert bool(scores.heads["sum"][i].any()) == (kind == "full_attention")
        assert bool(scores.neurons["sum"][i].any()) == (kind == "mlp")
        # hidden slot 0 reads the sequence mixer's input norm, slot 1 the feed-forward block's
        assert bool(scores.hidden["sum"][i, 0].any()) == (kind != "mlp")
        assert bool(scores.hidden["sum"][i, 1].any()) == (kind == "mlp")
    assert (scores.block_influence != 0).all()


@pytest.mark.parametrize("importance", ["magnitude", "random"])
def test_baselines_prune_hybrids(importance, tmp_path):
    model = tiny_model("nemotron_h")
    config = PrunedConfig(
        mamba_num_heads=4,
        mamba_head_dim=2,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=4,
        importance=importance,
    )
    prune_model(model, config, show_progress=False)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    torch.testing.assert_close(reloaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)
    if importance == "magnitude":
        scores = magnitude_importance(tiny_model("nemotron_h"))
        assert [bool(row.any()) for row in scores.mamba["score"]] == [k == "linear_attention" for k in HYBRID_PATTERN]


def test_contiguous_depth_keeps_the_hybrid_pattern_and_the_mamba_scores_round_trip(tmp_path):
    model = tiny_model("nemotron_h")
    samples = random_samples(8)
    scores = estimate_importance(model, samples, PrunedConfig(**_calibration()), show_progress=False)
    scores.save(tmp_path / "scores")
    loaded = ImportanceScores.load(tmp_path / "scores")
    torch.testing.assert_close(loaded.mamba_head_scores(), scores.mamba_head_scores())
    # LM-loss scoring of contiguous blocks skips layers with stand-ins that keep each layer's block_type.
    config = PrunedConfig(num_hidden_layers=3, mamba_num_heads=6, **_calibration())
    prune_model(model, config, samples, scores=loaded, show_progress=False)
    record = model.pruning_record
    assert len(record.dropped_layers) == 2 and record.dropped_layers[1] == record.dropped_layers[0] + 1
    assert model.config.layers_block_type == [HYBRID_PATTERN[i] for i in record.kept_layers]
    assert [layer.layer_idx for layer in get_decoder_layers(model)] == [0, 1, 2]
    assert [getattr(layer.mixer, "layer_idx", i) for i, layer in enumerate(get_decoder_layers(model))] == [0, 1, 2]


@pytest.mark.parametrize(
    "model_type,fields,message",
    [
        ("nemotron_h", {"mamba_num_heads": 5}, "not a multiple of the model's n_groups=2.*e.g. 4 or 6"),
        ("nemotron_h", {"mamba_num_heads": 10}, "larger than the source model's mamba_num_heads=8"),
        ("nemotron_h", {"mamba_head_dim": 0}, "mamba_head_dim=0 is invalid: expected a positive integer"),
        ("nemotron_h", {"mamba_head_dim": 5}, "larger than the source model's mamba_head_dim=4"),
        ("nemotron_h", {"mamba_group_aware": "yes"}, "mamba_group_aware='yes' is invalid: expected true or false"),
        ("nemotron_h", {"layers_to_drop": [1]}, r"removes every attention layer \(\[1\]\)"),
        ("llama", {"mamba_num_heads": 2}, "has no Mamba layers.*nemotron_h"),
    ],
)
def test_bad_hybrid_targets_are_refused_before_any_work(model_type, fields, message):
    with pytest.raises(ValueError, match=message):
        prune_model(tiny_model(model_type), PrunedConfig(**fields), calibration_data=None)


def test_unsupported_block_types_and_uncountable_depth_are_clear_errors():
    # Every Nemotron-H block type has its structures now (MoE too); a block type of a later release would not.
    future = tiny_config(
        "nemotron_h", layers_block_type=["linear_attention", "mlp", "full_attention"], num_hidden_layers=3
    )
    future.layers_block_type = ["linear_attention", "conv", "full_attention"]
    with pytest.raises(ValueError, match=r"layers_block_type \['conv'\] \(layers \[1\]\) is not supported"):
        get_architecture(future)
    config = tiny_model("nemotron_h").config
    with pytest.raises(ValueError, match="from the config alone.*layers_to_drop"):
        count_parameters(config, PrunedConfig(num_hidden_layers=3))
