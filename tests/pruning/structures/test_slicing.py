"""`structures/slicing.py`: the in-place slicing primitives every structure uses (one `index_select`, the old tensor
dropped), checked tensor for tensor against the originals."""

import weakref

import pytest
import torch
from torch import nn

from hf_minitron.pruning.structures.slicing import (
    head_rows,
    replace_parameter,
    slice_linear,
    slice_norm,
    slice_parameter,
    submodule,
    topk_sorted,
)


def _linear(bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(6, 5, bias=bias)


# ---------------------------------------------------------------------------------------------- topk_sorted
def test_topk_sorted_keeps_the_largest_in_index_order():
    scores = torch.tensor([0.3, 0.9, 0.1, 0.7, 0.5])
    assert topk_sorted(scores, 3).tolist() == [1, 3, 4]
    assert topk_sorted(scores, 1).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        scores = torch.rand(40, generator=g)
        kept = topk_sorted(scores, 13)
        assert kept.tolist() == sorted(torch.argsort(scores, descending=True)[:13].tolist())
        assert scores[kept].min() >= scores[[i for i in range(40) if i not in set(kept.tolist())]].max()


@pytest.mark.parametrize("k", [4, 5, 9])
def test_topk_sorted_keeping_everything_is_the_identity(k):
    assert torch.equal(topk_sorted(torch.tensor([0.3, 0.9, 0.1, 0.7]), k), torch.arange(4))


def test_topk_sorted_never_keeps_a_dead_unit():
    scores = torch.tensor([0.5, 0.0, 0.2, 0.4])  # unit 1 is dead (zero score)
    assert 1 not in topk_sorted(scores, 3).tolist()


# ---------------------------------------------------------------------------------------------- parameters
def test_replace_parameter_keeps_requires_grad_and_makes_the_value_contiguous():
    linear = _linear()
    linear.weight.requires_grad_(False)
    replace_parameter(linear, "weight", torch.ones(6, 5).t())  # a transposed (non-contiguous) view
    assert isinstance(linear.weight, nn.Parameter) and not linear.weight.requires_grad
    assert linear.weight.is_contiguous() and torch.equal(linear.weight, torch.ones(5, 6))
    replace_parameter(linear, "bias", torch.zeros(5))
    assert linear.bias.requires_grad


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_slice_parameter_keeps_the_index_along_any_dim_of_a_3d_tensor(dim):
    module = nn.Module()
    original = torch.randn(4, 5, 6)
    module.fused = nn.Parameter(original.clone())
    index = torch.tensor([3, 0]) if dim == 0 else torch.tensor([1, 4])
    slice_parameter(module, "fused", index, dim)
    assert torch.equal(module.fused, original.index_select(dim, index))


# ---------------------------------------------------------------------------------------------- linear layers
def test_slice_linear_keeps_output_rows_and_their_bias():
    linear = _linear()
    weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
    rows = torch.tensor([0, 2, 4])
    x = torch.randn(3, 6)
    full = linear(x).detach()
    slice_linear(linear, out_index=rows)
    assert torch.equal(linear.weight, weight[rows]) and torch.equal(linear.bias, bias[rows])
    assert (linear.out_features, linear.in_features) == (3, 6)
    torch.testing.assert_close(linear(x), full[:, rows])


def test_slice_linear_keeps_input_columns_and_the_whole_bias():
    linear = _linear()
    weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
    cols = torch.tensor([1, 3, 5])
    x = torch.randn(3, 6)
    x[:, [0, 2, 4]] = 0  # the dropped inputs carry nothing: the sliced layer computes the same output
    full = linear(x).detach()
    slice_linear(linear, in_index=cols)
    assert torch.equal(linear.weight, weight[:, cols]) and torch.equal(linear.bias, bias)
    assert (linear.out_features, linear.in_features) == (5, 3)
    torch.testing.assert_close(linear(x[:, cols]), full)


def test_slice_linear_rows_and_columns_at_once_without_a_bias():
    linear = _linear(bias=False)
    weight = linear.weight.detach().clone()
    rows, cols = torch.tensor([4, 1]), torch.tensor([0, 5])
    slice_linear(linear, out_index=rows, in_index=cols)
    assert torch.equal(linear.weight, weight[rows][:, cols]) and linear.bias is None
    assert linear(torch.randn(2, 2)).shape == (2, 2)


def test_slice_linear_frees_the_old_weight():
    linear = _linear()
    old = weakref.ref(linear.weight)
    slice_linear(linear, out_index=torch.tensor([0, 1]), in_index=torch.tensor([2, 3]))
    assert old() is None  # freed at once (no reference, no cycle): no second copy of the weight stays alive


def test_keeping_every_row_and_column_is_exact():
    linear = _linear()
    x = torch.randn(4, 6)
    before = linear(x).detach()
    slice_linear(linear, out_index=torch.arange(5), in_index=torch.arange(6))
    assert torch.equal(linear(x), before)


# ---------------------------------------------------------------------------------------------- norms
def test_slice_norm_layer_norm_weight_bias_and_normalized_shape():
    norm = nn.LayerNorm(6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(6.0))
        norm.bias.copy_(-torch.arange(6.0))
    kept = torch.tensor([1, 4, 5])
    slice_norm(norm, kept)
    assert norm.weight.tolist() == [1.0, 4.0, 5.0] and norm.bias.tolist() == [-1.0, -4.0, -5.0]
    assert norm.normalized_shape == (3,)
    assert norm(torch.randn(2, 3)).shape == (2, 3)


def test_slice_norm_of_a_transformers_rms_norm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(6.0))
    slice_norm(norm, torch.tensor([0, 3]))
    assert norm.weight.tolist() == [0.0, 3.0]
    assert norm(torch.randn(2, 2)).shape == (2, 2)


def test_slice_norm_of_a_torch_rms_norm():
    norm = nn.RMSNorm(6)
    slice_norm(norm, torch.tensor([0, 3]))
    assert norm(torch.randn(2, 2)).shape == (2, 2)


# ---------------------------------------------------------------------------------------------- indices, paths
def test_head_rows_are_whole_heads_in_order_with_an_offset():
    assert head_rows(torch.tensor([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]
    assert head_rows(torch.tensor([1]), 4, offset=10).tolist() == [14, 15, 16, 17]
    assert head_rows(torch.arange(3), 2).tolist() == list(range(6))


def test_submodule_follows_a_dotted_path_and_none():
    root = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    assert submodule(root, "0.1") is root[0][1]
    assert submodule(root, None) is None
