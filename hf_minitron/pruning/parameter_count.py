"""Exact parameter counts of pruned models, from the configs alone (no weights, no pruning).

The architecture search (paper 1 §3) keeps the candidates whose size is within a tolerance of a budget, so it counts
the parameters of thousands of shapes. Counting by building each model would be slow; guessing a formula per family
would drift from what `prune_model` really produces. Instead the source model is built once on the `meta` device and
every parameter is described by the pruned dimensions its axes follow (the same `ArchitectureSpec` roles that
`prune_model` slices): counting a target shape is then a sum of small products. The description is checked against
the real shapes of the source model when it is built, so an architecture whose parameters scale otherwise fails
loudly instead of being miscounted.
"""

import copy
import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..architectures import ArchitectureSpec, get_architecture, get_base_model, get_decoder_layers
from .config import PrunedConfig
from .importance import model_shape
from .structures import in_layer, structures_of
from .structures.hidden_channels import hidden_module_roles


COUNT_KINDS = ("total", "non_embedding", "memory", "active")

# Every parameter is described by symbols of the pruned dimensions its axes follow; each structure names its own
# (`count_roles`) and says what they evaluate to for a shape (`count_sizes`), e.g. `h` hidden, `f` MLP neurons, `q`
# query rows. An int is an axis pruning never changes (vocabulary, head_dim of per-head q/k norms, ...).


@dataclass(frozen=True)
class _Term:
    name: str
    dims: tuple  # symbols or ints
    per_layer: bool
    embedding: bool  # input embeddings or an untied output projection (excluded from "non_embedding")
    block_type: str | None = None  # a hybrid's per-layer term: counted once per layer of this block type
    # The source layers that hold this parameter, when they are not all the layers of `block_type` (Gemma 3n's KV
    # sharing: its last layers have no key/value projections); such a term is counted over those layers.
    layers: tuple[int, ...] | None = None


def _sizes(shape: dict, spec: ArchitectureSpec) -> dict[str, int]:
    sizes = {}
    for structure in structures_of(spec):
        sizes.update(structure.count_sizes(shape))
    return sizes


def _layer_sizes(shape: dict, spec: ArchitectureSpec) -> list[dict[str, int]] | None:
    """Each layer's sizes when a structure's width differs by layer (Gemma 3n's MLP widths), else `None`."""
    per_layer = None
    for structure in structures_of(spec):
        counted = getattr(structure, "count_sizes_per_layer", None)
        layers = counted(shape) if counted is not None else None
        if layers is not None:
            base = per_layer or [_sizes(shape, spec) for _ in layers]
            per_layer = [sizes | extra for sizes, extra in zip(base, layers)]
    return per_layer


def _layer_roles(spec: ArchitectureSpec, layer) -> dict[str, tuple[str, ...]]:
    """Module path inside a decoder layer -> the symbols of its (output, input) axes (norms: one axis); a full
    parameter path -> the symbols of each of its axes (fused expert tensors)."""
    roles = {}
    for structure in structures_of(spec):
        if in_layer(spec, layer, structure):
            roles.update(structure.count_roles(spec, layer))
    return roles


def _dims_for(module_path: str, param_name: str, shape: tuple[int, ...], roles: dict) -> tuple:
    exact = roles.get(f"{module_path}.{param_name}")
    if exact is not None:
        return exact
    role = roles.get(module_path)
    if role is None:
        return tuple(shape)
    if param_name == "bias" or len(role) == 1:
        return role[:1]
    return role


