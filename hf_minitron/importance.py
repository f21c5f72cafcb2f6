"""Minitron importance estimation (paper 1, §2.2): forward passes only, every axis from one pass.

* Heads: the input of `o_proj` viewed as `[heads, head_dim]`, L2 norm over `head_dim`.
* MLP neurons: the input of `down_proj`.
* Embedding channels: the outputs of the norms that feed attention and the MLP, in every layer.
* Depth: Block Influence, 1 - cos(layer input, layer output), from the same pass.

Activations are reduced over the tokens of each sample first (`sequence_aggregation`), then over samples
(`batch_aggregation`). We keep the running *sum* and *sum of squares* of the per-sample values, in float64, so that
(a) any batch aggregation can be chosen after the fact, (b) scores add up exactly across batches and processes:
several processes over shards of the data give the same scores as one process over all of it.
"""

import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .architectures import get_architecture, get_decoder_layers
from .data import shard_batches, take_samples
from .pruning_config import BATCH_AGGREGATIONS, PrunedConfig
from .validation import check_sequence_length


SCORES_WEIGHTS_NAME = "importance.safetensors"
SCORES_META_NAME = "importance.json"


@dataclass
class ImportanceScores:
    """Importance statistics of one model, from which the kept structures are chosen.

    Per-axis statistics are dicts of tensors: `{"sum", "sumsq"}` (accumulated over samples) for activation importance,
    or `{"score"}` for the static baselines (weight magnitude, random).

    Args:
        heads: statistics of shape `[num_layers, num_attention_heads]`.
        neurons: statistics of shape `[num_layers, intermediate_size]`.
        hidden: statistics of shape `[num_layers, 2, hidden_size]` (attention-input norm, MLP-input norm).
        block_influence (`torch.Tensor` of shape `[num_layers]`, *optional*): 1 - mean cos(input, output) per layer.
        layer_loss (`torch.Tensor` of shape `[num_layers]`, *optional*): LM loss with each single layer dropped.
        base_loss (`float`, *optional*): LM loss of the unpruned model on the same depth samples.
        block_losses (`dict[int, list[float]]`, *optional*): for a block length n, the loss (or negated score)
            when layers `[start, start + n)` are dropped, for every start.
    """

    method: str
    sequence_aggregation: str
    num_samples: int
    num_tokens: int
    model_shape: dict
    heads: dict[str, torch.Tensor]
    neurons: dict[str, torch.Tensor]
    hidden: dict[str, torch.Tensor]
    block_influence: torch.Tensor | None = None
    layer_loss: torch.Tensor | None = None
    base_loss: float | None = None
    block_losses: dict[int, list[float]] = field(default_factory=dict)

    # ------------------------------------------------------------------ reductions
    def _reduce(self, stats: dict[str, torch.Tensor], batch_aggregation: str) -> torch.Tensor:
        if "score" in stats:
            return stats["score"].double()
        if batch_aggregation not in BATCH_AGGREGATIONS:
            raise ValueError(f"batch_aggregation={batch_aggregation!r} is not one of {list(BATCH_AGGREGATIONS)}.")
        n = max(self.num_samples, 1)
        if batch_aggregation == "l2":
            return stats["sumsq"].sqrt()
        mean = stats["sum"] / n
        if batch_aggregation == "mean":
            return mean
        return (stats["sumsq"] / n - mean**2).clamp_min(0)

    def head_scores(self, batch_aggregation: str = "l2") -> torch.Tensor:
        """`[num_layers, num_attention_heads]` query-head importance."""
        return self._reduce(self.heads, batch_aggregation)

    def kv_group_scores(self, batch_aggregation: str = "l2") -> torch.Tensor:
        """`[num_layers, num_key_value_heads]`: L2 over the query heads of each KV group."""
        heads = self.head_scores(batch_aggregation)
        groups = self.model_shape["num_key_value_heads"]
        return heads.view(heads.shape[0], groups, -1).norm(dim=-1)

    def neuron_scores(self, batch_aggregation: str = "l2") -> torch.Tensor:
        """`[num_layers, intermediate_size]` MLP-neuron importance."""
        return self._reduce(self.neurons, batch_aggregation)

    def hidden_scores_per_layer(self, batch_aggregation: str = "l2") -> torch.Tensor:
        """`[num_layers, hidden_size]`: per layer, the two norm outputs reduced separately, then added."""
        return self._reduce(self.hidden, batch_aggregation).sum(dim=1)

    def hidden_scores(self, batch_aggregation: str = "l2", layers: list[int] | None = None) -> torch.Tensor:
        """`[hidden_size]`: ONE global ranking, summed over `layers` (all by default)."""
        per_layer = self.hidden_scores_per_layer(batch_aggregation)
        if layers is not None:
            per_layer = per_layer[list(layers)]
        return per_layer.sum(dim=0)

    def layer_scores(self, method: str = "block_influence") -> torch.Tensor:
        """`[num_layers]`, higher = more important: Block Influence, or the LM-loss increase when dropped."""
        if method == "block_influence":
            if self.block_influence is None:
                raise ValueError("These scores hold no block influence: estimate them with depth scoring enabled.")
            return self.block_influence.double()
        if method == "lm_loss":
            if self.layer_loss is None:
                raise ValueError("These scores hold no per-layer LM loss: run score_layer_removals first.")
            return self.layer_loss.double() - self.base_loss
        raise ValueError(f"Unknown layer score method {method!r}: use 'block_influence' or 'lm_loss'.")

    # ------------------------------------------------------------------ persistence
    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for axis in ("heads", "neurons", "hidden"):
            for key, value in getattr(self, axis).items():
                out[f"{axis}.{key}"] = value.contiguous()
        if self.block_influence is not None:
            out["block_influence"] = self.block_influence
        if self.layer_loss is not None:
            out["layer_loss"] = self.layer_loss
        return out

    def save(self, directory: str | os.PathLike) -> None:
        """Writes `importance.safetensors` + `importance.json` to `directory`, atomically.

        A folder that holds only scores (or does not exist yet) is written as a whole into a temporary sibling and
        renamed, so a kill mid-save leaves the previous scores or none, never a weights file of one estimate beside
        the metadata of another. In a folder shared with other files (e.g. next to a model), each file is written
        to a temporary sibling and renamed, the weights first.
        """
        from safetensors.torch import save_file

        from .io import atomic_directory, atomic_file, atomic_write_json

        meta = {
            "method": self.method,
            "sequence_aggregation": self.sequence_aggregation,
            "num_samples": self.num_samples,
            "num_tokens": self.num_tokens,
            "model_shape": self.model_shape,
            "base_loss": self.base_loss,
            "block_losses": {str(k): v for k, v in self.block_losses.items()},
        }
        tensors = self._tensors()
        directory = os.fspath(directory)
        names = set(os.listdir(directory)) if os.path.isdir(directory) else set()
        if names <= {SCORES_WEIGHTS_NAME, SCORES_META_NAME} and (not names or SCORES_WEIGHTS_NAME in names):
            with atomic_directory(directory, overwrite=True) as tmp:
                save_file(tensors, os.path.join(tmp, SCORES_WEIGHTS_NAME))
                atomic_write_json(os.path.join(tmp, SCORES_META_NAME), meta)
            return
        with atomic_file(os.path.join(directory, SCORES_WEIGHTS_NAME)) as tmp:
            save_file(tensors, tmp)
        atomic_write_json(os.path.join(directory, SCORES_META_NAME), meta)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ImportanceScores":
        from safetensors.torch import load_file

        meta_path = os.path.join(directory, SCORES_META_NAME)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"No importance scores in {directory!r} (expected {SCORES_META_NAME}).")
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        tensors = load_file(os.path.join(directory, SCORES_WEIGHTS_NAME))
        axes = {"heads": {}, "neurons": {}, "hidden": {}}
        for name, value in tensors.items():
            axis, _, key = name.partition(".")
            if axis in axes:
                axes[axis][key] = value
        return cls(
            method=meta["method"],
            sequence_aggregation=meta["sequence_aggregation"],
            num_samples=meta["num_samples"],
            num_tokens=meta["num_tokens"],
            model_shape=meta["model_shape"],
            block_influence=tensors.get("block_influence"),
            layer_loss=tensors.get("layer_loss"),
            base_loss=meta.get("base_loss"),
            block_losses={int(k): v for k, v in meta.get("block_losses", {}).items()},
            **axes,
        )

    def check_compatible(self, model_config) -> None:
        """Raises if these scores were computed on a model of another shape, or hold inf/NaN."""
        shape = model_shape(model_config)
        if shape != self.model_shape:
            differ = {k: (self.model_shape.get(k), v) for k, v in shape.items() if self.model_shape.get(k) != v}
            raise ValueError(
                "The importance scores were computed on a different model: "
                + ", ".join(
                    f"{k}={theirs} in the scores vs {mine} in this model" for k, (theirs, mine) in differ.items()
                )
                + ". Estimate them again on this model (estimate_importance), or pass the scores saved with it."
            )
        for axis, stats in self._tensors().items():
            if not bool(torch.isfinite(stats).all()):
                raise ValueError(
                    f"The importance scores hold inf/NaN ({axis}): they were estimated on an overflowing model. "
                    "Estimate them again with the model in bfloat16 or float32."
                )


