"""Layers (depth): Block Influence, removal scoring, which layers to drop, and dropping them.

* `block_influence`: drop the layers whose output is most similar to their input (lowest 1 - cos), paper 1 §2.2;
  measured by hooks in the same pass as the width scores.
* `lm_loss`: drop the layers whose individual removal raises the LM loss least, paper 1 §2.2.
* `contiguous`: drop the block of n consecutive layers whose removal costs least, by LM loss, by the block's own Block
  Influence (`contiguous_score="block_influence"`: 1 - cos(input of its first layer, output of its last), paper 1
  §2.2's extension of BI to several contiguous layers, measured in the importance pass), or by any scorer (paper 2
  used Winogrande accuracy, one evaluation per block, and found a contiguous block beats individually ranked layers).
* `explicit`: the user's list.

In a hybrid (layers of different block types, e.g. Nemotron-H's mamba / attention / mlp / moe), `num_layers_by_type`
targets how many layers of each type remain: each method then chooses within each type (`contiguous`: among the
blocks of consecutive layers that hold exactly the layers to remove).

Dropping renumbers the kept layers (the KV cache is indexed by `layer_idx`) and slices the per-layer config lists
(`layer_types`, a hybrid's `layers_block_type`, ...) so the pattern of the kept layers is preserved.

One module past 500 lines: a structure's targets, their checks, its scores, its selection and its slicing are its
module (`CONTRIBUTING.md`), and depth has four selection methods and a hybrid's layers of each block type.
"""

import json
import logging
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...architectures import ARCHITECTURES, BLOCK_TYPES, get_architecture, get_base_model, get_decoder_layers
from ...evaluation import lm_loss
from ...runtime import dist_info
from .fields import ConfigField, target_names
from .search_axis import SearchAxis


KEY = "block_influence"
BLOCKS_KEY = "block_influence_matrix"  # the BI of every block of contiguous layers, on request
BLOCK = None  # every layer
DEPTH_METHODS = ("contiguous", "block_influence", "lm_loss", "explicit")
# What ranks the candidate blocks of `depth_method="contiguous"`: the LM loss without the block, or the block's own
# Block Influence (paper 1 §2.2: 1 - cos between the block's input and its output).
CONTIGUOUS_SCORES = ("lm_loss", "block_influence")
# The target, `num_hidden_layers`, is also given as `layers_to_drop` or, in a hybrid, `num_layers_by_type`.
CONFIG_FIELDS = (
    ConfigField(
        "num_hidden_layers",
        doc="Target number of decoder layers (depth pruning).",
        help="Target number of decoder layers.",
    ),
    ConfigField(
        "num_layers_by_type",
        doc="""Hybrids: target number of layers of each block type, e.g. `{"mamba": 20, "attention": 4, "mlp": 20}`, keyed
by the block names of NVIDIA's Nemotron-H configs and papers (`"mamba"`, `"attention"`, `"mlp"`, `"moe"`:
the `M`, `*`, `-`, `E` of its `hybrid_override_pattern`); transformers' own names of the block types
(`"linear_attention"`, `"full_attention"`) are accepted too. A type left out keeps all its layers. The
depth method then chooses within each type (`"contiguous"`: among the blocks of consecutive layers that
hold exactly the layers to remove). On the command line, a JSON mapping.""",
        help='Hybrids: target layers of each block type, a JSON mapping, e.g. \'{"mamba": 20, "attention": 4, '
        '"mlp": 20}\' (types left out keep all their layers).',
        type=dict[str, int] | str | None,
        target=False,
        sets_shape=True,
    ),
    ConfigField(
        "layers_to_drop",
        doc='Explicit 0-based indices of layers to remove (sets `depth_method="explicit"`).',
        help="Explicit 0-based layer indices to remove (implies depth_method='explicit').",
        type=list[int] | None,
        target=False,
        sets_shape=True,
    ),
    ConfigField(
        "depth_method",
        doc="""How layers are chosen: `"contiguous"` (the block of consecutive layers whose removal costs least, paper 2),
`"block_influence"` (1 - cos(input, output) per layer), `"lm_loss"` (LM-loss increase when each single
layer is dropped) or `"explicit"`.""",
        help="Depth selection.",
        type=str,
        default="contiguous",
        choices=DEPTH_METHODS,
        target=False,
    ),
    ConfigField(
        "contiguous_score",
        doc="""What ranks the candidate blocks of `depth_method="contiguous"`: `"lm_loss"` (the LM loss with the block
dropped, one forward over the depth samples per block) or `"block_influence"` (the Block Influence of the
block, 1 - cos between the input of its first layer and the output of its last, averaged over tokens:
paper 1 §2.2's extension of BI to several contiguous layers). Block Influence costs no extra forward: the
importance pass measures it for every block, holding each layer's input for the batch meanwhile
(num_layers x calibration_batch_size x sequence x hidden values, in the model's dtype).""",
        help="Contiguous depth search: rank blocks by 'lm_loss' (a forward per block) or 'block_influence' "
        "(1 - cos(block input, block output), measured in the importance pass).",
        type=str,
        default="lm_loss",
        choices=CONTIGUOUS_SCORES,
        target=False,
    ),
    ConfigField(
        "depth_scorer",
        doc="""lm-eval task(s), comma separated, e.g. `"winogrande"`: the layers to drop (`"contiguous"`, `"lm_loss"`) are
the candidate whose removal keeps the mean accuracy (primary metric) highest, instead of the lowest LM
loss. Paper 2 picked its contiguous block by Winogrande accuracy: the LM loss "fails to produce the most
accurate" block. Costly: one lm-eval evaluation per candidate (SmolLM2, 6 of 30 layers: 25 blocks), so
keep `depth_scorer_limit` small. `hf-minitron prune` and `recipes/prune.py` build the scorer with the
model's tokenizer; with `prune_model`, pass `depth_scorer=make_lm_eval_scorer(tokenizer, ...)`.""",
        help="lm-eval task(s), comma separated (e.g. winogrande), whose accuracy picks the layers to drop "
        "instead of the LM loss: one evaluation per candidate.",
        type=str | None,
        target=False,
    ),
    ConfigField(
        "depth_scorer_num_fewshot",
        doc="Shots of `depth_scorer`'s tasks (`None`: each task's default).",
        help="Shots of the depth_scorer tasks (None: each task's default).",
        default=0,
        target=False,
    ),
    ConfigField(
        "depth_scorer_limit",
        doc="Documents of each `depth_scorer` task per candidate (lm-eval takes the first ones); `None`: all of them.",
        help="Documents of each depth_scorer task per candidate (None: all).",
        target=False,
    ),
    ConfigField(
        "depth_calibration_samples",
        doc='Samples used to score each candidate removal for `"lm_loss"` and `"contiguous"` depth selection.',
        help="Samples used to score candidate layer removals (lm_loss, contiguous).",
        type=int,
        default=64,
        target=False,
    ),
    ConfigField(
        "depth_screening_samples",
        doc="""`"contiguous"` depth selection scores every candidate block on this many samples first and rescores only
the 3 best on all `depth_calibration_samples` (2.7x fewer forwards for SmolLM2's 25 blocks). `None`
scores every block on every sample.""",
        help="Contiguous search: score every block on this many samples, rescore the best 3 on all.",
        default=16,
        target=False,
    ),
)
FIELDS = target_names(CONFIG_FIELDS)
AXES = (SearchAxis("num_hidden_layers", "layers", "layers", depth=True),)
# A hybrid's depth is searched as its layers of each block type instead, `num_<block>_layers` standing for
# `PrunedConfig.num_layers_by_type[<block>]`: these come after every other axis in a candidate's name.
BLOCK_TYPE_AXES = tuple(
    SearchAxis(f"num_{block.name}_layers", block.short, block.column, depth=True, multiple=False)
    for block in BLOCK_TYPES
)
CARD_ROWS = {"num_hidden_layers": "Layers (depth)"}
# A hybrid's layers of each block type (Minitron-SSM), as `PrunedConfig.num_layers_by_type` names the types: card rows
# under the depth row.
CARD_BLOCK_ROWS = {block.name: block.column[0].upper() + block.column[1:] for block in BLOCK_TYPES}
SUMMARY = ("num_hidden_layers",)
RECORD = ()  # the record's `kept_layers` and `dropped_layers`, written by `prune_model` itself