def _evaluate(dims: tuple, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(sizes[d] if isinstance(d, str) else d for d in dims)


@lru_cache(maxsize=32)
def _terms_from_json(
    config_class: type, config_json: str, spec: ArchitectureSpec | None = None
) -> tuple[tuple[_Term, ...], int]:
    from transformers import AutoModelForCausalLM

    # Infinities (Nemotron-H's time_step_limit) are encoded as {"__float__": "Infinity"} by to_json_string.
    model_config = config_class.from_dict(config_class._decode_special_floats(json.loads(config_json)))
    spec = get_architecture(model_config, spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(model_config))
    module_names = {id(module): name for name, module in model.named_modules()}
    layers = get_decoder_layers(model)
    layers_prefix = module_names[id(layers)] + "."
    embedding_modules = {module_names[id(model.get_input_embeddings())]}
    output = model.get_output_embeddings()
    if output is not None:
        embedding_modules.add(module_names[id(output)])
    base = get_base_model(model)
    final_norm = module_names[id(getattr(base, spec.final_norm))]
    token_tables = {module_names[id(getattr(base, name))] for name in spec.token_tables}
    # Layers are grouped by block type (one group when they are alike) and by the parameters they hold (Gemma 3n's
    # KV-sharing layers hold no key/value projections): each group is described by its first layer.
    kinds = [spec.block_type_of(layer) for layer in layers]
    groups = [(kind, tuple(n for n, _ in layer.named_parameters())) for kind, layer in zip(kinds, layers)]
    first = {}
    for index, group in enumerate(groups):
        first.setdefault(group, index)
    split = len(first) > len(set(kinds))  # some block type's layers hold different parameters
    layer_roles = {}
    for group, index in first.items():
        layer_roles[group] = _layer_roles(spec, layers[index]) | {name: ("vocab", "h") for name in embedding_modules}
        layer_roles[group][final_norm] = ("h",)
    roles = layer_roles[groups[0]] | hidden_module_roles(spec, base, module_names[id(base)] + ".")

    vocab = model.get_input_embeddings().weight.shape[0]
    shape = model_shape(model_config)
    sizes = _sizes(shape, spec) | {"vocab": vocab}
    # Every layer is checked with its own sizes (its MLP width, where widths differ by layer).
    layer_sizes = [s | {"vocab": vocab} for s in _layer_sizes(shape, spec) or [sizes] * len(layers)]
    terms = []
    # remove_duplicate (the default) yields a tied lm_head weight once, as the embedding.
    for name, param in model.named_parameters():
        kind = group = None
        check_sizes = sizes
        if name.startswith(layers_prefix):
            index, _, local = name[len(layers_prefix) :].partition(".")
            index = int(index)
            kind, group, check_sizes = kinds[index], groups[index], layer_sizes[index]
            module_path, _, param_name = local.rpartition(".")
            per_layer = True
        else:
            module_path, _, param_name = name.rpartition(".")
            per_layer = False
        dims = _dims_for(module_path, param_name, tuple(param.shape), layer_roles[group] if per_layer else roles)
        dims = tuple(vocab if d == "vocab" else d for d in dims)
        if _evaluate(dims, check_sizes) != tuple(param.shape):
            raise ValueError(
                f"count_parameters cannot describe {name} of shape {tuple(param.shape)} with the roles of "
                f"model_type={model_config.model_type!r} (expected {dims}): update its ArchitectureSpec."
            )
        if per_layer and index != first[group]:
            continue
        is_embedding = module_path in embedding_modules | token_tables and param_name == "weight"
        members = tuple(i for i, g in enumerate(groups) if g == group) if per_layer and split else None
        terms.append(_Term(name, dims, per_layer, is_embedding, kind, members))
    return tuple(terms), len(layers)


def _terms(model_config, spec: ArchitectureSpec | None = None) -> tuple[_Term, ...]:
    return _terms_from_json(type(model_config), model_config.to_json_string(use_diff=False), spec)[0]


def parameter_counter(model_config, spec: ArchitectureSpec | None = None):
    """A fast `shape -> {"total", "non_embedding"}` function for `model_config`'s family, where `shape` is a
    resolved target (the dict of `PrunedConfig.resolve`), not validated: the inner loop of the search. `spec`: a
    family's own `ArchitectureSpec` (see `get_architecture`)."""
    terms = _terms(model_config, spec)
    source = model_shape(model_config)
    spec = get_architecture(model_config, spec)

    def counter(shape):
        shape = {**source, **shape}
        # A hybrid's depth is counted from its layers of each block type (`num_layers_by_type`, as PrunedConfig's).
        block_types = _block_types(
            model_config, spec, shape["num_hidden_layers"], None, shape.get("num_layers_by_type")
        )
        return _count(terms, shape, spec, block_types, model_config.num_hidden_layers)

    return counter


def _block_types(
    model_config, spec: ArchitectureSpec, num_layers: int, layers_to_drop=None, num_layers_by_type=None
) -> list[str] | None:
    """The block type of each layer that remains (`None` for a family whose layers are alike); with
    `num_layers_by_type`, as many of each type (`PrunedConfig.num_layers_by_type`), which is all a count needs."""
    source_kinds = spec.layer_block_types(model_config)
    if source_kinds is None:
        return None
    if num_layers_by_type is not None and layers_to_drop is None:
        from .structures.depth import kept_block_types

        return kept_block_types(model_config, num_layers_by_type)
    drop = set(layers_to_drop or ())
    kinds = [kind for i, kind in enumerate(source_kinds) if i not in drop]
    if len(kinds) != num_layers:
        if len(set(source_kinds)) == 1:  # every layer alike: which ones depth pruning drops does not matter
            return source_kinds[:1] * num_layers
        field = spec.block_types_field or spec.moe_layers_field or spec.dense_layers_field
        raise ValueError(
            f"count_parameters cannot count num_hidden_layers={num_layers} of model_type={model_config.model_type!r} "
            f"from the config alone: its layers differ by block type ({field}: e.g. MoE and dense layers differ in "
            "size), and which ones depth pruning drops is chosen from the importance scores. Count with "
            "PrunedConfig(layers_to_drop=[...]) (e.g. the pruning record's dropped_layers) or "
            "PrunedConfig(num_layers_by_type={...}) (layers of each type)."
        )
    return kinds


def _product(dims: tuple, sizes: dict[str, int]) -> int:
    n = 1
    for d in _evaluate(dims, sizes):
        n *= d
    return n


def _count(
    terms: tuple[_Term, ...],
    shape: dict,
    spec: ArchitectureSpec,
    block_types: list[str] | None = None,
    source_layers: int | None = None,
) -> dict[str, int]:
    layer_counts = Counter(block_types or ())
    sizes = _sizes(shape, spec)
    layer_sizes = _layer_sizes(shape, spec)
    if (layer_sizes is not None or any(t.layers is not None for t in terms)) and (
        shape["num_hidden_layers"] != source_layers
    ):
        raise ValueError(
            f"count_parameters counts this model_type's layers one by one (their sizes or parameters differ by layer), "
            f"so it cannot count num_hidden_layers={shape['num_hidden_layers']} of the source's {source_layers} from "
            "the config alone: which layers depth pruning drops is chosen from the importance scores. Count with "
            "PrunedConfig(layers_to_drop=[...]) (e.g. the pruning record's dropped_layers)."
        )

    def active(sizes):
        # Active parameters (what one token runs through): only num_experts_per_tok routed experts per layer; the
        # router still scores every expert. Equal to the total for dense families.
        return sizes | ({"E": shape["num_experts_per_tok"]} if "E" in sizes else {})

    total = embedding = active_total = 0
    for term in terms:
        if term.per_layer and (layer_sizes is not None or term.layers is not None):
            indices = term.layers if term.layers is not None else range(shape["num_hidden_layers"])
            per = [layer_sizes[i] if layer_sizes is not None else sizes for i in indices]
            n = sum(_product(term.dims, s) for s in per)
            a = sum(_product(term.dims, active(s)) for s in per)
        else:
            n, a = _product(term.dims, sizes), _product(term.dims, active(sizes))
            if term.per_layer:
                layers = shape["num_hidden_layers"] if term.block_type is None else layer_counts[term.block_type]
                n *= layers
                a *= layers
        total += n
        active_total += a
        if term.embedding:
            embedding += n
    return {"total": total, "non_embedding": total - embedding, "active": active_total}


def dtype_size(dtype: str | torch.dtype) -> int:
    """Bytes per element of a torch dtype given by name (`"bfloat16"`) or object."""
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype):
        raise ValueError(
            f"dtype={dtype!r} is not a torch dtype: use e.g. 'bfloat16', 'float16', 'float32' or 'float8_e4m3fn'."
        )
    return torch.empty((), dtype=resolved).element_size()