def model_shape(config) -> dict:
    heads = config.num_attention_heads
    return {
        "model_type": config.model_type,
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
    }


# ---------------------------------------------------------------------------------------------- activation importance
def _sequence_reduce(x: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """`[B, S, D]` activations, `[B, S]` float mask -> `[B, D]` per-sample values over the unmasked tokens."""
    n = mask.sum(dim=1, keepdim=True).clamp_min(1)
    if how == "mean":
        return torch.einsum("bsd,bs->bd", x.abs(), mask) / n
    sq = torch.einsum("bsd,bs->bd", x * x, mask)
    if how == "l2":
        return sq.sqrt()
    mean = torch.einsum("bsd,bs->bd", x, mask) / n
    return (sq / n - mean * mean).clamp_min(0)


class _Collector:
    """Forward hooks accumulating per-axis statistics for every decoder layer."""

    def __init__(self, model, sequence_aggregation: str, depth: bool):
        self.spec = get_architecture(model.config)
        self.layers = get_decoder_layers(model)
        self.shape = model_shape(model.config)
        self.how = sequence_aggregation
        self.depth = depth
        self.mask: torch.Tensor | None = None
        num_layers = len(self.layers)
        self.stats = {
            "heads": [dict() for _ in range(num_layers)],
            "neurons": [dict() for _ in range(num_layers)],
            "hidden": [[dict(), dict()] for _ in range(num_layers)],
        }
        self.cos_sum = [None] * num_layers
        self.layer_inputs: list[torch.Tensor | None] = [None] * num_layers
        self.handles = []

    def _accumulate(self, store: dict, x: torch.Tensor) -> None:
        values = _sequence_reduce(x.float(), self.mask.to(x.device), self.how).double()
        if not store:
            store["sum"] = torch.zeros(values.shape[-1], dtype=torch.float64, device=values.device)
            store["sumsq"] = torch.zeros_like(store["sum"])
        store["sum"] += values.sum(dim=0)
        store["sumsq"] += (values * values).sum(dim=0)

    def __enter__(self):
        spec, head_dim = self.spec, self.shape["head_dim"]
        for i, layer in enumerate(self.layers):
            attn, mlp = getattr(layer, spec.attention), getattr(layer, spec.mlp)

            def heads_hook(module, args, i=i):
                x = args[0]
                x = x.view(*x.shape[:-1], -1, head_dim).float().norm(dim=-1)  # [B, S, heads]
                self._accumulate(self.stats["heads"][i], x)

            def neurons_hook(module, args, i=i):
                self._accumulate(self.stats["neurons"][i], args[0])

            def norm_hook(module, args, output, i=i, slot=0):
                self._accumulate(self.stats["hidden"][i][slot], output)

            self.handles += [
                getattr(attn, spec.o_proj).register_forward_pre_hook(heads_hook),
                getattr(mlp, spec.down_proj).register_forward_pre_hook(neurons_hook),
                getattr(layer, spec.attn_input_norm).register_forward_hook(norm_hook),
                getattr(layer, spec.mlp_input_norm).register_forward_hook(
                    lambda m, a, o, i=i: norm_hook(m, a, o, i, 1)
                ),
            ]
            if self.depth:

                def layer_pre_hook(module, args, kwargs, i=i):
                    self.layer_inputs[i] = args[0] if args else kwargs["hidden_states"]

                def layer_hook(module, args, kwargs, output, i=i):
                    out = output[0] if isinstance(output, tuple) else output
                    cos = F.cosine_similarity(self.layer_inputs[i].float(), out.float(), dim=-1)  # [B, S]
                    total = (cos * self.mask.to(cos.device)).sum().double()
                    self.cos_sum[i] = total if self.cos_sum[i] is None else self.cos_sum[i] + total
                    self.layer_inputs[i] = None

                self.handles += [
                    layer.register_forward_pre_hook(layer_pre_hook, with_kwargs=True),
                    layer.register_forward_hook(layer_hook, with_kwargs=True),
                ]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def check_finite(self, batch_index: int, dtype: torch.dtype) -> None:
        """Raises at the first site (in forward order) whose statistics hold inf/NaN: one overflowing activation
        (typically float16) would otherwise turn every score that depends on it into NaN, silently."""
        spec = self.spec
        # One device sync per batch on the healthy path; the sites are searched only once something is non-finite.
        sums = [
            store["sum"] for per_layer in (self.stats["heads"], self.stats["neurons"]) for store in per_layer if store
        ]
        sums += [store["sum"] for pair in self.stats["hidden"] for store in pair if store]
        sums += [c for c in self.cos_sum if c is not None]
        if not sums:
            return
        flags = [torch.isfinite(t).all().to(sums[0].device) for t in sums]
        if bool(torch.stack(flags).all()):
            return
        for i in range(len(self.layers)):
            sites = (
                (self.stats["hidden"][i][0], f"output of {spec.attn_input_norm}"),
                (self.stats["heads"][i], f"input of {spec.attention}.{spec.o_proj}"),
                (self.stats["hidden"][i][1], f"output of {spec.mlp_input_norm}"),
                (self.stats["neurons"][i], f"input of {spec.mlp}.{spec.down_proj}"),
                ({"sum": self.cos_sum[i]} if self.cos_sum[i] is not None else {}, "layer output (block influence)"),
            )
            for store, site in sites:
                if store and not bool(torch.isfinite(store["sum"]).all()):
                    name = str(dtype).replace("torch.", "")
                    # bfloat16 has float32's range: only a float16 model overflows for want of range.
                    fix = (
                        "Load the model in bfloat16 or float32 (from_pretrained(..., dtype=torch.bfloat16), or --dtype "
                        "bfloat16) and estimate again."
                        if dtype == torch.float16
                        else f"No dtype has a wider range than {name}, so the weights themselves are broken (inf/NaN, "
                        "or values of extreme magnitude from a diverged run): check the checkpoint with "
                        "torch.isfinite on each weight, and use a healthy one."
                    )
                    raise ValueError(
                        f"Non-finite activations (inf/NaN) in decoder layer {i}, {site}, during importance estimation "
                        f"(calibration batch {batch_index}): the model overflows in {name} or its weights hold "
                        f"inf/NaN, and every score would be NaN. {fix}"
                    )


def return_large_buffers_to_os() -> None:
    """Makes glibc serve allocations of 1 MiB and more with mmap, so activation and weight buffers go back to the OS
    when freed. With glibc's default (a threshold that grows after the first large free), the activations of the
    calibration passes stay cached in the heap and the process's peak grows by ~40% of the model. No-op off glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD; a fixed value also turns off the dynamic adjustment
    except (OSError, AttributeError):
        pass


def release_freed_memory() -> None:
    """Hands free heap pages back to the OS (glibc `malloc_trim`). Weights dropped by pruning are freed in many
    small blocks that glibc keeps cached; without this, the next large allocation (the sliced embedding) is charged on
    top of them and the pruning peak grows by the size of the dropped layers. No-op off glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_reduce_(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sums `tensor` over processes (no-op with one process); returns it on the CPU."""
    _, world_size = _dist_info()
    if world_size > 1:
        backend = torch.distributed.get_backend()
        moved = tensor.to(device if backend == "nccl" else "cpu")
        torch.distributed.all_reduce(moved)
        tensor = moved
    return tensor.cpu()


def _input_device(model: nn.Module) -> torch.device:
    """Where the input ids go. Under accelerate's dispatch/offload hooks (device_map="auto", cpu_offload,
    disk_offload) the embedding weight may sit on `meta` or the CPU; its hook knows the device it runs on."""
    embed = model.get_input_embeddings()
    hook = getattr(embed, "_hf_hook", None)
    for h in getattr(hook, "hooks", [hook]):
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return embed.weight.device


@torch.no_grad()
def estimate_importance(
    model,
    calibration_data,
    config: PrunedConfig | None = None,
    *,
    depth: bool = True,
    show_progress: bool = True,
) -> ImportanceScores:
    """Activation importance of every head, neuron, embedding channel and layer, from forward passes only.

    Args:
        model (`PreTrainedModel`): a supported `*ForCausalLM` (see `hf_minitron.ARCHITECTURES`), on any device,
            in any dtype; statistics accumulate in float64.
        calibration_data: a `datasets.Dataset`, a list of samples, or an iterable of batches, each a mapping with
            `input_ids` (and optionally `attention_mask`; padded positions are excluded).
        config (`PrunedConfig`, *optional*): `calibration_samples`, `calibration_batch_size` and
            `sequence_aggregation` are read from it.
        depth (`bool`, *optional*, defaults to `True`): also compute Block Influence per layer.
        show_progress (`bool`, *optional*, defaults to `True`): a progress bar on the main process.

    Under torch.distributed, each process takes every `world_size`-th sample of the first `calibration_samples` and
    the statistics are summed across processes, so the result equals a single process over all the data.
    """
    config = config or PrunedConfig()
    get_architecture(model.config)  # fails fast for unsupported architectures
    return_large_buffers_to_os()
    samples = take_samples(calibration_data, config.calibration_samples)
    longest = max(sample["input_ids"].shape[-1] for sample in samples)
    check_sequence_length(model.config, longest, "calibration sample length")
    rank, world_size = _dist_info()
    batches = shard_batches(samples, config.calibration_batch_size, rank, world_size)
    device = _input_device(model)
    base = getattr(model, model.base_model_prefix)
    was_training = model.training
    model.eval()
    num_tokens = 0
    try:
        with _Collector(model, config.sequence_aggregation, depth) as collector:
            for batch_index, batch in enumerate(
                tqdm(batches, desc="Importance estimation", disable=not show_progress or rank != 0, unit="batch")
            ):
                mask = batch["attention_mask"].to(device)
                collector.mask = mask.float()
                num_tokens += int(mask.sum())
                # The base model only: importance needs no logits, and the LM head is a large share of the compute.
                base(input_ids=batch["input_ids"].to(device), attention_mask=mask, use_cache=False)
                collector.check_finite(batch_index, model.dtype)
    finally:
        model.train(was_training)
        release_freed_memory()  # the activations' heap blocks would otherwise add to the pruning step's peak

    shape = model_shape(model.config)

    def stacked(per_layer: list[dict], width: int) -> dict[str, torch.Tensor]:
        out = {}
        for key in ("sum", "sumsq"):
            rows = [s[key].cpu() if s else torch.zeros(width, dtype=torch.float64) for s in per_layer]
            out[key] = _all_reduce_(torch.stack(rows), device)
        return out

    heads = stacked(collector.stats["heads"], shape["num_attention_heads"])
    neurons = stacked(collector.stats["neurons"], shape["intermediate_size"])
    hidden_slots = [
        stacked([layer[slot] for layer in collector.stats["hidden"]], shape["hidden_size"]) for slot in (0, 1)
    ]
    hidden = {key: torch.stack([hidden_slots[0][key], hidden_slots[1][key]], dim=1) for key in ("sum", "sumsq")}
    counts = _all_reduce_(torch.tensor([len(samples[rank::world_size]), num_tokens], dtype=torch.float64), device)
    total_samples, total_tokens = int(counts[0]), int(counts[1])
    block_influence = None
    if depth:
        cos = torch.stack(
            [c.cpu() if c is not None else torch.zeros((), dtype=torch.float64) for c in collector.cos_sum]
        )
        cos = _all_reduce_(cos, device)
        block_influence = 1 - cos / max(total_tokens, 1)
    return ImportanceScores(
        method="activation",
        sequence_aggregation=config.sequence_aggregation,
        num_samples=total_samples,
        num_tokens=total_tokens,
        model_shape=shape,
        heads=heads,
        neurons=neurons,
        hidden=hidden,
        block_influence=block_influence,
    )


# ---------------------------------------------------------------------------------------------- baselines
@torch.no_grad()
def magnitude_importance(model) -> ImportanceScores:
    """Weight-magnitude baseline: each structure scored by the L2 norm of every weight that reads or writes it."""
    spec = get_architecture(model.config)
    shape = model_shape(model.config)
    head_dim, heads = shape["head_dim"], shape["num_attention_heads"]
    inter = shape["intermediate_size"]
    head_scores, neuron_scores, hidden_scores, layer_scores = [], [], [], []
    for layer in get_decoder_layers(model):
        attn, mlp = getattr(layer, spec.attention), getattr(layer, spec.mlp)
        o = getattr(attn, spec.o_proj).weight.float()
        q = (
            getattr(attn, spec.qkv_proj).weight[: heads * head_dim]
            if spec.qkv_proj
            else getattr(attn, spec.q_proj).weight
        ).float()
        head_sq = q.pow(2).view(heads, head_dim, -1).sum(dim=(1, 2)) + o.pow(2).view(o.shape[0], heads, head_dim).sum(
            dim=(0, 2)
        )
        head_scores.append(head_sq.sqrt())
        down = getattr(mlp, spec.down_proj).weight.float()
        if spec.gate_up_proj:
            gate_up = getattr(mlp, spec.gate_up_proj).weight.float().pow(2)
            ins = gate_up[:inter].sum(1) + gate_up[inter:].sum(1)
        else:
            ins = getattr(mlp, spec.up_proj).weight.float().pow(2).sum(1)
            if spec.gate_proj:
                ins = ins + getattr(mlp, spec.gate_proj).weight.float().pow(2).sum(1)
        neuron_scores.append((ins + down.pow(2).sum(0)).sqrt())
        # Hidden channels: columns read by the attention and MLP input projections, rows written by o/down.
        reads = [getattr(attn, n).weight for n in (spec.q_proj, spec.k_proj, spec.v_proj, spec.qkv_proj) if n]
        reads += [getattr(mlp, n).weight for n in (spec.gate_proj, spec.up_proj, spec.gate_up_proj) if n]
        channel = sum(w.float().pow(2).sum(0) for w in reads) + o.pow(2).sum(1) + down.pow(2).sum(1)
        hidden_scores.append(channel.sqrt())
        layer_scores.append(sum(p.float().pow(2).sum() for p in layer.parameters()).sqrt())
    embed = model.get_input_embeddings().weight.float()
    hidden = torch.stack(hidden_scores).double()
    hidden = hidden + embed.pow(2).sum(0).sqrt().double() / len(hidden_scores)
    return ImportanceScores(
        method="magnitude",
        sequence_aggregation="none",
        num_samples=0,
        num_tokens=0,
        model_shape=shape,
        heads={"score": torch.stack(head_scores).double()},
        neurons={"score": torch.stack(neuron_scores).double()},
        hidden={"score": torch.stack([hidden, torch.zeros_like(hidden)], dim=1)},
        block_influence=torch.stack(layer_scores).double(),
    )


def random_importance(model_config, seed: int = 0) -> ImportanceScores:
    """Random baseline: uniform scores from a seeded generator (the same seed gives the same selection)."""
    shape = model_shape(model_config)
    g = torch.Generator().manual_seed(seed)
    layers = shape["num_hidden_layers"]

    def rand(*size):
        return torch.rand(*size, generator=g, dtype=torch.float64)

    hidden = rand(layers, shape["hidden_size"])
    return ImportanceScores(
        method="random",
        sequence_aggregation="none",
        num_samples=0,
        num_tokens=0,
        model_shape=shape,
        heads={"score": rand(layers, shape["num_attention_heads"])},
        neurons={"score": rand(layers, shape["intermediate_size"])},
        hidden={"score": torch.stack([hidden, torch.zeros_like(hidden)], dim=1)},
        block_influence=rand(layers),
    )
