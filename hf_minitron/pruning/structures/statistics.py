"""Activation statistics: per-sample reduction over tokens, float64 running sums, and their reductions.

Two kinds of statistics accumulate during the importance pass:

* per sample (heads, MLP neurons, hidden channels): each sample's activations are reduced over its unmasked tokens
  (`sequence_aggregation`), and we keep the running `sum` and `sum of squares` of those per-sample values, so any
  `batch_aggregation` can be chosen afterwards (paper 1, Table 11);
* per routed token (experts, expert neurons): an expert sees a varying handful of each sample's tokens, so its
  statistics are plain sums over the tokens routed to it plus a token `count`, and reduce to means.

Both are sums: they add up exactly across batches and across processes.
"""

import torch


# The running sums of a per-sample statistic.
PER_SAMPLE = ("sum", "sumsq")


def sequence_reduce(x: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """`[B, S, D]` activations, `[B, S]` float mask -> `[B, D]` per-sample values over the unmasked tokens.

    `mask=None` means every token counts (packed calibration data). Elementwise ops then a plain `sum(dim=1)`: on a
    CPU this is ~10x faster than the same reduction as an einsum / bmm against the mask (7.2 ms vs 0.7 ms for an
    `[8, 256, 1536]` MLP activation, next to 35 ms for the `down_proj` matmul itself).
    """
    n = x.shape[1] if mask is None else mask.sum(dim=1, keepdim=True).clamp_min(1)
    weights = None if mask is None else mask.unsqueeze(-1)

    def total(values):
        return (values if weights is None else values * weights).sum(dim=1)

    if how == "mean":
        return total(x.abs()) / n
    sq = total(x * x)
    if how == "l2":
        return sq.sqrt()
    mean = total(x) / n
    return (sq / n - mean * mean).clamp_min(0)


def add_per_sample(
    store: dict, x: torch.Tensor, mask: torch.Tensor | None, how: str, scale: torch.Tensor | None = None
) -> None:
    """Adds the per-sample values of `x` (`[B, S, D]`) to the running `sum` / `sumsq` of `store`; with `scale`
    (`[D]`, non-negative), those of `x * scale`, scaled after the reduction over tokens (`mean` and `l2` scale by
    `scale`, `var` by its square), which spares a pass over the activations."""
    values = sequence_reduce(x.float(), None if mask is None else mask.to(x.device), how)
    if scale is not None:
        values = values * (scale * scale if how == "var" else scale)
    values = values.double()
    add_sums(store, {"sum": values.sum(dim=0), "sumsq": (values * values).sum(dim=0)})


def add_sums(store: dict, sums: dict[str, torch.Tensor]) -> None:
    """Adds each tensor of `sums` to the float64 running sum of the same name in `store`."""
    for name, value in sums.items():
        value = value.double()
        if name in store:
            store[name] += value
        else:
            store[name] = value.clone()


def zeros_like(store: dict, device, **shapes: tuple) -> None:
    """Creates float64 zero running sums of the given shapes in `store` (per-token statistics index into them)."""
    for name, shape in shapes.items():
        store[name] = torch.zeros(shape, dtype=torch.float64, device=device)


def reduce_per_sample(stats: dict[str, torch.Tensor], batch_aggregation: str, num_samples: int) -> torch.Tensor:
    """Scores from per-sample sums: `l2` over samples, `mean`, or `var`; static scores (`{"score"}`) as they are."""
    if "score" in stats:
        return stats["score"].double()
    n = max(num_samples, 1)
    if batch_aggregation == "l2":
        return stats["sumsq"].sqrt()
    mean = stats["sum"] / n
    if batch_aggregation == "mean":
        return mean
    return (stats["sumsq"] / n - mean**2).clamp_min(0)


def per_token_mean(stats: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """`stats[name] / stats["count"]` (0 where nothing was routed); static scores (`{"score"}`) as they are."""
    if "score" in stats:
        return stats["score"].double()
    count = stats["count"].double()
    while count.dim() < stats[name].dim():
        count = count.unsqueeze(-1)
    return stats[name].double() / count.clamp_min(1)


def static_scores(per_layer: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Static scores (`{"score"}`, float64, `[num_layers, ...]`) of the baselines, from one tensor per layer."""
    return {"score": torch.stack(per_layer).double()}
