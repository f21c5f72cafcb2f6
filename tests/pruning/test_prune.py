import copy
import json

import pytest
import torch
from conftest import ARCHITECTURE_NAMES, INPUT_IDS, _static_scores, logits, n_params, random_samples, tiny_model
from transformers import AutoModelForCausalLM

from hf_minitron import PrunedConfig, load_pruning_record, prune_model
from hf_minitron.architectures import get_decoder_layers


@pytest.mark.parametrize("model_type", ARCHITECTURE_NAMES)
def test_identity_pruning_gives_exactly_the_same_logits(model_type):
    model = tiny_model(model_type)
    reference = logits(model)
    pruned = prune_model(model, PrunedConfig(), random_samples(8), show_progress=False)
    assert torch.equal(logits(pruned), reference)


@pytest.mark.parametrize("model_type", ARCHITECTURE_NAMES)
def test_prune_every_axis_then_reload_with_stock_transformers(model_type, tmp_path):
    model = tiny_model(model_type)
    config = PrunedConfig(hidden_size=24, intermediate_size=40, num_attention_heads=2, num_hidden_layers=3)
    pruned = prune_model(model, config, random_samples(8), show_progress=False)
    assert pruned is model  # in place
    assert type(pruned).__name__ == type(tiny_model(model_type)).__name__
    c = pruned.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers) == (
        24,
        40,
        2,
        2,
        3,
    )
    assert c.head_dim == 8
    expected = logits(pruned)
    pruned.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert (tmp_path / "pruned_config.json").is_file() and (tmp_path / "pruning_record.json").is_file()

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded) is type(pruned)
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=0)
    # Parameter count equals that of a fresh model built from the new config.
    assert n_params(reloaded) == n_params(AutoModelForCausalLM.from_config(reloaded.config)) == n_params(pruned)
    # Cached generation (KV cache indexed by renumbered layer_idx) matches uncached generation.
    prompt = INPUT_IDS[:1, :4]
    cached = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.shape == (1, 10) and torch.equal(cached, uncached)
    # Per-layer config lists follow the layers.
    if getattr(c, "layer_types", None) is not None:
        assert len(reloaded.config.layer_types) == 3


def test_kv_group_pruning_keeps_whole_groups(tmp_path):
    model = tiny_model("llama")  # 4 heads in 2 KV groups
    pruned = prune_model(
        model, PrunedConfig(num_attention_heads=2, num_key_value_heads=1), random_samples(8), show_progress=False
    )
    record = pruned.pruning_record
    for layer in range(4):
        (group,) = record.kv_heads[layer]
        assert record.heads[layer] == [2 * group, 2 * group + 1]  # both query heads of the kept group
    attn = get_decoder_layers(pruned)[0].self_attn
    assert attn.k_proj.weight.shape == (8, 32) and attn.q_proj.weight.shape == (16, 32)
    assert attn.num_key_value_groups == 2
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    torch.testing.assert_close(logits(reloaded), logits(pruned), rtol=0, atol=0)


