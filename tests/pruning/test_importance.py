import pytest
import torch
import torch.nn.functional as F
from conftest import random_samples, tiny_model

from hf_minitron import ImportanceScores, PrunedConfig, estimate_importance


def _capture(model, samples):
    """Per-sample activations captured with our own hooks: o_proj input, down_proj input, norm outputs, layer I/O."""
    layer = model.model.layers[1]
    captured = {"o": [], "down": [], "attn_norm": [], "mlp_norm": [], "layer_in": [], "layer_out": []}
    hooks = [
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: captured["o"].append(a[0][0])),
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: captured["down"].append(a[0][0])),
        layer.input_layernorm.register_forward_hook(lambda m, a, o: captured["attn_norm"].append(o[0])),
        layer.post_attention_layernorm.register_forward_hook(lambda m, a, o: captured["mlp_norm"].append(o[0])),
        layer.register_forward_pre_hook(lambda m, a, k: captured["layer_in"].append(a[0][0]), with_kwargs=True),
        layer.register_forward_hook(lambda m, a, o: captured["layer_out"].append(o[0])),
    ]
    with torch.no_grad():
        for s in samples:  # one unpadded sample at a time: no masking involved in the reference
            model(input_ids=s["input_ids"][None])
    for h in hooks:
        h.remove()
    return captured


def _seq(x, how):  # x: [S, D]
    if how == "mean":
        return x.abs().mean(0)
    if how == "l2":
        return x.pow(2).sum(0).sqrt()
    return x.var(0, unbiased=False)


def _batch(values, how):  # values: [N, D]
    if how == "l2":
        return values.pow(2).sum(0).sqrt()
    if how == "mean":
        return values.mean(0)
    return values.var(0, unbiased=False)


@pytest.mark.parametrize("seq_agg", ["mean", "l2", "var"])
@pytest.mark.parametrize("batch_agg", ["l2", "mean", "var"])
def test_reductions_match_a_direct_computation(seq_agg, batch_agg):
    model = tiny_model("llama")
    samples = random_samples(6, seq_length=12)  # ragged: padded in batches of 4
    scores = estimate_importance(
        model, samples, PrunedConfig(sequence_aggregation=seq_agg, calibration_batch_size=4), show_progress=False
    )
    cap = _capture(model, samples)
    heads = torch.stack([_seq(x.view(x.shape[0], 4, 8).double().norm(dim=-1), seq_agg) for x in cap["o"]])
    neurons = torch.stack([_seq(x.double(), seq_agg) for x in cap["down"]])
    hidden = _batch(torch.stack([_seq(x.double(), seq_agg) for x in cap["attn_norm"]]), batch_agg) + _batch(
        torch.stack([_seq(x.double(), seq_agg) for x in cap["mlp_norm"]]), batch_agg
    )
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores.head_scores(batch_agg)[1], _batch(heads, batch_agg), **tol)
    torch.testing.assert_close(scores.neuron_scores(batch_agg)[1], _batch(neurons, batch_agg), **tol)
    torch.testing.assert_close(scores.hidden_scores_per_layer(batch_agg)[1], hidden, **tol)
    cos = torch.cat(
        [F.cosine_similarity(a.double(), b.double(), dim=-1) for a, b in zip(cap["layer_in"], cap["layer_out"])]
    )
    torch.testing.assert_close(scores.block_influence[1], 1 - cos.mean(), **tol)
    assert scores.num_samples == 6 and scores.num_tokens == sum(len(s["input_ids"]) for s in samples)


def test_hidden_ranking_is_global_sum_over_layers():
    scores = estimate_importance(tiny_model("llama"), random_samples(4), show_progress=False)
    torch.testing.assert_close(scores.hidden_scores(), scores.hidden_scores_per_layer().sum(0))
    torch.testing.assert_close(scores.hidden_scores(layers=[0, 2]), scores.hidden_scores_per_layer()[[0, 2]].sum(0))
    groups = scores.kv_group_scores()
    torch.testing.assert_close(groups[:, 0], scores.head_scores()[:, :2].norm(dim=-1))


def test_padding_is_excluded_through_the_attention_mask():
    model = tiny_model("llama")
    samples = random_samples(4, ragged=False)
    padded = []
    for s in samples:  # append junk tokens that the mask hides
        ids = torch.cat([s["input_ids"], torch.full((5,), 50)])
        padded.append(
            {"input_ids": ids, "attention_mask": torch.cat([s["attention_mask"], torch.zeros(5, dtype=torch.long)])}
        )
    a = estimate_importance(model, samples, show_progress=False)
    b = estimate_importance(model, padded, show_progress=False)
    for fn in (a.head_scores, a.neuron_scores, a.hidden_scores):
        torch.testing.assert_close(fn(), getattr(b, fn.__name__)(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.block_influence, b.block_influence, rtol=1e-5, atol=1e-6)
    assert a.num_tokens == b.num_tokens


def test_batch_size_and_sample_limit():
    model = tiny_model("llama")
    samples = random_samples(10)
    a = estimate_importance(
        model, samples, PrunedConfig(calibration_batch_size=1, calibration_samples=7), show_progress=False
    )
    b = estimate_importance(model, samples[:7], PrunedConfig(calibration_batch_size=4), show_progress=False)
    assert a.num_samples == b.num_samples == 7
    torch.testing.assert_close(a.neuron_scores(), b.neuron_scores(), rtol=1e-5, atol=1e-6)


def test_accepts_datasets_and_batched_iterables():
    from datasets import Dataset

    model = tiny_model("llama")
    samples = random_samples(4, ragged=False)
    ds = Dataset.from_dict({k: [s[k].tolist() for s in samples] for k in ("input_ids", "attention_mask")})
    batched = [{"input_ids": torch.stack([s["input_ids"] for s in samples])}]
    a = estimate_importance(model, ds, show_progress=False)
    b = estimate_importance(model, batched, show_progress=False)
    torch.testing.assert_close(a.head_scores(), b.head_scores())


def test_empty_or_malformed_data_is_a_clear_error():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="calibration data is empty"):
        estimate_importance(model, [], show_progress=False)
    with pytest.raises(ValueError, match="must be mappings with an 'input_ids'"):
        estimate_importance(model, ["raw text"], show_progress=False)


def test_low_precision_model_accumulates_in_float64():
    model = tiny_model("llama").to(torch.bfloat16)
    scores = estimate_importance(model, random_samples(4), show_progress=False)
    assert scores.heads["sum"].dtype == torch.float64
    assert torch.isfinite(scores.neuron_scores()).all() and (scores.neuron_scores() > 0).all()


def test_save_and_load_round_trip(tmp_path):
    scores = estimate_importance(tiny_model("llama"), random_samples(4), show_progress=False)
    scores.block_losses[2] = [1.0, 2.0, 3.0]
    scores.save(tmp_path)
    loaded = ImportanceScores.load(tmp_path)
    for name in ("head_scores", "neuron_scores", "hidden_scores"):
        assert torch.equal(getattr(scores, name)(), getattr(loaded, name)())
    assert torch.equal(loaded.block_influence, scores.block_influence)
    assert loaded.block_losses == {2: [1.0, 2.0, 3.0]}
    assert loaded.model_shape == scores.model_shape and loaded.num_tokens == scores.num_tokens
    assert not list(tmp_path.glob("*.tmp"))
