"""Where the model runs: the process group, the input device, and handing freed memory back to the OS.

Shared by the importance pass (`pruning/importance.py`) and depth scoring (`pruning/structures/depth.py`).
"""

from contextlib import contextmanager

import torch
from torch import nn


def dist_info() -> tuple[int, int]:
    """`(rank, world_size)`, `(0, 1)` outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_reduce_(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sums `tensor` over processes (no-op with one process); returns it on the CPU."""
    _, world_size = dist_info()
    if world_size > 1:
        backend = torch.distributed.get_backend()
        moved = tensor.to(device if backend == "nccl" else "cpu")
        torch.distributed.all_reduce(moved)
        tensor = moved
    return tensor.cpu()


def input_device(model: nn.Module) -> torch.device:
    """Where the input ids go. Under accelerate's dispatch/offload hooks (device_map="auto", cpu_offload,
    disk_offload) the embedding weight may sit on `meta` or the CPU; its hook knows the device it runs on."""
    embed = model.get_input_embeddings()
    hook = getattr(embed, "_hf_hook", None)
    for h in getattr(hook, "hooks", [hook]):
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return embed.weight.device


def _libc():
    import ctypes
    import ctypes.util

    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


# glibc's static mmap threshold after slicing: its dynamic threshold grows up to this (DEFAULT_MMAP_THRESHOLD_MAX on
# 64-bit), and setting any value turns the dynamic adjustment off for good.
_MMAP_THRESHOLD_AFTER = 32 << 20


@contextmanager
def large_buffers_returned_to_os():
    """While the weights are sliced, glibc serves allocations of 1 MiB and more with mmap, so each weight buffer goes
    back to the OS as soon as it is freed, and the pruning peak stays near the model's size. Only then: mmap'ed buffers
    are page-faulted in on every allocation, which makes forward passes 28% slower on SmolLM2 (1 thread, 16 x 256
    tokens: 14.3 s vs 11.1 s), so the importance pass, depth scoring and any training after pruning run with glibc's
    usual heap (the threshold is left at 32 MiB). No-op off glibc."""
    try:
        libc = _libc()
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        libc = None
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(-3, _MMAP_THRESHOLD_AFTER)
        release_freed_memory()


def release_freed_memory() -> None:
    """Hands free heap pages back to the OS (glibc `malloc_trim`). Weights dropped by pruning are freed in many
    small blocks that glibc keeps cached; without this, the next large allocation (the sliced embedding) is charged on
    top of them and the pruning peak grows by the size of the dropped layers. No-op off glibc."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass
