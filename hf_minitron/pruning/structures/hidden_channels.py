"""Hidden (embedding) channels: scores, one global selection, slicing through every block, counting.

* Score (paper 1 §2.2): the outputs of the norms that feed attention and the MLP, in every layer, each reduced over
  tokens and samples, then summed over the layers that remain: ONE ranking, since the residual stream is shared.
* Slicing: every per-layer norm over the hidden size, every block's hidden-facing weights (each structure slices its
  own through `slice_hidden`), the final norm, the embedding and an untied LM head, and a family's further weights
  over the hidden size (`ArchitectureSpec.hidden_modules`: Gemma 3n's AltUp, LAuReL and per-layer inputs), with the
  inputs the modelling scales by a power of `hidden_size` rescaled (`hidden_scaled_inputs`).
"""

import torch

from ...architectures import BLOCK_TYPES
from ...runtime import release_freed_memory
from .fields import ConfigField, target_names
from .search_axis import SearchAxis
from .slicing import replace_parameter, slice_linear, slice_norm, slice_parameter, topk_sorted
from .statistics import PER_SAMPLE, add_per_sample, reduce_per_sample


KEY = "hidden"
SCORE_KEYS = (KEY,)
CONFIG_FIELDS = (
    ConfigField(
        "hidden_size",
        doc="Target embedding (hidden) size. The same channels are removed from every layer (paper 1, §2.2).",
        help="Target hidden (embedding) size.",
    ),
)
FIELDS = target_names(CONFIG_FIELDS)
BLOCK = None  # every layer
AXES = (SearchAxis("hidden_size", "hidden", "hidden", multiple_default=64, cap=True),)
CARD_ROWS = {"hidden_size": "Hidden size (embedding)"}
SUMMARY = FIELDS
RECORD = ()  # the record's `hidden`: one list of kept channels for the whole model
_FIELD = FIELDS[0]
# The blocks each statistic slot reads the input of: the sequence mixer (attention, or Mamba / Gated DeltaNet in a
# hybrid layer), then the feed-forward block (MLP or MoE). A hybrid layer holds one of them: the other slot's row stays
# zero.
SLOT_BLOCKS = tuple(tuple(block.name for block in BLOCK_TYPES if block.role == role) for role in ("mixer", "ffn"))


def present(spec) -> bool:
    return True


def shape(model_config, spec) -> dict:
    return {"hidden_size": model_config.hidden_size}


def check_applies(config, model_config, shape: dict, spec) -> None:
    """Every model has a hidden size."""


def check_target(config, model_config=None, shape: dict | None = None) -> None:
    """Any size up to the source's (checked by `PrunedConfig.validate_for` for every target)."""


def _others(spec):
    from . import structures_of  # the family's other structures slice their own hidden-facing weights

    return [s for s in structures_of(spec) if hasattr(s, "slice_hidden")]


def _in_layer(spec, layer, structure) -> bool:
    from . import in_layer

    return in_layer(spec, layer, structure)


def hooks(collector, index: int, layer) -> list:
    """The outputs of the norms feeding attention and the MLP; for post-norm families (OLMo 2, EXAONE 4), which have
    no such norm, the inputs of attention and the MLP themselves (the residual stream they read)."""
    spec = collector.spec
    handles = []
    sources = ((spec.attn_input_norm, spec.attention or spec.mamba), (spec.mlp_input_norm, spec.mlp or spec.moe))
    for slot, (norm, block) in enumerate(sources):
        if not any(getattr(spec, name) is not None and spec.has(layer, name) for name in SLOT_BLOCKS[slot]):
            continue
        store = collector.store(KEY, index, slot)

        def norm_hook(module, args, output, store=store):
            add_per_sample(store, output, collector.sample_mask, collector.how)

        def input_hook(module, args, kwargs, store=store):
            x = args[0] if args else kwargs["hidden_states"]
            add_per_sample(store, x, collector.sample_mask, collector.how)

        if norm is not None:
            handles.append(getattr(layer, norm).register_forward_hook(norm_hook))
        else:
            handles.append(getattr(layer, block).register_forward_pre_hook(input_hook, with_kwargs=True))
    return handles


