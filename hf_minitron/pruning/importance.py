"""Minitron importance estimation (paper 1, §2.2): forward passes only, every axis from one pass.

* Heads: the input of `o_proj` viewed as `[heads, head_dim]`, L2 norm over `head_dim`.
* MLP neurons: the input of `down_proj`.
* Embedding channels: the outputs of the norms that feed attention and the MLP, in every layer.
* Depth: Block Influence, 1 - cos(layer input, layer output), from the same pass; on request, that of every block of
  contiguous layers too (1 - cos(input of its first layer, output of its last)).

Activations are reduced over the tokens of each sample first (`sequence_aggregation`), then over samples
(`batch_aggregation`). We keep the running *sum* and *sum of squares* of the per-sample values, in float64, so that
(a) any batch aggregation can be chosen after the fact, (b) scores add up exactly across batches and processes:
several processes over shards of the data give the same scores as one process over all of it.

One module, past 500 lines: the one calibration pass, its collector and `ImportanceScores` (saved, loaded and checked
against a model) share one layout of the statistics; what each structure records and how it is scored lives in its own
module.
"""

import json
import os
from dataclasses import field, make_dataclass

import torch
from tqdm.auto import tqdm

from ..architectures import check_causal_lm, get_architecture, get_decoder_layers, model_shape
from ..data import shard_batches, take_samples
from ..fingerprints import weights_fingerprint
from ..runtime import all_reduce_, dist_info, input_device, release_freed_memory
from ..validation import check_sequence_length
from .config import BATCH_AGGREGATIONS, PrunedConfig
from .structures import (
    STRUCTURES,
    WIDTH_STRUCTURES,
    attention_experts,
    attention_heads,
    expert_neurons,
    hidden_channels,
    in_layer,
    mamba_heads,
    mlp_neurons,
    routed_experts,
    shared_expert_neurons,
    structures_of,
)

# `depth` is also estimate_importance's switch for Block Influence, hence the module's longer name here.
from .structures import depth as depth_structure


SCORES_WEIGHTS_NAME = "importance.safetensors"
SCORES_META_NAME = "importance.json"
# The per-structure statistics of `ImportanceScores` (each width structure's `SCORE_KEYS`), saved as
# `{axis}.{statistic}` tensors.
_AXES = tuple(dict.fromkeys(key for structure in WIDTH_STRUCTURES for key in structure.SCORE_KEYS))
# A seed means a selection: the random baseline draws every score from one generator, in this order (`block_influence`
# is the layers'), whatever the order of the structures. The keys of a structure not listed are drawn after these.
_RANDOM_DRAWS = (
    "hidden",
    "heads",
    "neurons",
    depth_structure.KEY,
    "experts",
    "expert_neurons",
    "shared_neurons",
    "mamba",
    "attention_experts",
)


_DOC = """Importance statistics of one model, from which the kept structures are chosen.

    Per-structure statistics are dicts of tensors, one field per score key of the width structures (`SCORE_KEYS`:
    {keys}): `{{"sum", "sumsq"}}` (accumulated over samples) for activation importance, or `{{"score"}}` for the static
    baselines (weight magnitude, random). Each statistic starts with `[num_layers, *dims]`, the dims of its structure's
    `score_shapes` (e.g. `heads`: `[num_layers, num_attention_heads]`); what a structure records and how it reduces it
    are in its module's docstring. In a hybrid, the rows of the layers without a structure's block stay zero.

    Args:
        method, sequence_aggregation, num_samples, num_tokens: how the statistics were gathered.
        model_shape (`dict`): `model_shape` of the model they describe.
        block_influence (`torch.Tensor` of shape `[num_layers]`, *optional*): 1 - mean cos(input, output) per layer.
        block_influence_matrix (`torch.Tensor` of shape `[num_layers, num_layers]`, *optional*): `[i, j]` (i <= j) is
            the Block Influence of the contiguous layers i..j, 1 - mean cos(input of layer i, output of layer j) (paper
            1 §2.2); its diagonal is `block_influence`, and it is zero below the diagonal. Estimated only for
            `PrunedConfig.contiguous_score="block_influence"`.
        layer_loss (`torch.Tensor` of shape `[num_layers]`, *optional*): LM loss with each single layer dropped.
        base_loss (`float`, *optional*): LM loss of the unpruned model on the same depth samples.
        block_losses (`dict[int, list[float]]`, *optional*): for a block length n, the LM loss when layers
            `[start, start + n)` are dropped, for every start (`None` for a block that screening did not rescore).
        model_fingerprint (`str`, *optional*): `weights_fingerprint` of the model the scores were estimated on:
            pruning another model of the same shape with them is refused.
    """

# The fields besides the structures' statistics (the layers' own scores are depth's, measured in the same pass).
_FIELDS = [
    ("method", str),
    ("sequence_aggregation", str),
    ("num_samples", int),
    ("num_tokens", int),
    ("model_shape", dict),
    *((axis, dict[str, torch.Tensor], field(default_factory=dict, kw_only=True)) for axis in _AXES),
    ("block_influence", torch.Tensor | None, field(default=None, kw_only=True)),
    ("block_influence_matrix", torch.Tensor | None, field(default=None, kw_only=True)),
    ("model_fingerprint", str | None, field(default=None, kw_only=True)),
    ("layer_loss", torch.Tensor | None, field(default=None, kw_only=True)),
    ("base_loss", float | None, field(default=None, kw_only=True)),
    ("block_losses", dict[int, list[float]], field(default_factory=dict, kw_only=True)),
]


class _ImportanceScoresMethods:
    """What `ImportanceScores` does with its statistics; their fields come from the structures' `SCORE_KEYS`."""

    # ------------------------------------------------------------------ reductions (each structure owns its own)
    def head_scores(self, batch_aggregation: str = "l2") -> torch.Tensor:
        """`[num_layers, num_attention_heads]` query-head importance."""
        return attention_heads.scores(self, _checked(batch_aggregation))

    def kv_group_scores(self, batch_aggregation: str = "l2") -> torch.Tensor:
        """`[num_layers, num_key_value_heads]`: L2 over the query heads of each KV group."""
        return attention_heads.group_scores(self, _checked(batch_aggregation))

    def neuron_scores(self, batch_aggregation: str = "l2") -> torch.Tensor:
        """`[num_layers, intermediate_size]` MLP-neuron importance."""
        return mlp_neurons.scores(self, _checked(batch_aggregation))

    def hidden_scores_per_layer(self, batch_aggregation: str = "l2") -> torch.Tensor:
        """`[num_layers, hidden_size]`: per layer, the two norm outputs reduced separately, then added."""
        return hidden_channels.scores_per_layer(self, _checked(batch_aggregation))

    def hidden_scores(self, batch_aggregation: str = "l2", layers: list[int] | None = None) -> torch.Tensor:
        """`[hidden_size]`: ONE global ranking, summed over `layers` (all by default)."""
        return hidden_channels.scores(self, _checked(batch_aggregation), layers)

    def expert_scores(self, expert_importance: str = "reap") -> torch.Tensor:
        """`[num_layers, num_experts]` routed-expert importance (`"output_norm"`, `"reap"` or `"frequency"`)."""
        if expert_importance not in routed_experts.EXPERT_IMPORTANCE:
            raise ValueError(
                f"expert_importance={expert_importance!r} is not one of {list(routed_experts.EXPERT_IMPORTANCE)}."
            )
        return routed_experts.scores(self, expert_importance)

    def attention_expert_scores(self, expert_importance: str = "reap") -> torch.Tensor:
        """`[num_layers, num_experts]` attention-expert importance (JetMoE), as `expert_scores`."""
        self.expert_scores(expert_importance)  # validates the name
        return attention_experts.expert_scores(self, expert_importance)

    def expert_neuron_scores(self) -> torch.Tensor:
        """`[num_layers, num_experts, moe_intermediate_size]` expert-neuron importance."""
        return expert_neurons.scores(self)

    def shared_neuron_scores(self, batch_aggregation: str = "l2") -> torch.Tensor:
        """`[num_layers, shared_expert_intermediate_size]` shared-expert neuron importance."""
        return shared_expert_neurons.scores(self, _checked(batch_aggregation))

    def mamba_head_scores(self, batch_aggregation: str = "l2") -> torch.Tensor:
        """`[num_layers, mamba_num_heads]`: each Mamba head's L2 over all its channels (selection ranks heads over
        the kept channels only, see `structures/mamba_heads.py`)."""
        channels = mamba_heads.scores(self, _checked(batch_aggregation))
        return mamba_heads.head_scores(channels, self.model_shape["mamba_num_heads"])

    def mamba_head_dim_scores(self, batch_aggregation: str = "l2") -> torch.Tensor:
        """`[num_layers, mamba_head_dim]`: each Mamba head channel's L2 over the heads."""
        channels = mamba_heads.scores(self, _checked(batch_aggregation))
        return mamba_heads.head_dim_scores(channels, self.model_shape["mamba_num_heads"])

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
        for axis in _AXES:
            for key, value in getattr(self, axis).items():
                out[f"{axis}.{key}"] = value.contiguous()
        if self.block_influence is not None:
            out["block_influence"] = self.block_influence
        if self.block_influence_matrix is not None:
            out["block_influence_matrix"] = self.block_influence_matrix
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

        from ..io import OUTPUT_MARKER, atomic_directory, atomic_file, atomic_write_json

        meta = {
            "method": self.method,
            "sequence_aggregation": self.sequence_aggregation,
            "num_samples": self.num_samples,
            "num_tokens": self.num_tokens,
            "model_shape": self.model_shape,
            "base_loss": self.base_loss,
            "block_losses": {str(k): v for k, v in self.block_losses.items()},
        }
        if self.model_fingerprint is not None:
            meta["model_fingerprint"] = self.model_fingerprint
        tensors = self._tensors()
        directory = os.fspath(directory)
        # Our own output marker (io.OUTPUT_MARKER) does not make a scores folder shared with other files.
        names = set(os.listdir(directory)) - {OUTPUT_MARKER} if os.path.isdir(directory) else set()
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
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        meta_path = os.path.join(directory, SCORES_META_NAME)
        weights_path = os.path.join(directory, SCORES_WEIGHTS_NAME)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"No importance scores in {directory!r} (expected {SCORES_META_NAME}).")
        fix = "it was truncated or edited by hand: estimate the scores again (estimate_importance) and save them."
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            tensors = load_file(weights_path)
        except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as error:
            raise ValueError(f"Cannot read the importance scores in {directory!r} ({error}): {fix}") from None
        axes = {axis: {} for axis in _AXES}
        for name, value in tensors.items():
            axis, _, key = name.partition(".")
            if axis in axes:
                axes[axis][key] = value
        try:
            return cls(
                method=meta["method"],
                sequence_aggregation=meta["sequence_aggregation"],
                num_samples=meta["num_samples"],
                num_tokens=meta["num_tokens"],
                model_shape=meta["model_shape"],
                block_influence=tensors.get("block_influence"),
                block_influence_matrix=tensors.get("block_influence_matrix"),  # absent from older saved scores
                layer_loss=tensors.get("layer_loss"),
                base_loss=meta.get("base_loss"),
                block_losses={int(k): v for k, v in meta.get("block_losses", {}).items()},
                model_fingerprint=meta.get("model_fingerprint"),
                **axes,
            )
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise ValueError(f"{meta_path!r} is not a valid {SCORES_META_NAME} (missing {error}): {fix}") from None

    def _expected_shapes(self) -> dict[str, tuple]:
        """`{axis: shape}` of the statistics (leading dims) for this model shape: those of every structure whose
        targets the shape has."""
        s = self.model_shape
        shapes = {}
        for structure in STRUCTURES:
            if structure is not depth_structure and all(name in s for name in structure.FIELDS):
                shapes |= {key: (s["num_hidden_layers"], *dims) for key, dims in structure.score_shapes(s).items()}
        return shapes

    def check_compatible(self, model_config, model=None) -> None:
        """Raises if these scores were computed on a model of another shape (or, given `model`, with other weights),
        if their tensors do not fit that shape, or if they hold inf/NaN."""
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
        for axis, expected in self._expected_shapes().items():
            for key, tensor in getattr(self, axis).items():
                if tuple(tensor.shape[: len(expected)]) != expected:
                    raise ValueError(
                        f"The importance scores' {axis}.{key} has shape {tuple(tensor.shape)}, but this model needs "
                        f"{expected}: the scores file was edited or comes from another model. Estimate them again."
                    )
        num_layers = self.model_shape["num_hidden_layers"]
        matrix = self.block_influence_matrix
        if matrix is not None and tuple(matrix.shape) != (num_layers, num_layers):
            raise ValueError(
                f"The importance scores' block_influence_matrix has shape {tuple(matrix.shape)}, but this model needs "
                f"{(num_layers, num_layers)}: the scores file was edited or comes from another model. Estimate them "
                "again."
            )
        if model is not None and self.model_fingerprint is not None:
            from ..fingerprints import weights_fingerprint

            fingerprint = weights_fingerprint(model)
            if fingerprint is not None and fingerprint != self.model_fingerprint:
                raise ValueError(
                    "The importance scores were estimated on a model of the same shape but other weights (e.g. the "
                    "teacher before teacher correction, or another checkpoint): their rankings do not describe this "
                    "model. Estimate them again on this model (estimate_importance)."
                )
        for axis, stats in self._tensors().items():
            if not bool(torch.isfinite(stats).all()):
                raise ValueError(
                    f"The importance scores hold inf/NaN ({axis}): they were estimated on an overflowing model. "
                    "Estimate them again with the model in bfloat16 or float32."
                )


