"""`structures/statistics.py`: per-sample reductions over unmasked tokens, float64 running sums, and their reductions
over samples or routed tokens, checked against direct computations and their documented identities."""

import pytest
import torch

from hf_minitron.pruning.structures.statistics import (
    add_per_sample,
    add_sums,
    per_token_mean,
    reduce_per_sample,
    sequence_reduce,
    zeros_like,
)


HOWS = ["mean", "l2", "var"]


def _batch(seed: int = 0):
    """`[4, 6, 3]` activations and a right-padding mask of lengths 6, 4, 5, 2."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 6, 3, generator=g)
    mask = torch.zeros(4, 6)
    for i, length in enumerate([6, 4, 5, 2]):
        mask[i, :length] = 1
    return x, mask


def _direct(x, mask, how):
    """Per-sample values computed one sample at a time on its unmasked tokens only."""
    rows = []
    for sample, m in zip(x.double(), mask.bool()):
        tokens = sample[m]
        if how == "mean":
            rows.append(tokens.abs().mean(0))
        elif how == "l2":
            rows.append(tokens.pow(2).sum(0).sqrt())
        else:
            rows.append(tokens.var(0, unbiased=False))
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------- sequence_reduce
@pytest.mark.parametrize("how", HOWS)
def test_sequence_reduce_equals_a_per_sample_computation_over_unmasked_tokens(how):
    x, mask = _batch()
    torch.testing.assert_close(sequence_reduce(x, mask, how).double(), _direct(x, mask, how), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how", HOWS)
def test_padded_positions_do_not_count(how):
    x, mask = _batch()
    junk = x.clone()
    junk[mask == 0] = 1e4  # whatever sits under the padding
    assert torch.equal(sequence_reduce(junk, mask, how), sequence_reduce(x, mask, how))


@pytest.mark.parametrize("how", HOWS)
def test_no_mask_means_every_token_counts(how):
    x, _ = _batch()
    torch.testing.assert_close(sequence_reduce(x, None, how), sequence_reduce(x, torch.ones(4, 6), how))


def test_variance_is_never_negative_and_an_empty_sample_is_zero():
    x = torch.full((2, 5, 3), 0.7)  # constant tokens: in float32 sum(x^2)/n - mean^2 rounds to -3e-8 here
    mask = torch.ones(2, 5)
    mask[1] = 0  # a sample without any unmasked token
    values = sequence_reduce(x, mask, "var")
    assert torch.equal(values[0], torch.zeros(3))
    for how in HOWS:
        out = sequence_reduce(x, mask, how)
        assert torch.isfinite(out).all() and torch.equal(out[1], torch.zeros(3))


# ---------------------------------------------------------------------------------------------- running sums
@pytest.mark.parametrize("how", HOWS)
def test_accumulating_over_batches_equals_one_pass_over_all(how):
    x, mask = _batch()
    whole, parts = {}, {}
    add_per_sample(whole, x, mask, how)
    add_per_sample(parts, x[:1], mask[:1], how)
    add_per_sample(parts, x[1:3], mask[1:3], how)
    add_per_sample(parts, x[3:], mask[3:], how)
    assert whole.keys() == parts.keys() == {"sum", "sumsq"}
    for name in whole:
        torch.testing.assert_close(parts[name], whole[name], rtol=1e-12, atol=1e-12)
    values = _direct(x, mask, how)
    torch.testing.assert_close(whole["sum"], values.sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole["sumsq"], values.pow(2).sum(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_running_sums_are_float64_whatever_the_activations(dtype):
    x, mask = _batch()
    store = {}
    add_per_sample(store, x.to(dtype), mask, "mean")
    add_per_sample(store, x.to(dtype), None, "l2")
    assert all(value.dtype == torch.float64 for value in store.values())


def test_float64_sums_keep_small_additions_to_a_large_total():
    store = {}
    add_sums(store, {"sum": torch.tensor([2.0**25], dtype=torch.float32)})
    for _ in range(8):
        add_sums(store, {"sum": torch.tensor([1.0], dtype=torch.float32)})  # lost in float32 (ulp 4 at 2^25)
    assert store["sum"].item() == 2.0**25 + 8


def test_add_sums_copies_the_first_value_then_adds_in_place():
    value = torch.ones(3, dtype=torch.float64)
    store = {}
    add_sums(store, {"count": value})
    value += 10  # the caller's tensor is not the store's
    assert store["count"].tolist() == [1.0, 1.0, 1.0]
    kept = store["count"]
    add_sums(store, {"count": torch.tensor([1.0, 2.0, 3.0])})
    assert store["count"] is kept and kept.tolist() == [2.0, 3.0, 4.0]


def test_zeros_like_makes_float64_zero_sums_of_the_given_shapes():
    store = {}
    zeros_like(store, "cpu", sum=(4, 3), count=(4,))
    assert store["sum"].shape == (4, 3) and store["count"].shape == (4,)
    assert all(t.dtype == torch.float64 and not t.any() for t in store.values())


# ---------------------------------------------------------------------------------------------- reductions
def test_reduce_per_sample_l2_mean_var_over_samples():
    g = torch.Generator().manual_seed(1)
    values = torch.rand(7, 5, generator=g, dtype=torch.float64)  # 7 samples' per-sample values
    stats = {"sum": values.sum(0), "sumsq": values.pow(2).sum(0)}
    torch.testing.assert_close(reduce_per_sample(stats, "l2", 7), values.norm(dim=0))
    torch.testing.assert_close(reduce_per_sample(stats, "mean", 7), values.mean(0))
    torch.testing.assert_close(reduce_per_sample(stats, "var", 7), values.var(0, unbiased=False))


def test_reduce_per_sample_without_samples_and_static_scores():
    zero = {"sum": torch.zeros(3, dtype=torch.float64), "sumsq": torch.zeros(3, dtype=torch.float64)}
    for how in HOWS:
        assert torch.equal(reduce_per_sample(zero, how, 0), torch.zeros(3, dtype=torch.float64))
    score = torch.tensor([0.5, 0.25], dtype=torch.float32)
    out = reduce_per_sample({"score": score}, "var", 3)
    assert out.dtype == torch.float64 and out.tolist() == [0.5, 0.25]


def test_per_token_mean_divides_by_each_experts_count_and_leaves_unrouted_ones_at_zero():
    sums = torch.tensor([[[2.0, 4.0], [0.0, 0.0], [9.0, 3.0]]], dtype=torch.float64)  # [layers, experts, width]
    count = torch.tensor([[2.0, 0.0, 3.0]], dtype=torch.float64)
    out = per_token_mean({"sum": sums, "count": count}, "sum")
    assert out.tolist() == [[[1.0, 2.0], [0.0, 0.0], [3.0, 1.0]]]
    flat = per_token_mean({"norm": sums[..., 0], "count": count}, "norm")  # same-rank statistic
    assert flat.tolist() == [[1.0, 0.0, 3.0]]
    static = torch.tensor([[0.1, 0.2]])
    assert torch.equal(per_token_mean({"score": static}, "sum"), static.double())


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("masked", [True, False])
def test_a_scale_gives_the_statistics_of_the_scaled_activations(how, masked):
    x, mask = _batch(2)
    mask = mask if masked else None
    scale = torch.tensor([0.0, 0.5, 3.0])
    scaled, direct = {}, {}
    add_per_sample(scaled, x, mask, how, scale=scale)
    add_per_sample(direct, x * scale, mask, how)
    for name in ("sum", "sumsq"):
        torch.testing.assert_close(scaled[name], direct[name], rtol=1e-5, atol=1e-6)
