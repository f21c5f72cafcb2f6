"""Where the model runs: the process group, the input device, and handing freed memory back to the OS.

Shared by the importance pass (`importance.py`) and depth scoring (`structures/layers.py`).
"""

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


def return_large_buffers_to_os() -> None:
    """Makes glibc serve allocations of 1 MiB and more with mmap, so activation and weight buffers go back to the OS
    when freed. With glibc's default (a threshold that grows after the first large free), the activations of the
    calibration passes stay cached in the heap and the process's peak grows by ~40% of the model. No-op off glibc."""
    try:
        _libc().mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD; a fixed value also turns off the dynamic adjustment
    except (OSError, AttributeError):
        pass


def release_freed_memory() -> None:
    """Hands free heap pages back to the OS (glibc `malloc_trim`). Weights dropped by pruning are freed in many
    small blocks that glibc keeps cached; without this, the next large allocation (the sliced embedding) is charged on
    top of them and the pruning peak grows by the size of the dropped layers. No-op off glibc."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass
