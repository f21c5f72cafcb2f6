"""`prune_model`: Minitron structured pruning of a transformers `*ForCausalLM`, in place.

One index set per pruned dimension slices every consumer of that dimension, so the result is an ordinary model of
the same class, with a consistent config, that `AutoModelForCausalLM.from_pretrained` loads anywhere. This module
only walks the structures of the family (`hf_minitron/pruning/structures/`): depth first, then each width structure selects
and slices its own parameters, updates its config fields and the sizes its modules cache.
"""

import json
import os
import types
import weakref
from dataclasses import field, make_dataclass

import torch

from ..architectures import check_causal_lm, get_architecture, get_decoder_layers
from ..data import take_samples
from ..io import atomic_write_json
from ..runtime import large_buffers_returned_to_os, release_freed_memory
from .config import PRUNED_CONFIG_NAME, PrunedConfig
from .importance import ImportanceScores, estimate_importance, magnitude_importance, model_shape, random_importance
from .structures import STRUCTURES, depth, structures_of
from .structures.depth import drop_layers, layers_to_drop_by_type, select_layers_to_drop, sliced_layer_lists
from .verify import check_pruned_model, spec_hint


PRUNING_RECORD_NAME = "pruning_record.json"


_DOC = """What was kept, per axis and per layer (indices into the source model), for audit and reproduction.

    `hidden` lists the hidden channels kept in the whole model, `kept_layers` / `dropped_layers` the layers. The
    per-layer entries (`{{new layer index: kept indices}}`) are the structures' `RECORD`s ({entries}), each written to
    the file only when its structure filled it; what an entry's indices mean is in its structure's module (e.g.
    `expert_neurons[layer][e]` lists the kept neurons of the e-th KEPT expert, `mamba_head_channels[layer]` the
    channels kept in every Mamba head of the layer).
    """

_LAYER_KEYED = tuple(dict.fromkeys(name for structure in STRUCTURES for name in structure.RECORD))
_FIELDS = [
    ("pruned_config", dict),
    ("source_shape", dict),
    ("target_shape", dict),
    ("kept_layers", list[int]),
    ("dropped_layers", list[int]),
    ("hidden", list[int] | None, field(default=None)),
    ("importance", dict, field(default_factory=dict)),
    *((name, dict[int, list], field(default_factory=dict)) for name in _LAYER_KEYED),
]


class _PruningRecordMethods:
    """Saving and loading; the per-layer entries come from the structures' `RECORD`s."""

    def to_dict(self) -> dict:
        return {
            k: ({str(i): v for i, v in val.items()} if isinstance(val, dict) and k in _LAYER_KEYED else val)
            for k, val in self.__dict__.items()
            if k not in _LAYER_KEYED or val  # a structure the model lacks leaves no empty entry
        }

    def save(self, directory: str | os.PathLike) -> None:
        atomic_write_json(os.path.join(directory, PRUNING_RECORD_NAME), self.to_dict(), indent=1)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "PruningRecord":
        path = os.path.join(directory, PRUNING_RECORD_NAME)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            for key in _LAYER_KEYED:
                data[key] = {int(i): v for i, v in data.get(key, {}).items()}
            return cls(**data)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(
                f"{path!r} is not a valid pruning record ({error}): it was truncated or edited by hand. prune_model "
                "writes it with the pruned model; prune again to get it back."
            ) from None


PruningRecord = make_dataclass(
    "PruningRecord",
    _FIELDS,
    bases=(_PruningRecordMethods,),
    namespace={
        "__doc__": _DOC.format(entries=", ".join(f"`{name}`" for name in _LAYER_KEYED)),
        "__module__": __name__,
    },
)


# ---------------------------------------------------------------------------------------------- the entry point
def _save_pretrained_with_record(self, save_directory, *args, **kwargs):
    """`save_pretrained` of a pruned model: the usual files, plus `pruned_config.json` and `pruning_record.json`."""
    type(self).save_pretrained(self, save_directory, *args, **kwargs)
    record = getattr(self, "pruning_record", None)
    if record is not None and kwargs.get("is_main_process", True):
        PrunedConfig(**record.pruned_config).save_pretrained(save_directory)
        record.save(save_directory)


class _SaveWithRecord:
    """`model.save_pretrained` of a pruned model (see `_save_pretrained_with_record`), holding the model weakly.
    `copy.deepcopy` of the model gives the copy its own, bound to the copy; pickling binds it to the unpickled model."""

    def __init__(self, model):
        self._model = weakref.ref(model)

    def __call__(self, save_directory, *args, **kwargs):
        return _save_pretrained_with_record(self._model(), save_directory, *args, **kwargs)

    def __deepcopy__(self, memo):
        model = self._model()
        # The model's deepcopy registers the copy in `memo` before copying its attributes (this one among them).
        return _SaveWithRecord(memo.get(id(model), model))

    def __reduce__(self):
        return _SaveWithRecord, (self._model(),)


