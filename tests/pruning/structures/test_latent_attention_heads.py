"""`structures/latent_attention_heads.py`: the heads and the latents' ranks of DeepSeek-V3's multi-head latent
attention, pruned with activation, magnitude and random importance (with and without a query latent), reloaded with
stock transformers and counted exactly; a silenced head or latent channel is the one removed, and so is a latent
channel that the up-projection does not read; the latent norm's rescale makes removing a silent channel exact and
keeps a pruned latent's scale; the targets MLA cannot take are refused before any work."""

import copy

import pytest
import torch
from conftest import logits, n_params, random_samples, tiny_model
from transformers import AutoModelForCausalLM

from hf_minitron import PrunedConfig, count_parameters, estimate_importance, prune_model
from hf_minitron.architectures import get_architecture, get_decoder_layers, model_shape
from hf_minitron.pruning.structures import attention_heads, latent_attention_heads, structures_of


NOPE, ROPE, V = 8, 4, 8  # the tiny config's qk_nope_head_dim, qk_rope_head_dim, v_head_dim (conftest.MOE_OVERRIDES)
IDS = torch.arange(3, 19)[None]


def _calibration():
    return dict(calibration_samples=4, calibration_batch_size=4)


def test_deepseek_v3_has_latent_heads_instead_of_grouped_query_heads():
    spec = get_architecture(tiny_model("deepseek_v3").config)
    structures = structures_of(spec)
    assert latent_attention_heads in structures and attention_heads not in structures
    shape = model_shape(tiny_model("deepseek_v3").config)
    assert shape["num_attention_heads"] == 4 and "num_key_value_heads" not in shape  # every head has its own KV
    assert (shape["qk_nope_head_dim"], shape["qk_rope_head_dim"], shape["v_head_dim"]) == (NOPE, ROPE, V)


@pytest.mark.parametrize(
    "importance,q_lora_rank", [("activation", 16), ("magnitude", 16), ("random", 16), ("activation", None)]
)
def test_pruned_heads_reload_with_stock_transformers_count_exactly_and_generate(importance, q_lora_rank, tmp_path):
    model = tiny_model("deepseek_v3", q_lora_rank=q_lora_rank)
    source = copy.deepcopy(model.config)
    config = PrunedConfig(num_attention_heads=2, importance=importance, **_calibration())
    prune_model(model, config, random_samples(4), show_progress=False)

    for layer in get_decoder_layers(model):
        attn = layer.self_attn
        query = attn.q_proj if q_lora_rank is None else attn.q_b_proj
        assert query.out_features == 2 * (NOPE + ROPE)
        assert attn.kv_b_proj.out_features == 2 * (NOPE + V) and attn.o_proj.in_features == 2 * V
        assert attn.kv_a_proj_with_mqa.out_features == source.kv_lora_rank + ROPE  # the latent is every head's
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 2)
    assert all(len(kept) == 2 for kept in model.pruning_record.heads.values())

    fresh = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
    for count in ("total", "active"):
        assert count_parameters(source, config, count=count) == count_parameters(model.config, count=count)
    assert n_params(model) == count_parameters(source, config) == n_params(fresh) < count_parameters(source)

    before = logits(model)
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(logits(reloaded.eval()), before, rtol=0, atol=0)
    cached = reloaded.generate(IDS, max_new_tokens=5, do_sample=False, use_cache=True)
    uncached = reloaded.generate(IDS, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_identity_pruning_keeps_logits_exactly():
    model = tiny_model("deepseek_v3")
    before = logits(model)
    prune_model(model, PrunedConfig(num_attention_heads=4, **_calibration()), random_samples(4), show_progress=False)
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)


def test_a_silenced_head_is_the_one_removed():
    model = tiny_model("deepseek_v3")
    with torch.no_grad():
        for layer in get_decoder_layers(model):  # head 1 reads no key, no value: its o_proj input is zero
            layer.self_attn.kv_b_proj.weight[1 * (NOPE + V) : 2 * (NOPE + V)] = 0
    before = logits(model)
    prune_model(model, PrunedConfig(num_attention_heads=3, **_calibration()), random_samples(4), show_progress=False)
    assert all(kept == [0, 2, 3] for kept in model.pruning_record.heads.values())
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-6)  # it contributed nothing


def test_magnitude_is_the_norm_of_each_heads_rows_and_columns():
    model = tiny_model("deepseek_v3")
    spec, shape = get_architecture(model.config), model_shape(model.config)
    layer = get_decoder_layers(model)[1]
    attn = layer.self_attn
    q = attn.q_b_proj.weight.detach().view(4, NOPE + ROPE, -1).pow(2).sum((1, 2))
    kv = attn.kv_b_proj.weight.detach().view(4, NOPE + V, -1).pow(2).sum((1, 2))
    o = attn.o_proj.weight.detach().view(-1, 4, V).pow(2).sum((0, 2))
    torch.testing.assert_close(latent_attention_heads.magnitude(layer, spec, shape), (q + kv + o).sqrt())