def sites(spec) -> list[tuple[int, str, int, str]]:
    first = f"output of {spec.attn_input_norm}" if spec.attn_input_norm else f"input of {spec.attention}"
    second = f"output of {spec.mlp_input_norm}" if spec.mlp_input_norm else f"input of {spec.mlp or spec.moe}"
    return [(0, KEY, 0, first), (2, KEY, 1, second)]


def score_shapes(shape: dict) -> dict[str, tuple]:
    """`{score key: per-layer dims}` that every statistic of the key starts with: one slot per norm."""
    return {KEY: (2, shape[_FIELD])}


def collect(collector, shape: dict, device) -> dict[str, dict]:
    """`{score key: statistics}` of the importance pass, summed over processes."""
    return {KEY: collector.stacked(KEY, shape[_FIELD], 2, PER_SAMPLE, device)}


def random_scores(key: str, shape: dict, draw) -> dict:
    """The random baseline's scores (`draw(*dims)` draws `[num_layers, *dims]`): the first slot only, as a static
    score is one ranking per layer."""
    hidden = draw(shape[_FIELD])
    return {"score": torch.stack([hidden, torch.zeros_like(hidden)], dim=1)}


def magnitude_scores(model, layers, spec, shape: dict) -> dict[str, dict]:
    """`{score key: {"score": ...}}` of the weight-magnitude baseline."""
    return {KEY: {"score": magnitude_all(model, spec, layers)}}


def scores_per_layer(importance, batch_aggregation: str) -> torch.Tensor:
    """`[num_layers, hidden_size]`: per layer, the two norm outputs reduced separately, then added."""
    return reduce_per_sample(importance.hidden, batch_aggregation, importance.num_samples).sum(dim=1)


def scores(importance, batch_aggregation: str, layers: list[int] | None = None) -> torch.Tensor:
    """`[hidden_size]`: ONE global ranking, summed over `layers` (all by default)."""
    per_layer = scores_per_layer(importance, batch_aggregation)
    if layers is not None:
        per_layer = per_layer[list(layers)]
    return per_layer.sum(dim=0)


def magnitude_all(model, spec, layers) -> torch.Tensor:
    """`[num_layers, 2, hidden_size]` static scores: per layer, the L2 norm of every column that reads a channel
    and every row that writes it, plus the embedding column (spread over the layers); slot 1 is zero."""
    others = _others(spec)
    per_layer = []
    for layer in layers:
        reads, writes = [], []
        for structure in others:
            if not _in_layer(spec, layer, structure):
                continue
            r, w = structure.hidden_weights(layer, spec)
            reads += r
            writes += w
        channel = sum(w.float().pow(2).sum(0) for w in reads)
        for w in writes:
            channel = channel + w.float().pow(2).sum(1)
        per_layer.append(channel.sqrt())
    embed = model.get_input_embeddings().weight.float()
    hidden = torch.stack(per_layer).double()
    hidden = hidden + embed.pow(2).sum(0).sqrt().double() / len(per_layer)
    return torch.stack([hidden, torch.zeros_like(hidden)], dim=1)


def prune(model, layers, spec, importance, source: dict, target: dict, kept_layers, record, config) -> None:
    if target[_FIELD] >= source[_FIELD]:
        return
    kept = topk_sorted(scores(importance, config.batch_aggregation, layers=kept_layers), target[_FIELD])
    # Decoder layers first, and their freed weights handed back, so that the embedding's new copy (the largest
    # single tensor) reuses that memory instead of adding to the peak.
    others = _others(spec)
    for layer in layers:
        for name in spec.residual_norms:
            slice_norm(getattr(layer, name), kept)
        for structure in others:
            if _in_layer(spec, layer, structure):
                structure.slice_hidden(layer, spec, kept)
    from ...architectures import get_base_model

    base = get_base_model(model)
    slice_norm(getattr(base, spec.final_norm), kept)
    _slice_hidden_modules(base, spec, kept, source[_FIELD])
    release_freed_memory()

    embed = model.get_input_embeddings()
    lm_head = model.get_output_embeddings()
    tied = lm_head is not None and lm_head.weight is embed.weight
    replace_parameter(embed, "weight", embed.weight.data.index_select(1, kept.to(embed.weight.device)))
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
    record.hidden = kept.tolist()