def check_target_loads(model_config, target: dict, spec=None):
    """Returns the target config, built with the installed transformers, so a shape that stock `from_pretrained` would
    reject (e.g. transformers 5's `LlamaConfig` wants `hidden_size % num_attention_heads == 0`) fails before any
    expensive work, with the nearest valid sizes. `spec`: a family's own `ArchitectureSpec` (see `prune_model`)."""
    spec = get_architecture(model_config, spec)
    source = model_shape(model_config)
    heads, hidden = target["num_attention_heads"], target["hidden_size"]
    if spec.head_dim_from_hidden and hidden != heads * source["head_dim"]:
        # e.g. OLMoE: head_dim = hidden_size // num_attention_heads at load time, whatever the config says.
        raise ValueError(
            f"The pruned shape would not load with stock transformers: {type(model_config).__name__} derives head_dim "
            f"from hidden_size // num_attention_heads, so hidden_size={hidden} with num_attention_heads={heads} "
            f"would change head_dim from {source['head_dim']}. Fix PrunedConfig: prune the two together so that "
            f"hidden_size = num_attention_heads x {source['head_dim']} (here hidden_size={heads * source['head_dim']})."
        )
    for structure in structures_of(spec):  # what the family's kernels cannot run (grouped expert kernels' alignment)
        check_runs = getattr(structure, "check_runs", None)
        if check_runs is not None:
            check_runs(model_config, source, target)
    data = model_config.to_dict()
    # Which layers depth pruning keeps is not known yet: the first ones stand in for them (the config classes check
    # the lists' lengths, not their entries).
    data.update(sliced_layer_lists(model_config, data, list(range(target["num_hidden_layers"]))))
    data["num_hidden_layers"] = target["num_hidden_layers"]
    values = types.SimpleNamespace(**data)
    for structure in structures_of(spec):
        structure.update_config(values, spec, source, target)
    try:
        return type(model_config).from_dict(vars(values))
    except Exception as error:  # the config classes raise several error types
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


def compute_scores(
    model, config: PrunedConfig, calibration_data=None, show_progress: bool = True, spec=None
) -> ImportanceScores:
    """Importance scores with `config.importance`: Minitron activations, or the magnitude / random baselines."""
    if config.importance == "activation":
        if calibration_data is None:
            raise ValueError(
                "importance='activation' needs calibration_data (tokenized samples): pass it, pass precomputed "
                "scores=..., or choose importance='magnitude' or 'random'."
            )
        return estimate_importance(model, calibration_data, config, show_progress=show_progress, spec=spec)
    if config.importance == "magnitude":
        return magnitude_importance(model, spec=spec)
    return random_importance(model.config, config.seed, spec=spec)


