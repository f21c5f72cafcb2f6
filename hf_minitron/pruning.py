"""`prune_model`: Minitron structured pruning of a transformers `*ForCausalLM`, in place.

One index set per pruned dimension slices every consumer of that dimension, so the result is an ordinary model of
the same class, with a consistent config, that `AutoModelForCausalLM.from_pretrained` loads anywhere.
"""

import json
import os
import types
from dataclasses import dataclass, field

import torch
from torch import nn

from .architectures import ArchitectureSpec, get_architecture, get_base_model, get_decoder_layers
from .data import take_samples
from .depth import select_layers_to_drop
from .importance import (
    ImportanceScores,
    estimate_importance,
    magnitude_importance,
    model_shape,
    random_importance,
    release_freed_memory,
    return_large_buffers_to_os,
)
from .io import atomic_write_json
from .pruning_config import PRUNED_CONFIG_NAME, PrunedConfig


PRUNING_RECORD_NAME = "pruning_record.json"


@dataclass
class PruningRecord:
    """What was kept, per axis and per layer (indices into the source model), for audit and reproduction."""

    pruned_config: dict
    source_shape: dict
    target_shape: dict
    kept_layers: list[int]
    dropped_layers: list[int]
    hidden: list[int] | None = None
    heads: dict[int, list[int]] = field(default_factory=dict)
    kv_heads: dict[int, list[int]] = field(default_factory=dict)
    neurons: dict[int, list[int]] = field(default_factory=dict)
    importance: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            k: ({str(i): v for i, v in val.items()} if isinstance(val, dict) and k in _LAYER_KEYED else val)
            for k, val in self.__dict__.items()
        }

    def save(self, directory: str | os.PathLike) -> None:
        atomic_write_json(os.path.join(directory, PRUNING_RECORD_NAME), self.to_dict(), indent=1)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "PruningRecord":
        with open(os.path.join(directory, PRUNING_RECORD_NAME), encoding="utf-8") as f:
            data = json.load(f)
        for key in _LAYER_KEYED:
            data[key] = {int(i): v for i, v in data.get(key, {}).items()}
        return cls(**data)


_LAYER_KEYED = ("heads", "kv_heads", "neurons")