def resolve(root, path: str) -> list[tuple]:
    """`(parent, name, path)` of every object `path` names under `root`, `*` standing for every entry of a module list
    (the path returned with the entry's index)."""
    found = [(None, root, "")]
    for part in path.split("."):
        step = []
        for _, obj, at in found:
            names = [name for name, _ in obj.named_children()] if part == "*" else [part]
            step += [(obj, name, f"{at}{name}") for name in names]
        found = [(parent, getattr(parent, name), at + ".") for parent, name, at in step]
    return [(parent, name, at) for (parent, name, at) in step]


def _slice_hidden_modules(base, spec, kept: torch.Tensor, source_size: int) -> None:
    """Slices `spec.hidden_modules` and rescales `spec.hidden_scaled_inputs` (see `ArchitectureSpec`)."""
    for path, role in spec.hidden_modules:
        for parent, name, _ in resolve(base, path):
            target = getattr(parent, name)
            if role == "norm":
                slice_norm(target, kept)
            elif role == "vector":
                slice_parameter(parent, name, kept, dim=0)
            else:
                slice_linear(
                    target,
                    out_index=kept if role in ("out", "both") else None,
                    in_index=kept if role in ("in", "both") else None,
                )
    for buffer_path, linear_path, power in spec.hidden_scaled_inputs:
        factor = (source_size / kept.numel()) ** power
        for parent, name, _ in resolve(base, buffer_path):
            getattr(parent, name).fill_(kept.numel() ** power)  # what a reload computes from the pruned config
        for parent, name, _ in resolve(base, linear_path):
            linear = getattr(parent, name)
            with torch.no_grad():
                linear.weight.mul_(factor)


def hidden_module_roles(spec, root, prefix: str = "") -> dict[str, tuple]:
    """`count_roles` entries of `spec.hidden_modules` under `root` (a decoder layer: the `layers.*.` ones, without the
    prefix; the base model: the others), their paths prefixed with `prefix`."""
    roles = {}
    for path, role in spec.hidden_modules:
        if path.startswith("layers.*."):
            if prefix:  # the base model's own entries only
                continue
            path = path[len("layers.*.") :]
        elif not prefix:
            continue
        for parent, name, local in resolve(root, path):
            target = getattr(parent, name)
            if role in ("norm", "vector"):
                roles[prefix + local] = ("h",)
            else:
                out, inp = target.weight.shape
                roles[prefix + local] = (
                    "h" if role in ("out", "both") else out,
                    "h" if role in ("in", "both") else inp,
                )
    return roles


def update_config(model_config, spec, source: dict, target: dict) -> None:
    model_config.hidden_size = target[_FIELD]


def sync_modules(model, model_config, spec) -> None:
    from ...architectures import get_decoder_layers
    from .routed_experts import parallel_blocks

    # ScatterMoE-layout blocks (JetMoE) call their expert width `hidden_size`: routed_experts sets their sizes.
    skip = {id(block) for layer in get_decoder_layers(model) for block in parallel_blocks(layer, spec)}
    for module in model.modules():
        if isinstance(getattr(module, _FIELD, None), int) and not isinstance(module, torch.nn.Linear):
            if id(module) not in skip:
                module.hidden_size = model_config.hidden_size


def count_roles(spec, layer) -> dict[str, tuple]:
    return {norm: ("h",) for norm in spec.residual_norms} | hidden_module_roles(spec, layer)


def count_sizes(shape: dict) -> dict[str, int]:
    return {"h": shape[_FIELD]}
