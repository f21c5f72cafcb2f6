"""In-place slicing primitives shared by every structure.

Each keeps some rows / columns of an existing parameter with one `index_select` into a smaller tensor and drops the
old one, so pruning never holds a second copy of the model.
"""

import torch
from torch import nn


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in ascending index order (keeps the original order of what is kept)."""
    if k >= scores.numel():
        return torch.arange(scores.numel())
    return torch.sort(torch.topk(scores, k, sorted=False).indices).values


def replace_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def slice_parameter(module: nn.Module, name: str, index: torch.Tensor, dim: int) -> None:
    """Keeps `index` along `dim` of the parameter `module.<name>` (any rank: fused 3-D expert tensors too)."""
    param = getattr(module, name)
    replace_parameter(module, name, param.data.index_select(dim, index.to(param.device)))


def slice_linear(linear: nn.Linear, out_index: torch.Tensor | None = None, in_index: torch.Tensor | None = None):
    """Keeps the given output rows / input columns of `linear` (the old weight is freed: no second copy)."""
    weight = linear.weight.data
    if out_index is not None:
        weight = weight.index_select(0, out_index.to(weight.device))
        if linear.bias is not None:
            replace_parameter(linear, "bias", linear.bias.data.index_select(0, out_index.to(weight.device)))
        linear.out_features = weight.shape[0]
    if in_index is not None:
        weight = weight.index_select(1, in_index.to(weight.device))
        linear.in_features = weight.shape[1]
    replace_parameter(linear, "weight", weight)


def slice_norm(norm: nn.Module, index: torch.Tensor) -> None:
    """Slices a (RMS/Layer)Norm over the hidden size: weight, bias, and the `normalized_shape` that torch's own
    `LayerNorm` and `RMSNorm` check the weight against."""
    for name in ("weight", "bias"):
        param = getattr(norm, name, None)
        if isinstance(param, nn.Parameter):
            replace_parameter(norm, name, param.data.index_select(0, index.to(param.device)))
    if isinstance(norm, (nn.LayerNorm, nn.RMSNorm)):
        norm.normalized_shape = (index.numel(),)


def head_rows(heads: torch.Tensor, head_dim: int, offset: int = 0) -> torch.Tensor:
    """Row indices of whole heads in a projection laid out as `[heads * head_dim]`."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1) + offset


def submodule(root: nn.Module, path: str | None) -> nn.Module | None:
    """`root.a.b` for `path="a.b"`; `None` for a `None` path."""
    return None if path is None else root.get_submodule(path)
