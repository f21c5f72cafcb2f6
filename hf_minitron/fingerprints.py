"""Fingerprints of model weights: tell two models (a teacher before and after correction, scores' source and the
model being pruned) apart cheaply, without reading every weight of a large model."""

import hashlib

import torch


def _sampled_values(tensor: torch.Tensor, count: int = 1024) -> bytes:
    flat = tensor.detach().reshape(-1)
    if flat.numel() > 3 * count:
        flat = torch.cat([flat[:count], flat[:: flat.numel() // count][:count], flat[-count:]])
    # Rounded to bf16: the same weights loaded in fp32, bf16 or fp16 have the same fingerprint.
    return flat.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes()


def weights_fingerprint(model) -> str | None:
    """A hash of the parameter names, shapes and 3072 values of each tensor (first, strided, last); `None` when some
    weights are not in the model (accelerate's CPU/disk offload keeps them in its hooks, `meta` in the model).

    Any training changes it; loading the same weights in another dtype does not.
    """
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.device.type == "meta":
            return None
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(_sampled_values(param))
    return digest.hexdigest()[:16]