logger = logging.getLogger(__name__)

# Config lists with one entry per layer, sliced with the layers (besides a hybrid's block-type list, its spec's
# `block_types_field`). Only these: another list may have as many entries as there are layers by chance (Nemotron-H's
# `time_step_limit` pair or `mtp_layers_block_type`, a list of EOS ids).
PER_LAYER_CONFIG_LISTS = (
    "layer_types",
    "mlp_layer_types",
    "layers_block_type",
    "no_rope_layers",
    "num_attention_heads_per_layer",
    "num_key_value_heads_per_layer",
    "intermediate_size",  # Gemma 3n's widths, one per layer (an int elsewhere: left alone)
    "activation_sparsity_pattern",
)
# Config lists of layer indices (Qwen-MoE's dense `mlp_only_layers`, Bamba's `attn_layer_indices`, LFM2's
# `full_attn_idxs`, Llama 4's `moe_layers`): the indices of the kept layers are renumbered, those of dropped layers
# removed.
LAYER_INDEX_CONFIG_LISTS = ("mlp_only_layers", "attn_layer_indices", "full_attn_idxs", "moe_layers")


# ---------------------------------------------------------------------------------------------- targets
def shape(model_config, spec) -> dict:
    return {"num_hidden_layers": model_config.num_hidden_layers}


def check_applies(config, model_config, shape: dict, spec) -> None:
    """Every model has layers: the depth targets are checked against each other and the model in `check_target`."""


def prepare_config(config) -> None:
    """Reads the depth fields as a user may write them: `num_layers_by_type` as JSON (the command line), an empty
    `depth_scorer`, `layers_to_drop` in any order (which sets `depth_method="explicit"`)."""
    if isinstance(config.num_layers_by_type, str):  # from the command line
        try:
            config.num_layers_by_type = (
                json.loads(config.num_layers_by_type) if config.num_layers_by_type.strip() else None
            )
        except json.JSONDecodeError:
            raise ValueError(
                f"PrunedConfig.num_layers_by_type={config.num_layers_by_type!r} is not valid JSON: pass a mapping of "
                'block type to layer count, e.g. \'{"mamba": 20, "attention": 4, "mlp": 20}\'.'
            ) from None
    if isinstance(config.depth_scorer, str) and not config.depth_scorer.strip():  # `--depth_scorer ""`
        config.depth_scorer = None
    if config.layers_to_drop is not None:
        # A string would iterate by character ("12" -> [1, 2]) and int() would truncate 1.5: both are typos.
        if not isinstance(config.layers_to_drop, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in config.layers_to_drop
        ):
            raise ValueError(
                f"PrunedConfig.layers_to_drop={config.layers_to_drop!r} is invalid: expected a list of 0-based layer "
                "indices, e.g. [12, 13, 14] (in YAML: `layers_to_drop: [12, 13, 14]`)."
            )
        config.layers_to_drop = sorted(config.layers_to_drop)
        if config.depth_method != "explicit":
            config.depth_method = "explicit"


