"""Depth pruning: which layers to drop.

* `block_influence`: drop the layers whose output is most similar to their input (lowest 1 - cos), paper 1 §2.2.
* `lm_loss`: drop the layers whose individual removal raises the LM loss least, paper 1 §2.2.
* `contiguous`: drop the block of n consecutive layers whose removal costs least, by LM loss or by any scorer
  (paper 2 used Winogrande accuracy and found a contiguous block beats individually ranked layers).
* `explicit`: the user's list.
"""

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from .architectures import get_decoder_layers
from .data import shard_batches
from .importance import ImportanceScores, _all_reduce_, _dist_info, _input_device


class _SkippedLayer(nn.Module):
    """Stands in for a decoder layer during removal scoring: returns the residual stream untouched."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        # Models read per-layer attributes (e.g. `attention_type`) while looping over layers.
        self.attention_type = getattr(layer, "attention_type", None)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextmanager
def layers_skipped(model, layer_indices):
    """Temporarily replaces the given decoder layers by identities (no copy of the model)."""
    layers = get_decoder_layers(model)
    saved = {i: layers[i] for i in layer_indices}
    try:
        for i, layer in saved.items():
            layers[i] = _SkippedLayer(layer)
        yield model
    finally:
        for i, layer in saved.items():
            layers[i] = layer


@torch.no_grad()
def lm_loss(model, samples: list[dict], batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over the unmasked tokens of `samples`, summed across processes."""
    rank, world_size = _dist_info()
    device = _input_device(model)
    total = torch.zeros(2, dtype=torch.float64)
    for batch in shard_batches(samples, batch_size, rank, world_size):
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += torch.tensor([loss.item(), float((labels != -100).sum())], dtype=torch.float64)
    total = _all_reduce_(total, device)
    return float(total[0] / total[1].clamp_min(1))


def score_layer_removals(
    model,
    candidates: list[list[int]],
    samples: list[dict] | None = None,
    scorer: Callable | None = None,
    batch_size: int = 8,
    show_progress: bool = True,
) -> list[float]:
    """Cost of removing each candidate set of layers: LM loss on `samples`, or `-scorer(model)` (lower is better).

    `scorer` is any callable `model -> float` where higher is better (e.g. an lm-eval accuracy).
    """
    if scorer is None and not samples:
        raise ValueError("Scoring layer removals needs calibration samples (for the LM loss) or a scorer callable.")
    was_training = model.training
    model.eval()
    costs = []
    try:
        for layer_set in tqdm(candidates, desc="Scoring layer removals", disable=not show_progress or _dist_info()[0]):
            with layers_skipped(model, layer_set):
                costs.append(-float(scorer(model)) if scorer is not None else lm_loss(model, samples, batch_size))
    finally:
        model.train(was_training)
    return costs


def select_layers_to_drop(
    model,
    num_to_drop: int,
    method: str,
    scores: ImportanceScores | None = None,
    samples: list[dict] | None = None,
    scorer: Callable | None = None,
    batch_size: int = 8,
    show_progress: bool = True,
) -> list[int]:
    """Indices (sorted) of the `num_to_drop` layers to remove with `method`; fills the depth fields of `scores`."""
    num_layers = len(get_decoder_layers(model))
    if num_to_drop <= 0:
        return []
    if method == "block_influence":
        if scores is None or scores.block_influence is None:
            raise ValueError("depth_method='block_influence' needs ImportanceScores estimated with depth=True.")
        order = torch.argsort(scores.block_influence, stable=True)
        return sorted(order[:num_to_drop].tolist())
    if method == "lm_loss":
        if scores is not None and scores.layer_loss is not None:
            costs = scores.layer_loss.tolist()
        else:
            costs = score_layer_removals(
                model, [[i] for i in range(num_layers)], samples, scorer, batch_size, show_progress
            )
            if scores is not None:
                scores.layer_loss = torch.tensor(costs, dtype=torch.float64)
                scores.base_loss = -float(scorer(model)) if scorer is not None else lm_loss(model, samples, batch_size)
        order = torch.argsort(torch.tensor(costs), stable=True)
        return sorted(order[:num_to_drop].tolist())
    if method == "contiguous":
        cached = scores.block_losses.get(num_to_drop) if scores is not None else None
        if cached is None or scorer is not None:
            blocks = [list(range(start, start + num_to_drop)) for start in range(num_layers - num_to_drop + 1)]
            cached = score_layer_removals(model, blocks, samples, scorer, batch_size, show_progress)
            if scores is not None and scorer is None:
                scores.block_losses[num_to_drop] = cached
        start = min(range(len(cached)), key=lambda s: cached[s])
        return list(range(start, start + num_to_drop))
    raise ValueError(f"Unknown depth_method {method!r}: use 'contiguous', 'block_influence', 'lm_loss' or 'explicit'.")