def test_kept_indices_are_the_top_scores_and_weights_are_the_sliced_originals():
    model = tiny_model("llama")
    original = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    neurons = torch.rand(4, 64, generator=g, dtype=torch.float64)
    heads = torch.rand(4, 4, generator=g, dtype=torch.float64)
    hidden = torch.rand(4, 32, generator=g, dtype=torch.float64)
    scores = _static_scores(model, heads, neurons, hidden)
    prune_model(model, PrunedConfig(intermediate_size=16, num_attention_heads=2, hidden_size=20), scores=scores)
    record = model.pruning_record
    hidden_kept = torch.sort(torch.topk(hidden.sum(0), 20).indices).values
    assert record.hidden == hidden_kept.tolist()
    for layer in range(4):
        kept_neurons = torch.sort(torch.topk(neurons[layer], 16).indices).values
        assert record.neurons[layer] == kept_neurons.tolist()
        # one head per KV group: the better of each pair
        expected_heads = [int(torch.argmax(heads[layer, g * 2 : g * 2 + 2])) + 2 * g for g in range(2)]
        assert record.heads[layer] == expected_heads
        src, dst = get_decoder_layers(original)[layer], get_decoder_layers(model)[layer]
        torch.testing.assert_close(dst.mlp.down_proj.weight, src.mlp.down_proj.weight[hidden_kept][:, kept_neurons])
        torch.testing.assert_close(dst.mlp.up_proj.weight, src.mlp.up_proj.weight[kept_neurons][:, hidden_kept])
        q_rows = torch.cat([torch.arange(h * 8, h * 8 + 8) for h in expected_heads])
        torch.testing.assert_close(dst.self_attn.q_proj.weight, src.self_attn.q_proj.weight[q_rows][:, hidden_kept])
        torch.testing.assert_close(dst.self_attn.o_proj.weight, src.self_attn.o_proj.weight[hidden_kept][:, q_rows])
        torch.testing.assert_close(dst.input_layernorm.weight, src.input_layernorm.weight[hidden_kept])
    torch.testing.assert_close(model.model.embed_tokens.weight, original.model.embed_tokens.weight[:, hidden_kept])
    torch.testing.assert_close(model.lm_head.weight, original.lm_head.weight[:, hidden_kept])
    torch.testing.assert_close(model.model.norm.weight, original.model.norm.weight[hidden_kept])


def test_dropping_named_layers_equals_manual_removal():
    model = tiny_model("qwen2")  # per-layer layer_types in its config
    manual = tiny_model("qwen2", num_hidden_layers=2)
    state = model.state_dict()
    renamed = {}
    for key, value in state.items():
        if ".layers." in key:
            idx = int(key.split(".layers.")[1].split(".")[0])
            if idx in (1, 3):
                continue
            new = {0: 0, 2: 1}[idx]
            key = key.replace(f".layers.{idx}.", f".layers.{new}.")
        renamed[key] = value
    manual.load_state_dict(renamed)
    pruned = prune_model(model, PrunedConfig(layers_to_drop=[1, 3]))
    assert torch.equal(logits(pruned), logits(manual))
    assert [layer.self_attn.layer_idx for layer in get_decoder_layers(pruned)] == [0, 1]
    assert pruned.pruning_record.kept_layers == [0, 2] and pruned.pruning_record.dropped_layers == [1, 3]


