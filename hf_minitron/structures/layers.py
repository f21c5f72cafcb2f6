"""Layers (depth): Block Influence, removal scoring, which layers to drop, and dropping them.

* `block_influence`: drop the layers whose output is most similar to their input (lowest 1 - cos), paper 1 §2.2;
  measured by hooks in the same pass as the width scores.
* `lm_loss`: drop the layers whose individual removal raises the LM loss least, paper 1 §2.2.
* `contiguous`: drop the block of n consecutive layers whose removal costs least, by LM loss or by any scorer
  (paper 2 used Winogrande accuracy and found a contiguous block beats individually ranked layers).
* `explicit`: the user's list.

Dropping renumbers the kept layers (the KV cache is indexed by `layer_idx`) and slices every per-layer config list
(`layer_types`, ...) so the pattern of the kept layers is preserved.
"""

from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..architectures import get_architecture, get_base_model, get_decoder_layers
from ..data import shard_batches
from ..runtime import all_reduce_, dist_info, input_device


KEY = "block_influence"
BLOCK = None  # every layer


# ---------------------------------------------------------------------------------------------- Block Influence
def hooks(collector, index: int, layer) -> list:
    """Accumulates the masked sum of cos(layer input, layer output) over tokens (1 - its mean is Block Influence)."""
    inputs = {}

    def layer_pre_hook(module, args, kwargs):
        inputs["x"] = args[0] if args else kwargs["hidden_states"]

    def layer_hook(module, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output
        cos = F.cosine_similarity(inputs.pop("x").float(), out.float(), dim=-1)  # [B, S]
        store = collector.store(KEY, index)
        total = (cos * collector.mask.to(cos.device)).sum().double()
        store["sum"] = total if "sum" not in store else store["sum"] + total

    return [
        layer.register_forward_pre_hook(layer_pre_hook, with_kwargs=True),
        layer.register_forward_hook(layer_hook, with_kwargs=True),
    ]


def sites(spec) -> list[tuple[int, str, int, str]]:
    return [(4, KEY, 0, "layer output (block influence)")]


def magnitude(layer) -> torch.Tensor:
    """The L2 norm of every weight of the layer (the magnitude baseline's layer ranking)."""
    return sum(p.float().pow(2).sum() for p in layer.parameters()).sqrt()


class _SkippedLayer(nn.Module):
    """Stands in for a decoder layer during removal scoring: returns the residual stream untouched."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        # Models read per-layer attributes (e.g. `attention_type`, Nemotron-H's `block_type`) while looping over layers.
        self.attention_type = getattr(layer, "attention_type", None)
        self.block_type = getattr(layer, "block_type", None)

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
    rank, world_size = dist_info()
    device = input_device(model)
    total = torch.zeros(2, dtype=torch.float64)
    for batch in shard_batches(samples, batch_size, rank, world_size):
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += torch.tensor([loss.item(), float((labels != -100).sum())], dtype=torch.float64)
    total = all_reduce_(total, device)
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
        for layer_set in tqdm(candidates, desc="Scoring layer removals", disable=not show_progress or dist_info()[0]):
            with layers_skipped(model, layer_set):
                costs.append(-float(scorer(model)) if scorer is not None else lm_loss(model, samples, batch_size))
    finally:
        model.train(was_training)
    return costs


# How many blocks of the screening round are rescored on every depth sample.
FINALISTS = 3


def score_blocks(model, blocks, samples, scorer=None, batch_size=8, show_progress=True, screening_samples=None):
    """`score_layer_removals` for the contiguous search, cheaper: with `screening_samples` (fewer than the samples),
    every block is scored on the first `screening_samples` samples, and only the `FINALISTS` best are scored on all
    of them; the others get `None`. For SmolLM2 (30 layers, 6 dropped: 25 blocks, 64 samples, screening 16) that is
    25 x 16 + 3 x 64 = 592 sample forwards instead of 1600. A block that screening ranks 4th or worse is not rescored:
    with very noisy small screening sets, raise `screening_samples` or set it to None (score every block on all)."""
    if scorer is not None or not screening_samples or len(samples) <= screening_samples or len(blocks) <= FINALISTS:
        return score_layer_removals(model, blocks, samples, scorer, batch_size, show_progress)
    coarse = score_layer_removals(model, blocks, samples[:screening_samples], None, batch_size, show_progress)
    finalists = sorted(range(len(blocks)), key=lambda i: coarse[i])[:FINALISTS]
    fine = score_layer_removals(model, [blocks[i] for i in finalists], samples, None, batch_size, show_progress)
    costs = [None] * len(blocks)
    for i, cost in zip(finalists, fine):
        costs[i] = cost
    return costs


def select_layers_to_drop(
    model,
    num_to_drop: int,
    method: str,
    scores=None,
    samples: list[dict] | None = None,
    scorer: Callable | None = None,
    batch_size: int = 8,
    show_progress: bool = True,
    screening_samples: int | None = None,
) -> list[int]:
    """Indices (sorted) of the `num_to_drop` layers to remove with `method`; fills the depth fields of `scores`.

    With `screening_samples`, the contiguous search first scores every block on that many samples and rescores only
    the `FINALISTS` best on all of them (`score_blocks`)."""
    num_layers = len(get_decoder_layers(model))
    if num_to_drop <= 0:
        return []
    if method == "block_influence":
        if scores is None or scores.block_influence is None:
            raise ValueError("depth_method='block_influence' needs ImportanceScores estimated with depth=True.")
        order = torch.argsort(scores.block_influence, stable=True)
        return _lowest(model.config, order.tolist(), num_to_drop)
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
        return _lowest(model.config, order.tolist(), num_to_drop)
    if method == "contiguous":
        cached = scores.block_losses.get(num_to_drop) if scores is not None else None
        if cached is None or scorer is not None:
            blocks = [list(range(start, start + num_to_drop)) for start in range(num_layers - num_to_drop + 1)]
            cached = score_blocks(model, blocks, samples, scorer, batch_size, show_progress, screening_samples)
            if scores is not None and scorer is None:
                scores.block_losses[num_to_drop] = cached
        scored = [s for s in range(len(cached)) if cached[s] is not None]
        allowed = [s for s in scored if keeps_attention(model.config, range(s, s + num_to_drop))] or scored
        start = min(allowed, key=lambda s: cached[s])
        return list(range(start, start + num_to_drop))
    raise ValueError(f"Unknown depth_method {method!r}: use 'contiguous', 'block_influence', 'lm_loss' or 'explicit'.")


# ---------------------------------------------------------------------------------------------- dropping
def drop_layers(model, layers_to_drop: list[int]) -> list[int]:
    """Removes decoder layers in place and renumbers the rest; returns the kept (source) indices."""
    layers = get_decoder_layers(model)
    num_layers = len(layers)
    drop = set(layers_to_drop)
    kept = [i for i in range(num_layers) if i not in drop]
    check_hybrid_depth(model.config, kept)
    new_layers = nn.ModuleList([layers[i] for i in kept])
    for new_idx, layer in enumerate(new_layers):
        # The KV cache is indexed by layer_idx: keep it dense after removal so cached generation works.
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    get_base_model(model).layers = new_layers
    config = model.config
    # Per-layer config lists (layer_types, ...) must follow the layers they describe.
    for key, value in list(vars(config).items()):
        if isinstance(value, (list, tuple)) and len(value) == num_layers and key != "architectures":
            setattr(config, key, type(value)(value[i] for i in kept))
    config.num_hidden_layers = len(kept)
    return kept


def keeps_attention(model_config, dropped) -> bool:
    """Whether dropping the layers `dropped` leaves a hybrid at least one attention layer (always true for a family
    whose layers are alike): transformers' hybrid cache reads the sequence length from an attention layer, so a
    Nemotron-H without one cannot run with `use_cache` (its default)."""
    spec = get_architecture(model_config)
    if spec.block_types_field is None:
        return True
    kinds = list(getattr(model_config, spec.block_types_field))
    attention = [i for i, kind in enumerate(kinds) if kind == dict(spec.block_types).get("attention")]
    return not attention or not set(attention) <= set(dropped)


def _lowest(model_config, order: list[int], num_to_drop: int) -> list[int]:
    """The first `num_to_drop` layers of `order` (sorted), skipping a hybrid's last attention layer."""
    dropped = []
    for i in order:
        if len(dropped) < num_to_drop and keeps_attention(model_config, dropped + [i]):
            dropped.append(i)
    return sorted(dropped)


def check_hybrid_depth(model_config, kept: list[int]) -> None:
    """Refuses to drop every attention layer of a hybrid (see `keeps_attention`)."""
    num_layers = model_config.num_hidden_layers
    dropped = [i for i in range(num_layers) if i not in set(kept)]
    if not keeps_attention(model_config, dropped):
        spec = get_architecture(model_config)
        kinds = list(getattr(model_config, spec.block_types_field))
        attention = [i for i, kind in enumerate(kinds) if kind == dict(spec.block_types).get("attention")]
        raise ValueError(
            f"Dropping layers {dropped} removes every attention layer ({attention}) of this "
            f"{model_config.model_type} model, and transformers cannot run a hybrid without one (its cache reads the "
            "sequence length from an attention layer). Keep at least one: drop other layers (layers_to_drop), or "
            "fewer."
        )