def scorer_tasks(config) -> list[str]:
    """The lm-eval task names of `depth_scorer` (empty without one)."""
    return [task.strip() for task in config.depth_scorer.split(",")] if config.depth_scorer else []


def check_target(config, model_config=None, shape: dict | None = None) -> None:
    """Refuses depth fields that contradict each other (on the config alone) or the model (`PrunedConfig.validate_for`):
    layers to drop out of range, every layer, a hybrid's last attention layer; `num_layers_by_type` that another depth
    target contradicts or that no block of consecutive layers holds (`depth_method="contiguous"`)."""
    if model_config is None:
        _check_config(config)
        return
    layers = shape["num_hidden_layers"]
    if config.layers_to_drop is not None:
        bad = [i for i in config.layers_to_drop if not 0 <= i < layers]
        if bad:
            raise ValueError(
                f"PrunedConfig.layers_to_drop contains {bad}, out of range for a model with {layers} layers: use "
                f"indices in [0, {layers - 1}]."
            )
        if len(config.layers_to_drop) >= layers:
            raise ValueError(f"PrunedConfig.layers_to_drop removes all {layers} layers: keep at least one.")
        check_hybrid_depth(model_config, [i for i in range(layers) if i not in set(config.layers_to_drop)])
        if config.num_hidden_layers is not None and config.num_hidden_layers != layers - len(config.layers_to_drop):
            raise ValueError(
                f"PrunedConfig.num_hidden_layers={config.num_hidden_layers} contradicts layers_to_drop (removing "
                f"{len(config.layers_to_drop)} of {layers} layers leaves {layers - len(config.layers_to_drop)}): set "
                "only one of them."
            )
    producers = kv_producers(model_config)
    if config.num_hidden_layers is not None and config.num_hidden_layers < len(producers):
        spec = get_architecture(model_config)
        raise ValueError(
            f"PrunedConfig.num_hidden_layers={config.num_hidden_layers} is too few: layers {sorted(producers)} of this "
            f"{model_config.model_type} model are kept, since the last {spec.kv_shared_layers_field} layers read their "
            f"keys and values. Use num_hidden_layers >= {len(producers)}."
        )
    drop = layers - config.num_hidden_layers if config.num_hidden_layers is not None else 0
    if producers and config.depth_method == "contiguous" and config.layers_to_drop is None and drop > 0:
        if all(producers & set(range(start, start + drop)) for start in range(layers - drop + 1)):
            raise ValueError(
                f"PrunedConfig.num_hidden_layers={config.num_hidden_layers} with depth_method='contiguous' removes "
                f"{drop} consecutive layers, but every such block holds one of layers {sorted(producers)}, which are "
                "kept (later layers read their keys and values). Use depth_method='block_influence' or 'lm_loss', or "
                "keep more layers."
            )
    if config.num_layers_by_type is not None:
        _check_layers_by_type(config, model_config)


def _check_config(config) -> None:
    """The depth fields on their own and against each other."""
    by_type = config.num_layers_by_type
    if by_type is not None and (
        not isinstance(by_type, dict)
        or not by_type
        or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
            for k, v in by_type.items()
        )
    ):
        raise ValueError(
            f"PrunedConfig.num_layers_by_type={by_type!r} is invalid: expected a mapping of block type to the number "
            'of its layers to keep (an integer >= 0), e.g. {"mamba": 20, "attention": 4, "mlp": 20} (in YAML: '
            "`num_layers_by_type: {mamba: 20, attention: 4, mlp: 20}`), or None."
        )
    value = config.depth_calibration_samples
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"PrunedConfig.depth_calibration_samples={value!r} is invalid: expected a positive integer.")
    value = config.depth_screening_samples
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(
            f"PrunedConfig.depth_screening_samples={value!r} is invalid: expected a positive integer, or None to "
            "score every candidate block on every depth sample."
        )
    if config.depth_method == "explicit" and not config.layers_to_drop:
        raise ValueError(
            "PrunedConfig.depth_method='explicit' needs layers_to_drop: pass the 0-based layer indices to remove, "
            "or choose depth_method 'contiguous', 'block_influence' or 'lm_loss'."
        )
    if config.layers_to_drop is not None and len(set(config.layers_to_drop)) != len(config.layers_to_drop):
        raise ValueError(f"PrunedConfig.layers_to_drop={config.layers_to_drop} has duplicates: list each layer once.")
    _check_scoring(config)