@pytest.mark.parametrize("model_type", ["gemma", "gemma2"])
def test_tied_embeddings_stay_tied(model_type, tmp_path):
    model = prune_model(tiny_model(model_type), PrunedConfig(hidden_size=20), random_samples(4), show_progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.embed_tokens.weight.shape == (96, 20)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_head_merge_follows_the_papers_formula():
    model = tiny_model("llama", num_key_value_heads=1)  # one group of 4 heads
    original = copy.deepcopy(model)
    heads = torch.tensor([[0.4, 0.9, 0.1, 0.7]] * 4, dtype=torch.float64)  # ranks: h1 > h3 > h0 > h2
    scores = _static_scores(model, heads=heads)
    prune_model(model, PrunedConfig(num_attention_heads=2, head_merge=True), scores=scores)
    o = original.model.layers[0].self_attn.o_proj.weight.view(32, 4, 8)
    # K=2 kept of L=4: head rank 1 absorbs rank 4, rank 2 absorbs rank 3: head_i + (head_i - head_{2K-i+1}).
    expected = torch.cat([o[:, 1] + (o[:, 1] - o[:, 2]), o[:, 3] + (o[:, 3] - o[:, 0])], dim=1)
    assert model.pruning_record.heads[0] == [1, 3]
    torch.testing.assert_close(model.model.layers[0].self_attn.o_proj.weight, expected)
    unmerged = prune_model(copy.deepcopy(original), PrunedConfig(num_attention_heads=2), scores=scores)
    assert not torch.allclose(unmerged.model.layers[0].self_attn.o_proj.weight, expected)


def test_pruning_record_round_trip_and_deepcopy_saves_the_copy(tmp_path):
    model = prune_model(
        tiny_model("llama"),
        PrunedConfig(intermediate_size=32, num_hidden_layers=3),
        random_samples(8),
        show_progress=False,
    )
    clone = copy.deepcopy(model)
    clone.model.norm.weight.data.fill_(3.0)
    clone.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.all(reloaded.model.norm.weight == 3.0)  # the copy was saved, not the original
    config, record = load_pruning_record(tmp_path)
    assert config == PrunedConfig(intermediate_size=32, num_hidden_layers=3)
    assert record.neurons == model.pruning_record.neurons
    assert record.kept_layers == model.pruning_record.kept_layers
    data = json.loads((tmp_path / "pruning_record.json").read_text())
    assert data["source_shape"]["num_hidden_layers"] == 4 and data["target_shape"]["num_hidden_layers"] == 3


def test_a_dropped_pruned_model_is_freed_at_once_and_pickles():
    import gc
    import pickle
    import weakref

    model = prune_model(
        tiny_model("llama"), PrunedConfig(intermediate_size=32), random_samples(4), show_progress=False
    )
    restored = pickle.loads(pickle.dumps(model))
    assert restored.save_pretrained._model() is restored  # bound to the unpickled model, not the original
    ref = weakref.ref(model)
    gc.disable()  # a reference cycle would be freed only by the collector: prove there is none
    try:
        del model
        assert ref() is None
    finally:
        gc.enable()


def test_reused_scores_give_the_same_result_as_a_fresh_estimate():
    from hf_minitron import estimate_importance

    model = tiny_model("llama")
    data = random_samples(8)
    config = PrunedConfig(hidden_size=20, intermediate_size=24, num_attention_heads=2)
    scores = estimate_importance(model, data, config, show_progress=False)
    a = prune_model(copy.deepcopy(model), config, scores=scores)
    b = prune_model(copy.deepcopy(model), config, data, show_progress=False)
    assert a.pruning_record.neurons == b.pruning_record.neurons and a.pruning_record.hidden == b.pruning_record.hidden
    assert torch.equal(logits(a), logits(b))
    # and one pass serves a second target
    c = prune_model(copy.deepcopy(model), PrunedConfig(intermediate_size=48), scores=scores)
    assert c.config.intermediate_size == 48


def test_scores_from_another_shape_are_refused():
    model = tiny_model("llama")
    scores = _static_scores(tiny_model("llama", hidden_size=48))
    with pytest.raises(ValueError, match="hidden_size=48 in the scores vs 32 in this model"):
        prune_model(model, PrunedConfig(hidden_size=16), scores=scores)


def test_activation_importance_without_data_is_a_clear_error():
    with pytest.raises(ValueError, match="needs calibration_data"):
        prune_model(tiny_model("llama"), PrunedConfig(hidden_size=16))


@pytest.mark.parametrize("importance", ["magnitude", "random"])
def test_baselines_prune_without_data(importance):
    model = prune_model(tiny_model("llama"), PrunedConfig(hidden_size=16, num_hidden_layers=2, importance=importance))
    assert model.config.hidden_size == 16 and model.config.num_hidden_layers == 2
    assert torch.isfinite(logits(model)).all()


def test_shape_that_stock_transformers_rejects_fails_before_any_work():
    model = tiny_model("llama", hidden_size=48, num_attention_heads=6, num_key_value_heads=3)
    calls = []
    data = [dict(s) for s in random_samples(4)]

    class Spy(list):
        def __iter__(self):
            calls.append(1)
            return super().__iter__()

    with pytest.raises(
        ValueError,
        match=r"would not load with stock transformers.*hidden_size=40 .*num_attention_heads=3.*hidden_size=39 or 42",
    ):
        prune_model(model, PrunedConfig(hidden_size=40, num_attention_heads=3), Spy(data))
    assert not calls  # the calibration data was never read