@torch.no_grad()
def prune_model(
    model,
    config: PrunedConfig,
    calibration_data=None,
    *,
    scores: ImportanceScores | None = None,
    depth_scorer=None,
    show_progress: bool = True,
    spec=None,
):
    """Prunes `model` in place to the shape of `config` and returns it (an ordinary model of the same class).

    Args:
        model (`PreTrainedModel`): a supported `*ForCausalLM` (see `hf_minitron.ARCHITECTURES`).
        config (`PrunedConfig`): the target shape and importance options; validated before any forward pass.
        calibration_data (*optional*): tokenized samples for importance estimation and LM-loss depth scoring
            (see `estimate_importance`). Not needed when `scores` are given for width-only or block-influence targets
            (`depth_method="block_influence"`, or `contiguous_score="block_influence"` with scores estimated for it).
        scores (`ImportanceScores`, *optional*): precomputed scores of this model (estimate once, prune many targets).
        depth_scorer (`Callable[[PreTrainedModel], float]`, *optional*): higher-is-better score (e.g. an lm-eval
            accuracy) used instead of the LM loss to pick the contiguous block / the layers to drop, called once per
            candidate. Required when `config.depth_scorer` names lm-eval tasks: build it with the model's tokenizer,
            `make_lm_eval_scorer(tokenizer, config.depth_scorer_tasks(), limit=config.depth_scorer_limit,
            num_fewshot=config.depth_scorer_num_fewshot)` (`hf-minitron prune` does).
        show_progress (`bool`, *optional*, defaults to `True`): progress bars.
        spec (`ArchitectureSpec`, *optional*): where the modules of a family outside `hf_minitron.ARCHITECTURES`
            live, e.g. a checkpoint with its own modelling code loaded with `trust_remote_code=True` (see
            `get_architecture`). The pruned model keeps its class: `save_pretrained` writes the modelling code and
            `auto_map` with the weights.

    Returns:
        The pruned model, carrying `model.pruning_record` (kept indices). Its `save_pretrained` also writes
        `pruned_config.json` and `pruning_record.json`.
    """
    if not isinstance(config, PrunedConfig):
        raise TypeError(f"config must be a PrunedConfig, got {type(config).__name__}.")
    check_causal_lm(model, "prune_model")
    check_not_offloaded(model)
    custom_spec = spec is not None
    spec = get_architecture(model.config, spec)
    target = config.resolve(model.config)  # every ValueError before any forward pass
    check_target_loads(model.config, target, spec)
    source = model_shape(model.config)
    if scores is not None:
        if not isinstance(scores, ImportanceScores):
            raise TypeError(
                f"scores must be ImportanceScores (from estimate_importance or ImportanceScores.load), got "
                f"{type(scores).__name__}."
            )
        scores.check_compatible(model.config, model)
    num_to_drop = source["num_hidden_layers"] - target["num_hidden_layers"]
    # Paper 1 §2.2's Block Influence of the candidate blocks, from the importance pass: no removal is scored.
    block_influence_ranks = (
        num_to_drop > 0 and config.depth_method == "contiguous" and config.contiguous_score == "block_influence"
    )
    if num_to_drop > 0 and config.depth_scorer is not None and depth_scorer is None:
        raise ValueError(
            f"PrunedConfig.depth_scorer={config.depth_scorer!r} scores the candidates with lm-eval, which needs the "
            "model's tokenizer: pass depth_scorer=make_lm_eval_scorer(tokenizer, config.depth_scorer_tasks(), "
            "limit=config.depth_scorer_limit, num_fewshot=config.depth_scorer_num_fewshot) (hf-minitron prune and "
            "recipes/prune.py build it for you)."
        )
    if block_influence_ranks and depth_scorer is not None:
        raise ValueError(
            "PrunedConfig.contiguous_score='block_influence' ranks the contiguous blocks by their Block Influence, "
            "and depth_scorer by its score: pass only one (contiguous_score='lm_loss' lets the scorer rank them)."
        )
    needs_samples = (
        num_to_drop > 0
        and config.depth_method in ("lm_loss", "contiguous")
        and config.importance == "activation"
        and depth_scorer is None
        and not block_influence_ranks
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
    # `!=`: a per-layer target (a list) may keep the widest layer's width; every other target is at most the source's.
    needs_width = any(target[name] != source.get(name) for name in target if name not in depth.FIELDS)
    needs_layer_scores = num_to_drop > 0 and (
        config.depth_method == "block_influence" or config.importance != "activation" or block_influence_ranks
    )
    if scores is None and (needs_width or needs_layer_scores):
        scores = compute_scores(model, config, calibration_data, show_progress, spec)

    # 1. Depth: choose layers on the full model (all axes were scored in one pass, paper 1 §2.2).
    if config.depth_method == "explicit" and config.layers_to_drop:
        dropped = list(config.layers_to_drop)
    elif num_to_drop > 0:
        depth_method = config.depth_method
        if config.importance != "activation" and depth_method != "block_influence":
            depth_method = "block_influence"  # the baselines rank layers by their own static scores
        samples = (
            take_samples(
                calibration_data, config.depth_calibration_samples, model.get_input_embeddings().num_embeddings
            )
            if calibration_data is not None
            else None
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
            config.depth_screening_samples,
            layers_to_drop_by_type(model.config, config.num_layers_by_type) if config.num_layers_by_type else None,
            contiguous_score=config.contiguous_score,
        )
    else:
        dropped = []
    # Weights freed while slicing go back to the OS at once (see large_buffers_returned_to_os).
    try:
        with large_buffers_returned_to_os():
            model = _slice(model, spec, config, scores, source, target, dropped)
    except (IndexError, RuntimeError) as error:
        if not custom_spec:
            raise
        # A spec naming the wrong modules slices tensors of other shapes than it expects.
        raise ValueError(
            f"Slicing failed ({type(error).__name__}: {error}). The model in memory is unusable.{spec_hint(True)}"
        ) from error
    check_pruned_model(model, custom_spec)  # a sliced model that cannot run is never returned as pruned
    return model


def _slice(model, spec, config: PrunedConfig, scores, source: dict, target: dict, dropped: list[int]):
    """Steps 2-3 of `prune_model`: drop the chosen layers, then every width structure slices its own parameters."""
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
    structures = structures_of(spec)
    for structure in structures:
        structure.prune(model, layers, spec, scores, source, target, kept_layers, record, config)
        release_freed_memory()

    # 3. Config, then the sizes that modules cached at init from it.
    for structure in structures:
        structure.update_config(model.config, spec, source, target)
    for structure in structures:
        structure.sync_modules(model, model.config, spec)
    model.pruning_record = record
    # An instance attribute, so stock classes stay stock; it holds the model weakly (a bound method would make the model
    # refer to itself, and a pruned model dropped in a loop would stay in memory until the next garbage collection).
    model.save_pretrained = _SaveWithRecord(model)
    return model


def load_pruning_record(directory: str | os.PathLike) -> tuple[PrunedConfig, PruningRecord]:
    """`(PrunedConfig, PruningRecord)` saved next to a pruned checkpoint."""
    if not os.path.isfile(os.path.join(directory, PRUNED_CONFIG_NAME)):
        raise FileNotFoundError(f"{directory!r} holds no {PRUNED_CONFIG_NAME}: it was not written by prune_model.")
    return PrunedConfig.from_pretrained(directory), PruningRecord.load(directory)