def counts_layer_by_layer(model_config, spec: ArchitectureSpec | None = None) -> bool:
    """Whether the family's layers differ in their parameters by index (Gemma 3n's shared-KV layers, its MLP widths):
    then a depth target is counted only from the layers it drops, and depth is no search axis."""
    terms = _terms(model_config, get_architecture(model_config, spec) if spec is None else spec)
    return _layer_sizes(model_shape(model_config), get_architecture(model_config, spec)) is not None or any(
        t.layers is not None for t in terms
    )


def count_parameters(
    model_config,
    pruned_config: PrunedConfig | None = None,
    count: str = "total",
    dtype: str = "bfloat16",
    spec: ArchitectureSpec | None = None,
) -> int:
    """Exact size of the model `prune_model` would produce from a model with `model_config`, without building it.

    Args:
        model_config (`PretrainedConfig`): config of the source (unpruned) model, of a supported architecture.
        pruned_config (`PrunedConfig`, *optional*): the target shape; `None` counts the source model itself. For a
            hybrid (layers of different block types), a depth target is counted from its `layers_to_drop`.
        count (`str`, *optional*, defaults to `"total"`): `"total"` parameters (tied embeddings counted once),
            `"non_embedding"` (without the input embeddings and an untied output projection), `"active"` (per token:
            `num_experts_per_tok` routed experts per MoE layer, every other parameter; the total for dense models), or
            `"memory"`: bytes of the weights at `dtype` (weights only: no KV cache or activations).
        dtype (`str`, *optional*, defaults to `"bfloat16"`): element type of the `"memory"` count.
        spec (`ArchitectureSpec`, *optional*): where the modules of a family outside `hf_minitron.ARCHITECTURES`
            live (see `get_architecture`). A family with its own modelling code is built from `model_config` on the
            `meta` device, so its class must be known to `AutoModelForCausalLM` (it is, once a model of it was loaded
            with `trust_remote_code=True`).

    Returns:
        `int`: the count, equal to `sum(p.numel() for p in pruned.parameters())` (times the element size for
        `"memory"`).
    """
    if count not in COUNT_KINDS:
        raise ValueError(f"count={count!r} is not supported: choose one of {list(COUNT_KINDS)}.")
    shape = model_shape(model_config)
    if pruned_config is not None:
        shape = {**shape, **pruned_config.resolve(model_config)}
    spec = get_architecture(model_config, spec)
    layers_to_drop = pruned_config.layers_to_drop if pruned_config is not None else None
    if layers_to_drop and counts_layer_by_layer(model_config, spec):
        # Which layers remain decides the count (Gemma 3n's shared-KV layers hold no key/value projections): count the
        # kept layers' config, with the rest of the target.
        from .structures.depth import sliced_layer_lists

        kept = [i for i in range(model_config.num_hidden_layers) if i not in set(layers_to_drop)]
        kept_config = copy.deepcopy(model_config)
        for key, value in sliced_layer_lists(model_config, vars(model_config), kept).items():
            setattr(kept_config, key, value)
        kept_config.num_hidden_layers = len(kept)
        rest = dataclasses.replace(
            pruned_config, layers_to_drop=None, num_hidden_layers=None, depth_method="contiguous"
        )
        return count_parameters(kept_config, rest, count, dtype, spec)
    by_type = pruned_config.num_layers_by_type if pruned_config is not None else None
    block_types = _block_types(model_config, spec, shape["num_hidden_layers"], layers_to_drop, by_type)
    counts = _count(_terms(model_config, spec), shape, spec, block_types, model_config.num_hidden_layers)
    if count == "memory":
        return counts["total"] * dtype_size(dtype)
    return counts[count]