# ---------------------------------------------------------------------------------------------- selection
def _topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in ascending index order (keeps the original order of what is kept)."""
    if k >= scores.numel():
        return torch.arange(scores.numel())
    return torch.sort(torch.topk(scores, k, sorted=False).indices).values


def select_heads(head_scores: torch.Tensor, num_kv: int, target_heads: int, target_kv: int, group_scores=None):
    """Kept KV groups and kept query heads of one layer.

    Heads are ranked within their KV group and every kept group keeps the same number of heads, so the grouped
    query structure (query head j attends with KV head j // group_size) survives.
    """
    per_group = head_scores.numel() // num_kv
    if group_scores is None:
        group_scores = head_scores.view(num_kv, per_group).norm(dim=-1)
    kept_groups = _topk_sorted(group_scores, target_kv)
    keep_per_group = target_heads // target_kv
    kept = []
    for g in kept_groups.tolist():
        in_group = _topk_sorted(head_scores[g * per_group : (g + 1) * per_group], keep_per_group)
        kept.append(in_group + g * per_group)
    return kept_groups, torch.cat(kept)


# ---------------------------------------------------------------------------------------------- slicing primitives
def _replace_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def slice_linear(linear: nn.Linear, out_index: torch.Tensor | None = None, in_index: torch.Tensor | None = None):
    """Keeps the given output rows / input columns of `linear` (the old weight is freed: no second copy)."""
    weight = linear.weight.data
    if out_index is not None:
        weight = weight.index_select(0, out_index.to(weight.device))
        if linear.bias is not None:
            _replace_parameter(linear, "bias", linear.bias.data.index_select(0, out_index.to(weight.device)))
        linear.out_features = weight.shape[0]
    if in_index is not None:
        weight = weight.index_select(1, in_index.to(weight.device))
        linear.in_features = weight.shape[1]
    _replace_parameter(linear, "weight", weight)


def slice_norm(norm: nn.Module, index: torch.Tensor) -> None:
    """Slices a (RMS/Layer)Norm over the hidden size: weight, bias, and LayerNorm's `normalized_shape`."""
    for name in ("weight", "bias"):
        param = getattr(norm, name, None)
        if isinstance(param, nn.Parameter):
            _replace_parameter(norm, name, param.data.index_select(0, index.to(param.device)))
    if isinstance(norm, nn.LayerNorm):
        norm.normalized_shape = (index.numel(),)


def _head_rows(heads: torch.Tensor, head_dim: int, offset: int = 0) -> torch.Tensor:
    """Row indices of whole heads in a projection laid out as `[heads * head_dim]`."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1) + offset


# ---------------------------------------------------------------------------------------------- per-axis pruning
def _prune_attention(attn, spec: ArchitectureSpec, shape: dict, kept_heads, kept_groups) -> None:
    head_dim, heads, kv = shape["head_dim"], shape["num_attention_heads"], shape["num_key_value_heads"]
    q_rows = _head_rows(kept_heads, head_dim)
    kv_rows = _head_rows(kept_groups, head_dim)
    if spec.qkv_proj:
        rows = torch.cat([q_rows, kv_rows + heads * head_dim, kv_rows + (heads + kv) * head_dim])
        slice_linear(getattr(attn, spec.qkv_proj), out_index=rows)
    else:
        slice_linear(getattr(attn, spec.q_proj), out_index=q_rows)
        slice_linear(getattr(attn, spec.k_proj), out_index=kv_rows)
        slice_linear(getattr(attn, spec.v_proj), out_index=kv_rows)
    slice_linear(getattr(attn, spec.o_proj), in_index=q_rows)


def _merge_pruned_heads(attn, spec: ArchitectureSpec, shape: dict, head_scores: torch.Tensor, kept_heads) -> None:
    """Residual head merge (paper 1, §2.3), applied within each KV group to the heads' `o_proj` columns.

    With the K kept heads of a group ranked by importance (1 = most important) and its L - K pruned heads ranked
    after them, head K - (L - K) + j absorbs pruned head K + (L - K) - j + 1, mirroring around the cut as in the
    paper: `head_i <- head_i + (head_i - head_{2K-i+1})`. It is the MHA analogue of Layer Collapse; the pruned
    head's output path is folded into a kept head before it is removed. Its effect is measured, not assumed (see
    `benchmarks/prune_quality.py`).
    """
    head_dim, heads, kv = shape["head_dim"], shape["num_attention_heads"], shape["num_key_value_heads"]
    per_group = heads // kv
    kept_set = set(kept_heads.tolist())
    o = getattr(attn, spec.o_proj).weight.data
    cols = o.view(o.shape[0], heads, head_dim)
    for g in range(kv):
        group = list(range(g * per_group, (g + 1) * per_group))
        ranked = sorted(group, key=lambda h: -float(head_scores[h]))
        kept = [h for h in ranked if h in kept_set]
        pruned = [h for h in ranked if h not in kept_set]
        if not kept or not pruned:
            continue
        total = len(group)
        k = len(kept)
        for i in range(max(1, k - (total - k) + 1), k + 1):  # 1-based ranks, as in the paper
            partner = 2 * k - i + 1
            if partner > total:
                continue
            h_i, h_p = ranked[i - 1], ranked[partner - 1]
            cols[:, h_i] += cols[:, h_i] - cols[:, h_p]


def _prune_mlp(mlp, spec: ArchitectureSpec, shape: dict, kept: torch.Tensor) -> None:
    if spec.gate_up_proj:
        slice_linear(getattr(mlp, spec.gate_up_proj), out_index=torch.cat([kept, kept + shape["intermediate_size"]]))
    else:
        slice_linear(getattr(mlp, spec.up_proj), out_index=kept)
        if spec.gate_proj:
            slice_linear(getattr(mlp, spec.gate_proj), out_index=kept)
    slice_linear(getattr(mlp, spec.down_proj), in_index=kept)


def _prune_hidden(model, spec: ArchitectureSpec, kept: torch.Tensor) -> None:
    # Decoder layers first, and their freed weights handed back, so that the embedding's new copy (the largest
    # single tensor) reuses that memory instead of adding to the peak.
    for layer in get_decoder_layers(model):
        attn, mlp = getattr(layer, spec.attention), getattr(layer, spec.mlp)
        for name in spec.residual_norms:
            slice_norm(getattr(layer, name), kept)
        for name in (spec.q_proj, spec.k_proj, spec.v_proj, spec.qkv_proj):
            if name:
                slice_linear(getattr(attn, name), in_index=kept)
        slice_linear(getattr(attn, spec.o_proj), out_index=kept)
        for name in (spec.gate_proj, spec.up_proj, spec.gate_up_proj):
            if name:
                slice_linear(getattr(mlp, name), in_index=kept)
        slice_linear(getattr(mlp, spec.down_proj), out_index=kept)
    slice_norm(get_base_model(model).norm, kept)
    release_freed_memory()

    embed = model.get_input_embeddings()
    lm_head = model.get_output_embeddings()
    tied = lm_head is not None and lm_head.weight is embed.weight
    _replace_parameter(embed, "weight", embed.weight.data.index_select(1, kept.to(embed.weight.device)))
    embed.embedding_dim = kept.numel()
    if spec.embedding_scale_sqrt_hidden:
        # Gemma scales embeddings by sqrt(hidden_size) from the config: match what a reload will compute.
        scale = kept.numel() ** 0.5
        embed.scalar_embed_scale = scale
        embed.embed_scale.fill_(scale)
    if tied:
        lm_head.weight = embed.weight
    elif lm_head is not None:
        release_freed_memory()
        slice_linear(lm_head, in_index=kept)


def drop_layers(model, layers_to_drop: list[int]) -> list[int]:
    """Removes decoder layers in place and renumbers the rest; returns the kept (source) indices."""
    layers = get_decoder_layers(model)
    num_layers = len(layers)
    drop = set(layers_to_drop)
    kept = [i for i in range(num_layers) if i not in drop]
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


def _sync_module_attributes(model) -> None:
    """Updates the size attributes that modules cache at init from the (now pruned) config."""
    config = model.config
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    for module in model.modules():
        if isinstance(getattr(module, "num_key_value_groups", None), int):
            module.num_key_value_groups = heads // kv
        for name, value in (
            ("num_heads", heads),
            ("num_attention_heads", heads),
            ("num_key_value_heads", kv),
            ("hidden_size", config.hidden_size),
            ("intermediate_size", config.intermediate_size),
        ):
            if isinstance(getattr(module, name, None), int) and not isinstance(module, nn.Linear):
                setattr(module, name, value)


# ---------------------------------------------------------------------------------------------- the entry point
def _save_pretrained_with_record(self, save_directory, *args, **kwargs):
    """`save_pretrained` of a pruned model: the usual files, plus `pruned_config.json` and `pruning_record.json`."""
    type(self).save_pretrained(self, save_directory, *args, **kwargs)
    record = getattr(self, "pruning_record", None)
    if record is not None and kwargs.get("is_main_process", True):
        PrunedConfig(**record.pruned_config).save_pretrained(save_directory)
        record.save(save_directory)


def check_target_loads(model_config, target: dict):
    """Returns the target config, built with the installed transformers, so a shape that stock `from_pretrained` would
    reject (e.g. transformers 5's `LlamaConfig` wants `hidden_size % num_attention_heads == 0`) fails before any
    expensive work, with the nearest valid sizes."""
    data = model_config.to_dict()
    num_layers = model_config.num_hidden_layers
    for key, value in list(data.items()):
        if isinstance(value, list) and len(value) == num_layers and key != "architectures":
            data[key] = value[: target["num_hidden_layers"]]
    data.update(target)
    data["head_dim"] = (
        getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    )
    try:
        return type(model_config).from_dict(data)
    except Exception as error:  # the config classes raise several error types
        heads = target["num_attention_heads"]
        hidden = target["hidden_size"]
        reason = str(error).strip().splitlines()[-1].strip()
        lower, upper = hidden - hidden % heads, hidden - hidden % heads + heads
        raise ValueError(
            f"The pruned shape would not load with stock transformers: {type(model_config).__name__} rejects "
            f"hidden_size={hidden} with num_attention_heads={heads} ({reason}). "
            f"Fix PrunedConfig: e.g. hidden_size={lower} or {upper} (multiples of {heads}), or another head count."
        ) from None


def check_not_offloaded(model) -> None:
    """Slicing needs every weight in memory. accelerate's offload (a `device_map` with "cpu"/"disk" next to GPUs,
    `cpu_offload`, `disk_offload`) leaves `meta` placeholders in the model and the real weights in its hooks."""
    offloaded = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise ValueError(
            f"prune_model cannot slice offloaded weights: {len(offloaded)} parameters (e.g. {offloaded[0]}) are "
            "placeholders on the 'meta' device, their values held by accelerate's offload hooks. Importance works on "
            "an offloaded model: `scores = estimate_importance(model, data, config)`. Then load the model without "
            "offload for the pruning step (device_map=None, or a device_map whose GPUs hold every weight) and call "
            "`prune_model(model, config, scores=scores)`."
        )


def compute_scores(model, config: PrunedConfig, calibration_data=None, show_progress: bool = True) -> ImportanceScores:
    """Importance scores with `config.importance`: Minitron activations, or the magnitude / random baselines."""
    if config.importance == "activation":
        if calibration_data is None:
            raise ValueError(
                "importance='activation' needs calibration_data (tokenized samples): pass it, pass precomputed "
                "scores=..., or choose importance='magnitude' or 'random'."
            )
        return estimate_importance(model, calibration_data, config, show_progress=show_progress)
    if config.importance == "magnitude":
        return magnitude_importance(model)
    return random_importance(model.config, config.seed)


@torch.no_grad()
def prune_model(
    model,
    config: PrunedConfig,
    calibration_data=None,
    *,
    scores: ImportanceScores | None = None,
    depth_scorer=None,
    show_progress: bool = True,
):
    """Prunes `model` in place to the shape of `config` and returns it (an ordinary model of the same class).

    Args:
        model (`PreTrainedModel`): a supported `*ForCausalLM` (see `hf_minitron.ARCHITECTURES`).
        config (`PrunedConfig`): the target shape and importance options; validated before any forward pass.
        calibration_data (*optional*): tokenized samples for importance estimation and LM-loss depth scoring
            (see `estimate_importance`). Not needed when `scores` are given for width-only or block-influence targets.
        scores (`ImportanceScores`, *optional*): precomputed scores of this model (estimate once, prune many targets).
        depth_scorer (`Callable[[PreTrainedModel], float]`, *optional*): higher-is-better score (e.g. an lm-eval
            accuracy) used instead of the LM loss to pick the contiguous block / the layers to drop.
        show_progress (`bool`, *optional*, defaults to `True`): progress bars.

    Returns:
        The pruned model, carrying `model.pruning_record` (kept indices). Its `save_pretrained` also writes
        `pruned_config.json` and `pruning_record.json`.
    """
    if not isinstance(config, PrunedConfig):
        raise TypeError(f"config must be a PrunedConfig, got {type(config).__name__}.")
    check_not_offloaded(model)
    spec = get_architecture(model.config)
    target = config.resolve(model.config)  # every ValueError before any forward pass
    check_target_loads(model.config, target)
    source = model_shape(model.config)
    if scores is not None:
        scores.check_compatible(model.config)
    num_to_drop = source["num_hidden_layers"] - target["num_hidden_layers"]
    needs_samples = (
        num_to_drop > 0
        and config.depth_method in ("lm_loss", "contiguous")
        and config.importance == "activation"
        and depth_scorer is None
    )
    if (
        needs_samples
        and calibration_data is None
        and not (scores is not None and (scores.block_losses.get(num_to_drop) or scores.layer_loss is not None))
    ):
        raise ValueError(
            f"depth_method={config.depth_method!r} scores layer removals by LM loss and needs calibration_data: pass "
            "it, pass depth_scorer=..., or use depth_method='block_influence' with precomputed scores."
        )
    width_axes = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    needs_width = any(target[name] < source[name] for name in width_axes)
    needs_layer_scores = num_to_drop > 0 and (
        config.depth_method == "block_influence" or config.importance != "activation"
    )
    return_large_buffers_to_os()  # weights freed while slicing go back to the OS at once
    if scores is None and (needs_width or needs_layer_scores):
        scores = compute_scores(model, config, calibration_data, show_progress)

    # 1. Depth: choose layers on the full model (all axes were scored in one pass, paper 1 §2.2).
    if config.depth_method == "explicit" and config.layers_to_drop:
        dropped = list(config.layers_to_drop)
    elif num_to_drop > 0:
        depth_method = config.depth_method
        if config.importance != "activation" and depth_method != "block_influence":
            depth_method = "block_influence"  # the baselines rank layers by their own static scores
        samples = (
            take_samples(calibration_data, config.depth_calibration_samples) if calibration_data is not None else None
        )
        dropped = select_layers_to_drop(
            model,
            num_to_drop,
            depth_method,
            scores,
            samples,
            depth_scorer,
            config.calibration_batch_size,
            show_progress,
        )
    else:
        dropped = []
    kept_layers = drop_layers(model, dropped) if dropped else list(range(source["num_hidden_layers"]))
    release_freed_memory()

    # 2. Width: one index set per axis, from the scores of the layers that remain.
    agg = config.batch_aggregation
    record = PruningRecord(
        pruned_config=config.to_dict(),
        source_shape=source,
        target_shape={**source, **target},
        kept_layers=kept_layers,
        dropped_layers=dropped,
        importance={}
        if scores is None
        else {
            "method": scores.method,
            "sequence_aggregation": scores.sequence_aggregation,
            "batch_aggregation": agg,
            "num_samples": scores.num_samples,
            "num_tokens": scores.num_tokens,
        },
    )
    layers = get_decoder_layers(model)
    if target["num_attention_heads"] < source["num_attention_heads"] or (
        target["num_key_value_heads"] < source["num_key_value_heads"]
    ):
        head_scores = scores.head_scores(agg)
        group_scores = scores.kv_group_scores(agg)
        for new_idx, src_idx in enumerate(kept_layers):
            kept_groups, kept_heads = select_heads(
                head_scores[src_idx],
                source["num_key_value_heads"],
                target["num_attention_heads"],
                target["num_key_value_heads"],
                group_scores[src_idx],
            )
            attn = getattr(layers[new_idx], spec.attention)
            if config.head_merge:
                _merge_pruned_heads(attn, spec, source, head_scores[src_idx], kept_heads)
            _prune_attention(attn, spec, source, kept_heads, kept_groups)
            record.heads[new_idx] = kept_heads.tolist()
            record.kv_heads[new_idx] = kept_groups.tolist()
    release_freed_memory()
    if target["intermediate_size"] < source["intermediate_size"]:
        neuron_scores = scores.neuron_scores(agg)
        for new_idx, src_idx in enumerate(kept_layers):
            kept = _topk_sorted(neuron_scores[src_idx], target["intermediate_size"])
            _prune_mlp(getattr(layers[new_idx], spec.mlp), spec, source, kept)
            record.neurons[new_idx] = kept.tolist()
    release_freed_memory()
    if target["hidden_size"] < source["hidden_size"]:
        kept = _topk_sorted(scores.hidden_scores(agg, layers=kept_layers), target["hidden_size"])
        _prune_hidden(model, spec, kept)
        record.hidden = kept.tolist()

    # 3. Config and cached module attributes. head_dim is written explicitly: it no longer equals hidden / heads.
    model.config.head_dim = source["head_dim"]
    for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        setattr(model.config, name, target[name])
    _sync_module_attributes(model)
    model.pruning_record = record
    # A bound method in the instance dict: `copy.deepcopy` rebinds it to the copy, and stock classes stay stock.
    model.save_pretrained = types.MethodType(_save_pretrained_with_record, model)
    return model


def load_pruning_record(directory: str | os.PathLike) -> tuple[PrunedConfig, PruningRecord]:
    """`(PrunedConfig, PruningRecord)` saved next to a pruned checkpoint."""
    if not os.path.isfile(os.path.join(directory, PRUNED_CONFIG_NAME)):
        raise FileNotFoundError(f"{directory!r} holds no {PRUNED_CONFIG_NAME}: it was not written by prune_model.")
    return PrunedConfig.from_pretrained(directory), PruningRecord.load(directory)