def _check_scoring(config) -> None:
    """`contiguous_score` and the `depth_scorer` fields, against the depth method they refine."""
    method = f"depth_method={config.depth_method!r}" + (" (set by layers_to_drop)" if config.layers_to_drop else "")
    if config.contiguous_score == "block_influence" and config.depth_method != "contiguous":
        raise ValueError(
            f"PrunedConfig.contiguous_score='block_influence' ranks the blocks of depth_method='contiguous', but "
            f"{method}. Use depth_method='contiguous', or leave contiguous_score at 'lm_loss'."
        )
    if config.contiguous_score == "block_influence" and config.importance != "activation":
        raise ValueError(
            f"PrunedConfig.contiguous_score='block_influence' is measured on activations, but importance="
            f"{config.importance!r} ranks layers by its own static scores. Use importance='activation', or leave "
            "contiguous_score at 'lm_loss'."
        )
    shots, limit = config.depth_scorer_num_fewshot, config.depth_scorer_limit
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 0):
        raise ValueError(
            f"PrunedConfig.depth_scorer_num_fewshot={shots!r} is invalid: expected an integer >= 0, or None for "
            "each task's default."
        )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ValueError(
            f"PrunedConfig.depth_scorer_limit={limit!r} is invalid: expected a positive number of documents, or "
            "None for all of them."
        )
    if config.depth_scorer is None:
        return
    if not isinstance(config.depth_scorer, str) or not all(scorer_tasks(config)):
        raise ValueError(
            f"PrunedConfig.depth_scorer={config.depth_scorer!r} is invalid: expected lm-eval task names, comma "
            "separated, e.g. 'winogrande' or 'winogrande,hellaswag', or None to score by LM loss."
        )
    if config.depth_method not in ("contiguous", "lm_loss"):
        raise ValueError(
            f"PrunedConfig.depth_scorer={config.depth_scorer!r} scores the candidate removals of depth_method "
            f"'contiguous' or 'lm_loss', but {method}. Use one of those, or leave depth_scorer None."
        )
    if config.contiguous_score == "block_influence":
        raise ValueError(
            f"PrunedConfig.depth_scorer={config.depth_scorer!r} and contiguous_score='block_influence' both rank the "
            "contiguous blocks: set only one of them."
        )
    if config.importance != "activation":
        raise ValueError(
            f"PrunedConfig.depth_scorer={config.depth_scorer!r} applies with importance='activation': importance="
            f"{config.importance!r} ranks layers by its own static scores. Leave depth_scorer None."
        )


def _check_layers_by_type(config, model_config) -> None:
    """`num_layers_by_type` against the model: known block types, counts it has, consistent with the other depth
    fields, and a block that `depth_method="contiguous"` can remove."""
    targets = resolve_layers_by_type(model_config, config.num_layers_by_type)
    total = sum(targets.values())
    field = f"PrunedConfig.num_layers_by_type={config.num_layers_by_type}"
    if config.num_hidden_layers is not None and config.num_hidden_layers != total:
        raise ValueError(
            f"PrunedConfig.num_hidden_layers={config.num_hidden_layers} contradicts {field}, which keeps {total} "
            "layers: set only one of them."
        )
    names = block_names(model_config)
    if config.layers_to_drop is not None:
        kept = Counter(name for i, name in enumerate(names) if i not in set(config.layers_to_drop))
        if any(kept[block] != count for block, count in targets.items()):
            raise ValueError(
                f"PrunedConfig.layers_to_drop={config.layers_to_drop} keeps {dict(kept)} layers, which contradicts "
                f"{field}: set only one of them."
            )
    drops = layers_to_drop_by_type(model_config, config.num_layers_by_type)
    if config.depth_method == "contiguous" and config.importance == "activation" and sum(drops.values()):
        if not matching_blocks(model_config, drops):
            n = sum(drops.values())
            seen = list(dict.fromkeys(str(dict(Counter(names[s : s + n]))) for s in range(len(names) - n + 1)))
            raise ValueError(
                f"{field} removes {drops} layers, and no block of {n} consecutive layers holds exactly those "
                f"(depth_method='contiguous' removes one block; blocks of {n} hold {', '.join(seen[:4])}). Use "
                "depth_method='block_influence' or 'lm_loss', which choose the layers of each type, or counts "
                "that a block matches."
            )


# ---------------------------------------------------------------------------------------------- Block Influence
def hooks(collector, index: int, layer) -> list:
    """Accumulates the masked sum of cos(layer input, layer output) over tokens (1 - its mean is Block Influence).

    With `collector.blocks` (a dict), also that of cos(input of layer s, output of this layer) for every s before it:
    the Block Influence of the contiguous layers s..index (paper 1 §2.2). Every layer's input is copied, in the
    model's dtype, into one `[tokens, layers, hidden]` buffer that lives until the last layer's output has been compared
    with it: one batched product per layer, not a cosine per pair (57x faster in a CPU micro-benchmark at SmolLM2's
    shapes)."""
    inputs = {}
    blocks = collector.blocks
    num_layers = len(collector.layers)

    def token_weights(x):
        """`[..., B, S]` mask weights of `x`'s tokens: a layer that carries the residual stream as several predictions
        (Gemma 3n's AltUp, `[predictions, B, S, hidden]`) is compared prediction by prediction, averaged."""
        mask = collector.mask.to(x.device)
        copies = x[..., 0].numel() // mask.numel()
        return mask.expand(x.shape[:-1]) / copies if copies > 1 else mask

    def layer_pre_hook(module, args, kwargs):
        x = inputs["x"] = args[0] if args else kwargs["hidden_states"]
        if blocks is None:
            return
        x = x.reshape(-1, x.shape[-1])  # [tokens, hidden]
        if index == 0:
            blocks["states"] = x.new_empty(x.shape[0], num_layers, x.shape[1])
            blocks["norms"] = torch.empty(x.shape[0], num_layers, device=x.device)
        blocks["states"][:, index] = x.to(blocks["states"].device)
        blocks["norms"][:, index] = x.float().norm(dim=-1).to(blocks["norms"].device)

    def layer_hook(module, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output
        out = out.float()
        cos = F.cosine_similarity(inputs.pop("x").float(), out, dim=-1)  # [B, S]
        mask = token_weights(out)
        total = (cos * mask).sum().double()
        _accumulate(collector.store(KEY, index), total)
        if blocks is None:
            return
        # Blocks s..index for s < index; the one-layer block is the layer's own BI, summed above.
        states, norms = blocks["states"], blocks["norms"]
        out = out.reshape(-1, out.shape[-1]).to(states.device)
        dots = torch.cat(
            [
                # float32 products, a chunk of tokens at a time: a half-precision dot would round cos to ~3 digits.
                torch.bmm(states[chunk, :index].float(), out[chunk, :, None]).squeeze(-1)
                for chunk in _token_chunks(states.shape[0], num_layers * states.shape[-1])
            ]
        )  # [tokens, index]
        cos = dots / (norms[:, :index] * out.norm(dim=-1, keepdim=True)).clamp_min(1e-8)
        row = torch.cat([(cos * mask.reshape(-1, 1).to(cos.device)).sum(0).double(), total.to(cos.device)[None]])
        _accumulate(collector.store(BLOCKS_KEY, index), F.pad(row, (0, num_layers - 1 - index)))
        if index == num_layers - 1:
            blocks.clear()  # no hidden state outlives the batch's forward

    return [
        layer.register_forward_pre_hook(layer_pre_hook, with_kwargs=True),
        layer.register_forward_hook(layer_hook, with_kwargs=True),
    ]


def _token_chunks(num_tokens: int, values_per_token: int, budget: int = 1 << 26) -> list[slice]:
    """Slices of at most `budget` values (256 MB in float32), so the float32 copy of a half-precision buffer stays
    small; a float32 buffer is only viewed."""
    step = max(1, budget // values_per_token)
    return [slice(start, start + step) for start in range(0, num_tokens, step)]


def _accumulate(store: dict, total: torch.Tensor) -> None:
    store["sum"] = total if "sum" not in store else store["sum"] + total


def sites(spec) -> list[tuple[int, str, int, str]]:
    return [
        (4, KEY, 0, "layer output (block influence)"),
        (4, BLOCKS_KEY, 0, "layer output (block influence of contiguous blocks)"),
    ]


def block_influences(scores, n: int) -> list[float]:
    """The Block Influence of every block of `n` contiguous layers, by first layer: `[start]` is 1 - mean cos(input of
    layer start, output of layer start + n - 1), from `scores.block_influence_matrix`."""
    matrix = scores.block_influence_matrix if scores is not None else None
    if matrix is None:
        raise ValueError(
            "contiguous_score='block_influence' needs ImportanceScores holding the Block Influence of contiguous blocks "
            "(block_influence_matrix): estimate them with a PrunedConfig whose contiguous_score='block_influence' "
            "(estimate_importance(model, data, config)), or pass calibration_data to prune_model instead of scores."
        )
    return [float(matrix[start, start + n - 1]) for start in range(matrix.shape[0] - n + 1)]


def magnitude(layer) -> torch.Tensor:
    """The L2 norm of every weight of the layer (the magnitude baseline's layer ranking)."""
    return sum(p.float().pow(2).sum() for p in layer.parameters()).sqrt()


class _SkippedLayer(nn.Module):
    """Stands in for a decoder layer during removal scoring: returns the residual stream untouched."""

    def __init__(self, layer: nn.Module, as_tuple: bool = False):
        super().__init__()
        # Models read per-layer attributes (e.g. `attention_type`, Nemotron-H's `block_type`) while looping over layers.
        self.attention_type = getattr(layer, "attention_type", None)
        self.block_type = getattr(layer, "block_type", None)
        self.as_tuple = as_tuple  # the model unpacks a tuple from each layer (spec's `layer_returns_tuple`)

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states, None) if self.as_tuple else hidden_states


@contextmanager
def layers_skipped(model, layer_indices):
    """Temporarily replaces the given decoder layers by identities (no copy of the model)."""
    layers = get_decoder_layers(model)
    saved = {i: layers[i] for i in layer_indices}
    spec = ARCHITECTURES.get(model.config.model_type)  # a spec passed in is dense: its layers return tensors
    as_tuple = spec is not None and spec.layer_returns_tuple
    try:
        for i, layer in saved.items():
            layers[i] = _SkippedLayer(layer, as_tuple)
        yield model
    finally:
        for i, layer in saved.items():
            layers[i] = layer


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
    if scorer is not None:
        # A downstream scorer (e.g. an lm-eval task) is a whole evaluation per candidate: say what is coming.
        logger.info("Scoring %d candidate layer removals with the depth scorer: one evaluation each.", len(candidates))
    was_training = model.training
    model.eval()
    costs = []
    desc = "Scoring layer removals" + (" (one evaluation each)" if scorer is not None else "")
    try:
        for layer_set in tqdm(candidates, desc=desc, disable=not show_progress or dist_info()[0]):
            if not can_drop(model.config, layer_set):  # cannot run without these layers: never chosen
                costs.append(float("inf"))
                continue
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
    num_to_drop_by_type: dict[str, int] | None = None,
    contiguous_score: str = "lm_loss",
) -> list[int]:
    """Indices (sorted) of the `num_to_drop` layers to remove with `method`; fills the depth fields of `scores`.

    With `screening_samples`, the contiguous search first scores every block on that many samples and rescores only
    the `FINALISTS` best on all of them (`score_blocks`). With `num_to_drop_by_type` (a hybrid's layers to remove per
    block type, keyed by block name as `layers_to_drop_by_type` returns them), the layers are chosen within each
    type: the lowest-ranked of each, or the best block of consecutive layers holding exactly those. With
    `contiguous_score="block_influence"`, the contiguous search takes the block of lowest Block Influence
    (`block_influences`, from `scores`) instead of scoring removals: no forward, no samples."""
    num_layers = len(get_decoder_layers(model))
    if num_to_drop <= 0:
        return []
    if num_to_drop_by_type is not None and sum(num_to_drop_by_type.values()) != num_to_drop:
        raise ValueError(
            f"num_to_drop_by_type={num_to_drop_by_type} removes {sum(num_to_drop_by_type.values())} layers, not "
            f"num_to_drop={num_to_drop}."
        )
    if method == "block_influence":
        if scores is None or scores.block_influence is None:
            raise ValueError("depth_method='block_influence' needs ImportanceScores estimated with depth=True.")
        order = torch.argsort(scores.block_influence, stable=True)
        return _lowest(model.config, order.tolist(), num_to_drop, num_to_drop_by_type)
    if method == "lm_loss":
        # The cache holds LM losses only: a scorer's (negated) accuracies would pass for losses in a later reuse.
        if scores is not None and scores.layer_loss is not None and scorer is None:
            costs = scores.layer_loss.tolist()
        else:
            costs = score_layer_removals(
                model, [[i] for i in range(num_layers)], samples, scorer, batch_size, show_progress
            )
            if scores is not None and scorer is None:
                scores.layer_loss = torch.tensor(costs, dtype=torch.float64)
                scores.base_loss = lm_loss(model, samples, batch_size)
        order = torch.argsort(torch.tensor(costs), stable=True)
        return _lowest(model.config, order.tolist(), num_to_drop, num_to_drop_by_type)
    if method == "contiguous":
        if contiguous_score not in CONTIGUOUS_SCORES:
            raise ValueError(f"Unknown contiguous_score {contiguous_score!r}: use one of {list(CONTIGUOUS_SCORES)}.")
        if contiguous_score == "block_influence" and scorer is not None:
            raise ValueError(
                "contiguous_score='block_influence' and a depth scorer both rank the contiguous blocks: pass only one."
            )
        influence = block_influences(scores, num_to_drop) if contiguous_score == "block_influence" else None
        if num_to_drop_by_type is not None:
            return _best_block_by_type(
                model,
                num_to_drop_by_type,
                scores,
                samples,
                scorer,
                batch_size,
                show_progress,
                screening_samples,
                influence,
            )
        if influence is not None:
            cached = influence
        else:
            cached = scores.block_losses.get(num_to_drop) if scores is not None else None
            if cached is None or scorer is not None:
                blocks = [list(range(start, start + num_to_drop)) for start in range(num_layers - num_to_drop + 1)]
                cached = score_blocks(model, blocks, samples, scorer, batch_size, show_progress, screening_samples)
                if scores is not None and scorer is None:
                    scores.block_losses[num_to_drop] = cached
        scored = [s for s in range(len(cached)) if cached[s] is not None]
        allowed = [s for s in scored if can_drop(model.config, range(s, s + num_to_drop))] or scored
        start = min(allowed, key=lambda s: cached[s])
        return list(range(start, start + num_to_drop))
    raise ValueError(f"Unknown depth_method {method!r}: use 'contiguous', 'block_influence', 'lm_loss' or 'explicit'.")


def _best_block_by_type(
    model, drops, scores, samples, scorer, batch_size, show_progress, screening_samples, influence=None
):
    """The contiguous block whose removal costs least among those holding exactly the layers `drops` of each type.

    `influence` (by start, see `block_influences`) ranks the blocks when given. Otherwise `scores.block_losses[n]` is
    reused when it holds the cost of every such block; this search does not write it: with screening, it scores only
    the matching blocks, which a later search over every block must not take for all."""
    starts = matching_blocks(model.config, drops)
    if not starts:
        raise ValueError(
            f"No block of consecutive layers holds exactly the layers to remove {drops}: use depth_method "
            "'block_influence' or 'lm_loss'."
        )
    n = sum(drops.values())
    cached = scores.block_losses.get(n) if scores is not None and scorer is None else None
    if influence is not None:
        costs = [influence[s] for s in starts]
    elif cached is not None and all(cached[s] is not None for s in starts):
        costs = [cached[s] for s in starts]
    else:
        blocks = [list(range(s, s + n)) for s in starts]
        costs = score_blocks(model, blocks, samples, scorer, batch_size, show_progress, screening_samples)
    best = min((i for i in range(len(starts)) if costs[i] is not None), key=lambda i: costs[i])
    return list(range(starts[best], starts[best] + n))


def matching_blocks(model_config, drops: dict[str, int]) -> list[int]:
    """Start indices of the blocks of `sum(drops)` consecutive layers that hold exactly `drops[block]` layers of each
    block type (keyed by block name)."""
    names = block_names(model_config)
    n = sum(drops.values())
    wanted = Counter({block: count for block, count in drops.items() if count})
    return [s for s in range(len(names) - n + 1) if Counter(names[s : s + n]) == wanted]


# ---------------------------------------------------------------------------------------------- depth by block type
def block_names(model_config) -> list[str] | None:
    """Each layer's block type under the spec's block name (`"mamba"`, `"attention"`, `"mlp"`, `"moe"`, as NVIDIA's
    Nemotron-H configs and papers name them), or `None` for a family whose layers are alike."""
    kinds = layer_block_types(model_config)
    if kinds is None:
        return None
    block_of = {kind: block for block, kind in ARCHITECTURES[model_config.model_type].block_types}
    return [block_of.get(kind, kind) for kind in kinds]


def layer_block_types(model_config) -> list | None:
    """Each layer's block type as its `block_type_attribute` reads (a hybrid's `layers_block_type` entries; Llama 4's
    `is_moe_layer`, from `moe_layers`), or `None` for a family whose layers are alike."""
    spec = ARCHITECTURES.get(model_config.model_type)  # hybrids are table entries; a spec passed in is dense
    return None if spec is None else spec.layer_block_types(model_config)


def layer_counts_by_type(model_config) -> dict[str, int] | None:
    """How many layers of each block type a hybrid has, keyed by block name, in order of first appearance (`None` for
    a family whose layers are alike)."""
    names = block_names(model_config)
    return None if names is None else dict(Counter(names))


def resolve_layers_by_type(model_config, num_layers_by_type: dict) -> dict[str, int]:
    """The target layer count of every block type of the model, keyed by block name (`PrunedConfig.num_layers_by_type`
    after validation against `model_config`: types it does not name keep all their layers).

    Keys are block names (`"mamba"`, `"attention"`, `"mlp"`, `"moe"`) or the config's own names of the block types
    (Nemotron-H in transformers: `"linear_attention"`, `"full_attention"`, `"mlp"`, `"moe"`)."""
    field = f"PrunedConfig.num_layers_by_type={num_layers_by_type}"
    spec = get_architecture(model_config)
    source = layer_counts_by_type(model_config)
    if source is None:
        raise ValueError(
            f"{field} does not apply: the layers of model_type={model_config.model_type!r} are all alike. Set "
            "num_hidden_layers instead."
        )
    block_of = {kind: block for block, kind in spec.block_types} | {block: block for block, _ in spec.block_types}
    block_of |= {block: block for block in source}  # DeepSeek-V3's dense and MoE layers have no config names
    have = ", ".join(f"{block!r} ({count})" for block, count in source.items())
    targets = {}
    for key, value in num_layers_by_type.items():
        block = block_of.get(key)
        if block is None:
            raise ValueError(
                f"{field} names the block type {key!r}, which model_type={model_config.model_type!r} does not have: "
                f"its layers are {have}. Key the counts by these names."
            )
        if block in targets:
            raise ValueError(f"{field} gives the {block!r} layers twice (as {block!r} and as its config name): once.")
        if value > source.get(block, 0):
            raise ValueError(
                f"{field} keeps {value} {block!r} layers, more than the model's {source.get(block, 0)}: pruning only "
                f"removes layers. Use a value <= {source.get(block, 0)}."
            )
        targets[block] = value
    targets = {block: targets.get(block, count) for block, count in source.items()}
    if source.get("attention") and not targets["attention"]:
        raise ValueError(
            f"{field} removes every attention layer, and transformers cannot run a {model_config.model_type} model "
            "without one (its cache reads the sequence length from an attention layer). Keep at least 1."
        )
    if not sum(targets.values()):
        raise ValueError(f"{field} keeps no layer: keep at least one.")
    return targets


def layers_to_drop_by_type(model_config, num_layers_by_type: dict) -> dict[str, int]:
    """How many layers of each block type depth pruning removes for `num_layers_by_type` (keyed by block name)."""
    targets = resolve_layers_by_type(model_config, num_layers_by_type)
    return {block: count - targets[block] for block, count in layer_counts_by_type(model_config).items()}


def kept_block_types(model_config, num_layers_by_type: dict) -> list[str]:
    """The config's block types (`layers_block_type` entries) of a model with `num_layers_by_type` layers of each type,
    in the order of the source's first layers of each type: the layers' count per type (all that parameter counts
    need), not which ones depth pruning will choose."""
    targets = resolve_layers_by_type(model_config, num_layers_by_type)
    seen = Counter()
    kept = []
    for block, kind in zip(block_names(model_config), layer_block_types(model_config)):
        seen[block] += 1
        if seen[block] <= targets[block]:
            kept.append(kind)
    return kept


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
    base = get_base_model(model)
    base.layers = new_layers
    config = model.config
    spec = ARCHITECTURES.get(config.model_type)  # a spec passed in is dense: no per-layer tables, no KV sharing
    _slice_per_layer_tables(base, spec, config, kept)
    # Per-layer config lists (layer_types, layers_block_type, ...) must follow the layers they describe.
    for key, value in sliced_layer_lists(config, vars(config), kept).items():
        setattr(config, key, value)
    config.num_hidden_layers = len(kept)
    _set_kv_sharing(new_layers, spec, config)
    return kept


def _slice_per_layer_tables(base, spec, config, kept: list[int]) -> None:
    """Keeps the kept layers' blocks of the base model's `spec.per_layer_tables` (Gemma 3n's per-layer inputs)."""
    if spec is None or not spec.per_layer_tables:
        return
    width = getattr(config, spec.per_layer_table_width)
    rows = torch.cat([torch.arange(i * width, (i + 1) * width) for i in kept])
    for name, dim in spec.per_layer_tables:
        module = getattr(base, name)
        weight = module.weight.data.index_select(dim, rows.to(module.weight.device)).clone()
        module.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
        for attribute in ("num_embeddings", "embedding_dim", "in_features", "out_features"):
            if hasattr(module, attribute):  # the sizes nn.Embedding / nn.Linear report
                setattr(module, attribute, weight.shape[{"num_embeddings": 0, "out_features": 0}.get(attribute, 1)])


def kv_sharing(model_config) -> list[str | None]:
    """Per layer, as the stock modelling decides it (the config's own `kv_sharing_modes`, for a family with
    `kv_shared_layers_field`): `"reuse"` for the last `n` layers (they compute no keys and values), `"store"` for the
    last earlier layer of each `layer_types` entry (the shared layers of that type read its keys and values), `None`
    for the others and for every other family."""
    spec = ARCHITECTURES.get(model_config.model_type)
    if spec is None or spec.kv_shared_layers_field is None:
        return [None] * model_config.num_hidden_layers
    return list(model_config.kv_sharing_modes)


def kv_sources(model_config) -> dict[int, int]:
    """`{shared layer: the layer whose keys and values it reads}` (see `kv_sharing`); `{}` without KV sharing."""
    modes = kv_sharing(model_config)
    types = getattr(model_config, "layer_types", None) or []
    producers = {types[i]: i for i, mode in enumerate(modes) if mode == "store"}
    return {i: producers[types[i]] for i, mode in enumerate(modes) if mode == "reuse"}


def kv_producers(model_config) -> set[int]:
    """The layers whose keys and values later layers read (see `kv_sharing`): depth pruning keeps them."""
    modes = kv_sharing(model_config)
    read = {model_config.layer_types[i] for i, mode in enumerate(modes) if mode == "reuse"}
    return {i for i, mode in enumerate(modes) if mode == "store" and model_config.layer_types[i] in read}


def _set_kv_sharing(layers, spec, config) -> None:
    """Sets the KV-sharing flags the stock attention took from the config at construction to the renumbered layers'.
    Depth pruning keeps every producer and the shared layers stay last, so a layer that computed its keys and values
    still does, and one that read another's still does (it has no projections to compute them)."""
    if spec is None or spec.kv_shared_layers_field is None:
        return
    for layer, mode in zip(layers, kv_sharing(config)):
        attn = getattr(layer, spec.attention)
        attn.is_kv_shared_layer = mode == "reuse"
        attn.store_full_length_kv = mode == "store"


def sliced_layer_lists(model_config, values: dict, kept: list[int]) -> dict:
    """The per-layer lists of `values` (a config's fields) for a model of the layers `kept` of `model_config`: a list
    with one entry per layer keeps the kept layers' entries, a list of layer indices the kept ones, renumbered. Other
    lists stay as they are, whatever their length."""
    num_layers = model_config.num_hidden_layers
    spec = ARCHITECTURES.get(model_config.model_type)  # hybrids are table entries; a spec passed in is dense
    block_types_field = spec.block_types_field if spec is not None else None
    renumber = {old: new for new, old in enumerate(kept)}
    sliced = {}
    for key in dict.fromkeys(PER_LAYER_CONFIG_LISTS + ((block_types_field,) if block_types_field else ())):
        value = values.get(key)
        if isinstance(value, (list, tuple)) and len(value) == num_layers:
            sliced[key] = type(value)(value[i] for i in kept)
    for key in LAYER_INDEX_CONFIG_LISTS:
        value = values.get(key)
        if isinstance(value, (list, tuple)):
            sliced[key] = type(value)(renumber[i] for i in value if i in renumber)
    if spec is not None and spec.kv_shared_layers_field is not None:
        # The shared layers are the last ones: count those kept.
        shared = values.get(spec.kv_shared_layers_field) or 0
        sliced[spec.kv_shared_layers_field] = sum(i >= num_layers - shared for i in kept)
    if spec is not None and spec.dense_layers_field is not None:
        # The dense layers stay the leading ones, whichever layers are dropped: the field counts those kept.
        dense = values.get(spec.dense_layers_field) or 0
        sliced[spec.dense_layers_field] = sum(i < dense for i in kept)
    return sliced


def can_drop(model_config, dropped) -> bool:
    """Whether the layers `dropped` may be dropped together: not when they hold a layer whose keys and values later
    layers read (`kv_producers`), nor when they leave a hybrid no attention layer (transformers' hybrid cache reads
    the sequence length from an attention layer, so a Nemotron-H without one cannot run with `use_cache`)."""
    spec = ARCHITECTURES.get(model_config.model_type)  # hybrids are table entries; a spec passed in is dense
    if kv_producers(model_config) & set(dropped):
        return False
    if spec is None or spec.block_types_field is None:
        return True
    kinds = list(getattr(model_config, spec.block_types_field))
    attention = [i for i, kind in enumerate(kinds) if kind == dict(spec.block_types).get("attention")]
    return not attention or not set(attention) <= set(dropped)


def _lowest(model_config, order: list[int], num_to_drop: int, by_type: dict[str, int] | None = None) -> list[int]:
    """The first `num_to_drop` layers of `order` (sorted), skipping a hybrid's last attention layer; with `by_type`,
    the first `by_type[block]` layers of each block type."""
    names = block_names(model_config) if by_type is not None else None
    left = Counter(by_type or {})
    dropped = []
    for i in order:
        if len(dropped) == num_to_drop:
            break
        if names is not None and not left[names[i]]:
            continue
        if can_drop(model_config, dropped + [i]):
            dropped.append(i)
            if names is not None:
                left[names[i]] -= 1
    return sorted(dropped)


def check_hybrid_depth(model_config, kept: list[int]) -> None:
    """Refuses to drop a layer whose keys and values later layers read, or every attention layer of a hybrid (see
    `can_drop`)."""
    num_layers = model_config.num_hidden_layers
    dropped = [i for i in range(num_layers) if i not in set(kept)]
    producers = sorted(kv_producers(model_config) & set(dropped))
    if producers:
        spec = get_architecture(model_config)
        readers = [i for i, mode in enumerate(kv_sharing(model_config)) if mode == "reuse"]
        raise ValueError(
            f"Dropping layers {dropped} removes layers {producers}, whose keys and values the last "
            f"{spec.kv_shared_layers_field}={len(readers)} layers ({readers}) of this {model_config.model_type} model "
            "read: they are kept. Drop other layers (layers_to_drop), or fewer."
        )
    if not can_drop(model_config, dropped):
        spec = get_architecture(model_config)
        kinds = list(getattr(model_config, spec.block_types_field))
        attention = [i for i, kind in enumerate(kinds) if kind == dict(spec.block_types).get("attention")]
        raise ValueError(
            f"Dropping layers {dropped} removes every attention layer ({attention}) of this "
            f"{model_config.model_type} model, and transformers cannot run a hybrid without one (its cache reads the "
            "sequence length from an attention layer). Keep at least one: drop other layers (layers_to_drop), or "
            "fewer."
        )