# A dataclass like any other, with one statistics field per score key, so that a new structure's needs no edit here.
ImportanceScores = make_dataclass(
    "ImportanceScores",
    _FIELDS,
    bases=(_ImportanceScoresMethods,),
    namespace={"__doc__": _DOC.format(keys=", ".join(f"`{axis}`" for axis in _AXES)), "__module__": __name__},
)


def _checked(batch_aggregation: str) -> str:
    if batch_aggregation not in BATCH_AGGREGATIONS:
        raise ValueError(f"batch_aggregation={batch_aggregation!r} is not one of {list(BATCH_AGGREGATIONS)}.")
    return batch_aggregation


# ---------------------------------------------------------------------------------------------- activation importance
class _Collector:
    """Forward hooks of every structure of the family, accumulating statistics for every decoder layer.

    Each structure's `hooks(collector, layer_index, layer)` registers its hooks and adds into
    `collector.store(key, layer_index, slot)`, a dict of float64 running sums.
    """

    def __init__(self, model, sequence_aggregation: str, depth: bool, spec=None, blocks: bool = False):
        self.spec = get_architecture(model.config, spec)
        self.layers = get_decoder_layers(model)
        self.shape = model_shape(model.config)
        self.how = sequence_aggregation
        self.structures = structures_of(self.spec) + ((depth_structure,) if depth else ())
        self.mask: torch.Tensor | None = None  # [B, S] float, the batch's attention mask
        self.token_mask: torch.Tensor | None = None  # [B * S], as MoE blocks flatten the tokens
        self.sample_mask: torch.Tensor | None = None  # the mask, or None when no token is padded
        self.stats: dict[tuple[str, int, int], dict] = {}
        # With `blocks`, the current batch's layer inputs `[tokens, layers, hidden]` and their norms, for the Block
        # Influence of contiguous blocks (`depth_structure.hooks` fills and empties it).
        self.blocks: dict[str, torch.Tensor] | None = {} if blocks else None
        self.handles = []

    def store(self, key: str, index: int, slot: int = 0) -> dict:
        return self.stats.setdefault((key, index, slot), {})

    def __enter__(self):
        for i, layer in enumerate(self.layers):
            for structure in self.structures:
                if in_layer(self.spec, layer, structure):  # a hybrid's layer holds one block
                    self.handles += structure.hooks(self, i, layer)
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.blocks is not None:
            self.blocks.clear()  # a forward that raised midway leaves hidden states there

    def stacked(self, key: str, width: int | tuple | None, slots: int, names: tuple[str, ...], device) -> dict:
        """`{name: [num_layers, (slots,) width]}` sums over every process (zeros where a process saw no batch)."""
        out = {}
        for name in names:
            rows = []
            for i in range(len(self.layers)):
                per_slot = []
                for slot in range(slots):
                    value = self.stats.get((key, i, slot), {}).get(name)
                    empty = torch.zeros(() if width is None else width, dtype=torch.float64)
                    per_slot.append(value.cpu() if value is not None else empty)
                rows.append(per_slot[0] if slots == 1 else torch.stack(per_slot))
            out[name] = all_reduce_(torch.stack(rows), device)
        return out

    def check_finite(self, batch_index: int, dtype: torch.dtype) -> None:
        """Raises at the first site (in forward order) whose statistics hold inf/NaN: one overflowing activation
        (typically float16) would otherwise turn every score that depends on it into NaN, silently."""
        # One device sync per batch on the healthy path; the sites are searched only once something is non-finite.
        sums = [t for store in self.stats.values() for t in store.values()]
        if not sums:
            return
        flags = [torch.isfinite(t).all().to(sums[0].device) for t in sums]
        if bool(torch.stack(flags).all()):
            return
        sites = sorted(site for structure in self.structures for site in structure.sites(self.spec))
        for i in range(len(self.layers)):
            for _, key, slot, site in sites:
                store = self.stats.get((key, i, slot), {})
                if not all(bool(torch.isfinite(t).all()) for t in store.values()):
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


@torch.no_grad()
def estimate_importance(
    model,
    calibration_data,
    config: PrunedConfig | None = None,
    *,
    depth: bool = True,
    show_progress: bool = True,
    spec=None,
) -> ImportanceScores:
    """Activation importance of every head, neuron, embedding channel and layer, from forward passes only.

    Args:
        model (`PreTrainedModel`): a supported `*ForCausalLM` (see `hf_minitron.ARCHITECTURES`), on any device,
            in any dtype; statistics accumulate in float64.
        calibration_data: a `datasets.Dataset`, a list of samples, or an iterable of batches, each a mapping with
            `input_ids` (and optionally `attention_mask`; padded positions are excluded).
        config (`PrunedConfig`, *optional*): `calibration_samples`, `calibration_batch_size` and
            `sequence_aggregation` are read from it.
        depth (`bool`, *optional*, defaults to `True`): also compute Block Influence per layer, and with
            `config.contiguous_score="block_influence"` that of every block of contiguous layers
            (`block_influence_matrix`), which holds each layer's input until the batch's forward ends.
        show_progress (`bool`, *optional*, defaults to `True`): a progress bar on the main process.
        spec (`ArchitectureSpec`, *optional*): where the modules of a family outside `hf_minitron.ARCHITECTURES`
            live (see `get_architecture`).

    Under torch.distributed, each process takes every `world_size`-th sample of the first `calibration_samples` and
    the statistics are summed across processes, so the result equals a single process over all the data.
    """
    config = config or PrunedConfig()
    if not isinstance(config, PrunedConfig):
        raise TypeError(f"config must be a PrunedConfig, got {type(config).__name__}.")
    check_causal_lm(model, "estimate_importance")
    spec = get_architecture(model.config, spec)  # fails fast for unsupported architectures
    samples = take_samples(calibration_data, config.calibration_samples, model.get_input_embeddings().num_embeddings)
    longest = max(sample["input_ids"].shape[-1] for sample in samples)
    check_sequence_length(model.config, longest, "calibration sample length")
    rank, world_size = dist_info()
    batches = shard_batches(samples, config.calibration_batch_size, rank, world_size)
    device = input_device(model)
    base = getattr(model, model.base_model_prefix)
    was_training = model.training
    model.eval()
    num_tokens = 0
    try:
        blocks = depth and config.contiguous_score == "block_influence"
        collector = _Collector(model, config.sequence_aggregation, depth, spec, blocks)
        # glibc's usual heap, not large_buffers_returned_to_os: with every buffer of 1 MiB or more mmap'ed, each
        # activation is page-faulted in anew, and the pass cost 1.11-1.20x a plain forward on SmolLM2 (1.61x on the
        # embedded hybrid, whose torch-path Mamba2 scan allocates many) against 1.03-1.08x (1.12x) on the heap. The
        # peak barely moves (1.15x the model mmap'ed, 1.17-1.19x on the heap, SmolLM2 16 x 128; glibc's heap sometimes
        # fragments to ~1.5x): buffers of 32 MiB and more, a large model's activations, are mmap'ed either way, and
        # the heap is handed back to the OS after the pass.
        with collector:
            for batch_index, batch in enumerate(
                tqdm(batches, desc="Importance estimation", disable=not show_progress or rank != 0, unit="batch")
            ):
                mask = batch["attention_mask"].to(device)
                collector.mask = mask.float()
                collector.token_mask = collector.mask.reshape(-1)
                # One host sync per batch buys mask-free reductions in every hook when nothing is padded.
                collector.sample_mask = None if bool(mask.all()) else collector.mask
                num_tokens += int(mask.sum())
                # The base model only: importance needs no logits, and the LM head is a large share of the compute.
                base(input_ids=batch["input_ids"].to(device), attention_mask=mask, use_cache=False)
                collector.check_finite(batch_index, model.dtype)
    finally:
        model.train(was_training)
        release_freed_memory()  # the activations' heap blocks would otherwise add to the pruning step's peak

    shape = model_shape(model.config)
    stats = {}
    for structure in structures_of(spec):
        stats |= structure.collect(collector, shape, device)
    counts = all_reduce_(torch.tensor([len(samples[rank::world_size]), num_tokens], dtype=torch.float64), device)
    total_samples, total_tokens = int(counts[0]), int(counts[1])
    block_influence = block_influence_matrix = None
    if depth:
        cos = collector.stacked(depth_structure.KEY, None, 1, ("sum",), device)["sum"]
        block_influence = 1 - cos / max(total_tokens, 1)
    if blocks:
        # Rows are the block's last layer, columns its first: transposed to [first, last].
        cos = collector.stacked(depth_structure.BLOCKS_KEY, len(collector.layers), 1, ("sum",), device)["sum"].T
        block_influence_matrix = torch.triu(1 - cos / max(total_tokens, 1))
    return ImportanceScores(
        method="activation",
        sequence_aggregation=config.sequence_aggregation,
        num_samples=total_samples,
        num_tokens=total_tokens,
        model_shape=shape,
        block_influence=block_influence,
        block_influence_matrix=block_influence_matrix,
        model_fingerprint=weights_fingerprint(model),
        **{axis: stats.get(axis, {}) for axis in _AXES},
    )


# ---------------------------------------------------------------------------------------------- baselines
@torch.no_grad()
def magnitude_importance(model, spec=None) -> ImportanceScores:
    """Weight-magnitude baseline: each structure scored by the L2 norm of every weight that reads or writes it.
    `spec`: a family's own `ArchitectureSpec` (see `get_architecture`)."""
    spec = get_architecture(model.config, spec)
    shape = model_shape(model.config)
    decoder_layers = get_decoder_layers(model)
    scores = {}
    for structure in structures_of(spec):
        scores |= structure.magnitude_scores(model, decoder_layers, spec, shape)
    return ImportanceScores(
        method="magnitude",
        sequence_aggregation="none",
        num_samples=0,
        num_tokens=0,
        model_shape=shape,
        block_influence=torch.stack([depth_structure.magnitude(layer) for layer in decoder_layers]).double(),
        model_fingerprint=weights_fingerprint(model),
        **{axis: scores.get(axis, {}) for axis in _AXES},
    )


def random_importance(model_config, seed: int = 0, spec=None) -> ImportanceScores:
    """Random baseline: uniform scores from a seeded generator (the same seed gives the same selection). `spec`: a
    family's own `ArchitectureSpec` (see `get_architecture`)."""
    shape = model_shape(model_config)
    g = torch.Generator().manual_seed(seed)
    num_layers = shape["num_hidden_layers"]

    def draw(*dims):
        return torch.rand(num_layers, *dims, generator=g, dtype=torch.float64)

    owners = {key: s for s in structures_of(get_architecture(model_config, spec)) for key in s.SCORE_KEYS}
    scores, block_influence = {}, None
    for key in [*_RANDOM_DRAWS, *(key for key in owners if key not in _RANDOM_DRAWS)]:
        if key == depth_structure.KEY:
            block_influence = draw()
        elif key in owners:
            scores[key] = owners[key].random_scores(key, shape, draw)
    return ImportanceScores(
        method="random",
        sequence_aggregation="none",
        num_samples=0,
        num_tokens=0,
        model_shape=shape,
        block_influence=block_influence,
        **{axis: scores.get(axis, {}) for axis in _AXES},
    )
