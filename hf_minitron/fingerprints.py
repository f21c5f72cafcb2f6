"""Fingerprints: tell two models (a teacher before and after correction, scores' source and the model being pruned)
or two input files apart cheaply, without reading every weight of a large model."""

import hashlib
import os
from pathlib import Path

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


# Files up to this size are hashed whole (data files, configs, small checkpoints: well under a second); larger ones by
# `_SAMPLES` blocks at evenly spaced offsets, first and last included, plus their modification time.
_WHOLE, _BLOCK, _SAMPLES = 64 << 20, 1 << 16, 64


def file_fingerprint(path: str | os.PathLike) -> list:
    """`[size, hash]` of a file: the hash of all its bytes up to 64 MiB; beyond, of 64 blocks of 64 KiB spread over
    it (4 MiB read) and its modification time.

    A file replaced in place by another of the same size (a retrained checkpoint, an edited data file) gets another
    fingerprint. The same bytes behind a link get the same one; so do the same bytes under another path, for files up
    to 64 MiB (a copied large checkpoint counts as another input, which errs on the safe side).
    """
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= _WHOLE:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        else:
            digest.update(str(os.stat(path).st_mtime_ns).encode())
            for i in range(_SAMPLES):
                f.seek((size - _BLOCK) * i // (_SAMPLES - 1))
                digest.update(f.read(_BLOCK))
    return [size, digest.hexdigest()[:16]]


def files_fingerprint(paths) -> dict | None:
    """`{name: [size, hash]}` of local inputs: files as given, and in a folder (a checkpoint) its visible `.json` and
    `.safetensors` files; links followed. `None` when none is local (a Hub id, a dataset name)."""
    found = {}
    for path in paths:
        path = Path(os.path.realpath(os.path.expanduser(str(path))))
        if path.is_file():
            found[path.name] = file_fingerprint(path)
        elif path.is_dir():
            for file in sorted(path.iterdir()):
                if file.suffix in (".json", ".safetensors") and file.is_file() and not file.name.startswith("."):
                    found[file.name] = file_fingerprint(file)
    return found or None


def model_fingerprint(model) -> dict | str | None:
    """What a training run starts from, for its resume record: the files of a checkpoint given by path (or its
    name, for a Hub id), or the weights of a model given as an object."""
    if isinstance(model, (str, os.PathLike)):
        return files_fingerprint([model]) or str(model)
    return weights_fingerprint(model)