@pytest.mark.parametrize("importance", ["activation", "magnitude", "random"])
def test_latent_ranks_reload_with_stock_transformers_count_exactly_and_generate(importance, tmp_path):
    model = tiny_model("deepseek_v3")  # q_lora_rank 16, kv_lora_rank 12
    source = copy.deepcopy(model.config)
    config = PrunedConfig(q_lora_rank=10, kv_lora_rank=8, importance=importance, **_calibration())
    prune_model(model, config, random_samples(4), show_progress=False)

    for layer in get_decoder_layers(model):
        attn = layer.self_attn
        assert (attn.q_a_proj.out_features, attn.q_b_proj.in_features, attn.q_a_layernorm.weight.numel()) == (10,) * 3
        assert attn.kv_a_proj_with_mqa.out_features == 8 + ROPE  # the rotary key's rows are kept
        assert (attn.kv_b_proj.in_features, attn.kv_a_layernorm.weight.numel()) == (8, 8)
    record = model.pruning_record
    assert all(len(kept) == 10 for kept in record.q_latent.values())
    assert all(len(kept) == 8 for kept in record.kv_latent.values()) and len(record.kv_latent) == 4
    assert n_params(model) == count_parameters(source, config) == count_parameters(model.config)

    before = logits(model)
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert (reloaded.config.q_lora_rank, reloaded.config.kv_lora_rank) == (10, 8)
    torch.testing.assert_close(logits(reloaded.eval()), before, rtol=0, atol=0)
    cached = reloaded.generate(IDS, max_new_tokens=5, do_sample=False, use_cache=True)
    uncached = reloaded.generate(IDS, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def _silence_latent_channel(model, channel: int) -> None:
    with torch.no_grad():
        for layer in get_decoder_layers(model):  # the channel of both latents is always zero
            layer.self_attn.q_a_proj.weight[channel] = 0
            layer.self_attn.kv_a_proj_with_mqa.weight[channel] = 0


def test_a_silenced_latent_channel_is_the_one_removed_exactly():
    model = tiny_model("deepseek_v3")
    _silence_latent_channel(model, 3)
    before = logits(model)
    config = PrunedConfig(q_lora_rank=15, kv_lora_rank=11, **_calibration())
    prune_model(model, config, random_samples(4), show_progress=False)
    record = model.pruning_record
    assert all(kept == [c for c in range(16) if c != 3] for kept in record.q_latent.values())
    assert all(kept == [c for c in range(12) if c != 3] for kept in record.kv_latent.values())
    # The zero channel counted in the norm's mean square: the rescaled norm weights give every token its old scale.
    torch.testing.assert_close(logits(model), before, rtol=1e-4, atol=1e-5)


def test_without_the_norm_rescale_removing_a_silenced_channel_is_not_exact(monkeypatch):
    model = tiny_model("deepseek_v3")
    _silence_latent_channel(model, 3)
    before = logits(model)
    monkeypatch.setattr(latent_attention_heads, "latent_mean_square", lambda *args: None)
    prune_model(model, PrunedConfig(kv_lora_rank=11, **_calibration()), random_samples(4), show_progress=False)
    assert (logits(model) - before).abs().max() > 1e-3


def test_the_mean_square_before_the_latent_norm_is_summed_over_unpadded_tokens():
    model = tiny_model("deepseek_v3")
    samples = random_samples(4)  # of 16, 14, 12 and 10 tokens: padded in one batch
    scores = estimate_importance(model, samples, PrunedConfig(**_calibration()), depth=False, show_progress=False)
    expected = {
        "q_latent": torch.zeros(4, 16, dtype=torch.float64),
        "kv_latent": torch.zeros(4, 12, dtype=torch.float64),
    }
    handles = []
    for index, layer in enumerate(get_decoder_layers(model)):
        for key, norm in (("q_latent", layer.self_attn.q_a_layernorm), ("kv_latent", layer.self_attn.kv_a_layernorm)):

            def hook(module, args, key=key, index=index):
                expected[key][index] += args[0][0].double().pow(2).sum(0)

            handles.append(norm.register_forward_pre_hook(hook))
    with torch.no_grad():
        for sample in samples:  # one at a time: no padding
            model(input_ids=sample["input_ids"][None])
    for handle in handles:
        handle.remove()
    for key, sums in expected.items():
        torch.testing.assert_close(getattr(scores, key)["prenorm_sq"], sums, rtol=1e-5, atol=1e-8)


def _up_projection_inputs(model, ids=IDS) -> list[torch.Tensor]:
    """Per layer, the input of `kv_b_proj`, `[tokens, kv_lora_rank]`."""
    inputs, handles = [], []
    for layer in get_decoder_layers(model):
        hook = lambda module, args: inputs.append(args[0].reshape(-1, args[0].shape[-1]))  # noqa: E731
        handles.append(layer.self_attn.kv_b_proj.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    return inputs


def test_a_latent_channel_read_by_nothing_is_removed_first():
    model = tiny_model("deepseek_v3")
    with torch.no_grad():
        for layer in get_decoder_layers(model):  # channel 5 of both latents: the most active, and read by nothing
            attn = layer.self_attn
            attn.q_a_proj.weight[5] *= 20
            attn.kv_a_proj_with_mqa.weight[5] *= 20
            attn.q_b_proj.weight[:, 5] = 0
            attn.kv_b_proj.weight[:, 5] = 0
    assert all(int(x.abs().mean(0).argmax()) == 5 for x in _up_projection_inputs(model))  # activation would keep it
    config = PrunedConfig(q_lora_rank=15, kv_lora_rank=11, **_calibration())
    prune_model(model, config, random_samples(4), show_progress=False)
    record = model.pruning_record
    assert all(kept == [c for c in range(16) if c != 5] for kept in record.q_latent.values())
    assert all(kept == [c for c in range(12) if c != 5] for kept in record.kv_latent.values())


@pytest.mark.parametrize("importance", ["activation", "magnitude", "random"])
def test_the_norm_rescale_keeps_a_pruned_latents_scale(importance, monkeypatch):
    model = tiny_model("deepseek_v3")
    with torch.no_grad():
        for layer in get_decoder_layers(model):  # every other channel 3x louder: the kept channels' RMS is not the RMS
            layer.self_attn.q_a_proj.weight[::2] *= 3
            layer.self_attn.kv_a_proj_with_mqa.weight[::2] *= 3
    ids = torch.stack([sample["input_ids"] for sample in random_samples(4, ragged=False, seed=1)])
    before, inputs = logits(model, ids), _up_projection_inputs(model, ids)
    config = PrunedConfig(q_lora_rank=8, kv_lora_rank=6, importance=importance, **_calibration())
    rescaled, plain = copy.deepcopy(model), copy.deepcopy(model)
    prune_model(rescaled, config, random_samples(4), show_progress=False)
    monkeypatch.setattr(latent_attention_heads, "latent_mean_square", lambda *args: None)
    prune_model(plain, config, random_samples(4), show_progress=False)
    kept = rescaled.pruning_record.kv_latent
    assert kept == plain.pruning_record.kv_latent

    def scale_errors(pruned) -> list[float]:
        """Per layer, the relative error of the mean squared kept latent at the input of kv_b_proj."""
        after = _up_projection_inputs(pruned, ids)
        return [
            abs(float(x.pow(2).sum(1).mean() / source[:, kept[layer]].pow(2).sum(1).mean()) - 1)
            for layer, (source, x) in enumerate(zip(inputs, after))
        ]

    assert max(scale_errors(rescaled)) < 0.07 and max(scale_errors(rescaled)) < max(scale_errors(plain))
    if importance != "random":  # the loud channels are kept: without the rescale, their RMS shrinks them by ~1.8x
        assert min(scale_errors(plain)) > 0.4
    # The dropped channels dominate the logits' error: the rescale's gain there is small, but a gain.
    assert (logits(rescaled, ids) - before).norm() < (logits(plain, ids) - before).norm()


@pytest.mark.parametrize(
    "targets,match",
    [
        (dict(num_attention_heads=2, num_key_value_heads=1), "num_key_value_heads=1 does not apply"),
        (dict(kv_lora_rank=13), "kv_lora_rank"),
        (dict(num_attention_heads=2, head_merge="query"), "head_merge='query' is not supported"),
        (dict(num_attention_heads=5), "num_attention_heads"),
    ],
)
def test_targets_mla_cannot_take_are_refused_before_any_forward_pass(targets, match):
    model = tiny_model("deepseek_v3")

    def no_forward(module, args):
        raise AssertionError("a forward pass ran before the target was refused")

    model.register_forward_pre_hook(no_forward)
    with pytest.raises(ValueError, match=match):
        prune_model(model, PrunedConfig(**targets, **_calibration()), random_samples(4), show_progress=False)


@pytest.mark.parametrize(
    "model_type,overrides,match",
    [
        ("deepseek_v3", dict(q_lora_rank=None), r"q_lora_rank=8 does not apply.*no query latent"),
        ("llama", {}, r"q_lora_rank=8 does not apply.*no MLA"),
    ],
)
def test_a_query_rank_is_refused_for_a_model_without_a_query_latent(model_type, overrides, match):
    with pytest.raises(ValueError, match=match):
        PrunedConfig(q_lora_rank=8).resolve(tiny_model(model_type, **overrides).config)
