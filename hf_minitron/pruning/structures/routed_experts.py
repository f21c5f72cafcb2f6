"""Routed experts of a Mixture-of-Experts block: scores, selection, slicing, counting.

The experts of a block are fused 3-D parameters, in one of two layouts, both described by an `ExpertTensors` (where
each tensor lives inside the decoder layer, and how it is laid out):

* transformers 5's experts module: `gate_up_proj` `[E, 2I, H]` and `down_proj` `[E, H, I]` (or transposed,
  `[E, H, 2I]` / `[E, I, H]`, with biases and interleaved gate/up columns for GPT-OSS), described by the attributes
  transformers' `use_experts_implementation` sets on the module (`has_gate`, `has_bias`, `is_transposed`,
  `is_concatenated`);
  Llama 4's experts module, without those attributes, has one fixed layout (transposed, gated, no biases) and takes
  the tokens already scaled by their router scores (`ArchitectureSpec.experts_scale_input`);
* the ScatterMoE layout (JetMoE, `ArchitectureSpec.expert_layout`): two modules with `weight` `[E, out, in]`, a top-k
  gating module holding the router `Linear`, and an output bias `[H]` of the block. JetMoE's mixture of attention
  experts has the same layout (`attention_experts.py` uses the functions here for it).

Pruning keeps whole experts: the same slice of every expert tensor, the router's rows (and bias, and the
`e_score_correction_bias` buffer of sigmoid routers), so routing among the kept experts is unchanged up to the softmax
over fewer logits. A grouped router (Nemotron-H, `n_group` / `topk_group`) groups the experts by position: the same
number of experts is kept in every group, each group's best, so that every kept expert stays in its group.

Scores, per layer, from the tokens routed to each expert during ONE calibration pass (`expert_importance`):

* `"output_norm"`: mean L2 norm of the expert's output over its routed tokens (NVIDIA ModelOpt's Minitron estimator
  for MoE);
* `"reap"` (default): mean router weight x output norm over its routed tokens (REAP, https://arxiv.org/abs/2510.13999).
  Of the two output-based estimators it kept the real-weight MoE better, before and after KD, at 8 -> 6 and 8 -> 4
  experts (`benchmarks/moe_prune_quality.py`; README has the table);
* `"frequency"`: how many tokens were routed to it;
* and, with `importance="magnitude"` / `"random"`, the L2 norm of its weights / a seeded random score.

The statistics come from instrumenting the experts (`instrument`): transformers' experts module gets an eager forward
that computes each expert once, as transformers' eager path does (Llama 4's on its routed tokens, read from a hook on
its router); the ScatterMoE layout gets hooks on its gating module and second projection, which already see each
expert's tokens. Either way every expert's second-projection input and output reach the observers of this module and
of `expert_neurons.py`: the pass costs no second expert computation.

One module past 500 lines: a structure's targets, checks, statistics, selection, slicing and counting are its module
(`CONTRIBUTING.md`), and the two expert layouts they all read are described here, for `expert_neurons.py` and
`attention_experts.py` too.
"""

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .fields import ConfigField, refuse_absent_target, target_names
from .search_axis import SearchAxis
from .slicing import replace_parameter, slice_linear, slice_parameter, topk_sorted
from .statistics import static_scores, zeros_like


KEY = "experts"
SCORE_KEYS = (KEY,)
EXPERT_IMPORTANCE = ("output_norm", "reap", "frequency")
CONFIG_FIELDS = (
    ConfigField(
        "num_experts",
        doc="MoE: target number of routed experts per layer (the same in every layer, so the config stays uniform).",
        help="MoE: target routed experts per layer.",
    ),
    ConfigField(
        "expert_importance",
        doc="""How routed experts are ranked with `importance="activation"`: `"output_norm"` (mean L2 norm of the
expert's output over its routed tokens, NVIDIA ModelOpt's estimator), `"reap"` (mean router weight x
output norm, https://arxiv.org/abs/2510.13999) or `"frequency"` (tokens routed to it). The default is the
output-based estimator that kept the real-weight MoE of `benchmarks/moe_prune_quality.py` better.""",
        help="MoE: how experts are ranked.",
        type=str,
        default="reap",
        choices=EXPERT_IMPORTANCE,
        target=False,
    ),
)
FIELDS = target_names(CONFIG_FIELDS)
BLOCK = "moe"
# A token is routed to num_experts_per_tok experts: never fewer experts than that.
AXES = (SearchAxis("num_experts", "experts", "experts", floor="num_experts_per_tok", cap=True),)
CARD_ROWS = {"num_experts": "Routed experts", "num_experts_per_tok": "Experts per token"}
SUMMARY = (*FIELDS, "num_experts_per_tok")
RECORD = ("experts",)
STATISTICS = ("output_norm", "reap", "count")
_FIELD = FIELDS[0]


def present(spec) -> bool:
    return spec.moe is not None


# ---------------------------------------------------------------------------------------------- targets
def check_moe_target(config, name: str, what: str, model_config, shape: dict, spec) -> None:
    """Refuses the MoE target `name` for a model without `what` (routed experts, a shared expert), or a hybrid whose
    layers hold no MoE block."""
    value = getattr(config, name)
    if value is None:
        return
    refuse_absent_target(config, name, model_config, shape, what, "shared_expert" if "shared" in what else "moe")
    kind = dict(spec.block_types).get(BLOCK) if spec is not None and spec.block_types_field else None
    if kind and kind not in getattr(model_config, spec.block_types_field):
        # A hybrid without MoE layers still has the config fields (e.g. Nemotron-H 8B: n_routed_experts=8).
        raise ValueError(
            f"PrunedConfig.{name}={value} does not apply: this model_type={model_config.model_type!r} model has no "
            f"{kind!r} blocks in {spec.block_types_field}. Leave it None."
        )


def shape(model_config, spec) -> dict:
    """The routed experts and how many a token uses (`{}` for a dense family), under `PrunedConfig`'s names."""
    if spec is None or spec.moe is None:
        return {}
    shape = {
        "num_experts": getattr(model_config, spec.num_experts_field),
        "num_experts_per_tok": model_config.num_experts_per_tok,
    }
    if getattr(model_config, "n_group", None) is not None:
        # Grouped routing (transformers' DeepSeek-V3-style routers, Nemotron-H): the experts form `n_group` equal
        # groups by position and a token picks its experts among its `topk_group` best groups. Kept, not pruned:
        # expert pruning keeps as many experts in every group.
        shape["n_group"], shape["topk_group"] = model_config.n_group, model_config.topk_group
    return shape


def check_applies(config, model_config, shape: dict, spec) -> None:
    check_moe_target(config, _FIELD, "routed experts", model_config, shape, spec)


def check_target(config, model_config=None, shape: dict | None = None) -> None:
    """Refuses fewer experts than a token is routed to, and counts a grouped router cannot keep (`n_group`)."""
    num_experts = getattr(config, _FIELD)
    if shape is None or num_experts is None:
        return
    if num_experts < shape["num_experts_per_tok"]:
        raise ValueError(
            f"PrunedConfig.num_experts={num_experts} is fewer than the experts each token is routed to "
            f"(num_experts_per_tok={shape['num_experts_per_tok']}): keep at least that many experts."
        )
    if "n_group" in shape:
        _check_expert_groups(num_experts, shape)


def _check_expert_groups(n: int, shape: dict) -> None:
    """A grouped router (`n_group`, `topk_group`; Nemotron-H) views the experts as `n_group` equal groups, scores
    each group by its 2 best experts and lets a token pick its `num_experts_per_tok` experts among its
    `topk_group` best groups: the pruned count must fit all three."""
    groups, top_groups, top_k = shape["n_group"], shape["topk_group"], shape["num_experts_per_tok"]
    per_group = max(2, -(-top_k // top_groups))  # the fewest experts a group may keep
    valid = list(range(groups * per_group, shape["num_experts"] + 1, groups))
    if len(valid) <= 12:
        choose = f"Choose one of {valid}"
    else:
        choose = f"Choose a multiple of {groups} in [{valid[0]}, {valid[-1]}]"
    choose += f" (multiples of n_group={groups}, at least {per_group} per group)."
    if n % groups:
        raise ValueError(
            f"PrunedConfig.num_experts={n} is not a multiple of the model's n_group={groups}: the router groups the "
            f"experts in {groups} equal groups, and pruning keeps the same number in each. {choose}"
        )
    if n // groups < per_group:
        why = (
            "the router scores each group by its 2 best experts"
            if n // groups < 2
            else f"a token's topk_group={top_groups} groups must hold its num_experts_per_tok={top_k} experts"
        )
        raise ValueError(
            f"PrunedConfig.num_experts={n} leaves {n // groups} experts in each of the n_group={groups} groups, too "
            f"few: {why}. {choose}"
        )


# ---------------------------------------------------------------------------------------------- the two layouts
@dataclass(frozen=True)
class ExpertTensors:
    """One block's routed experts: paths inside the decoder layer, and how the fused tensors are laid out.

    Args:
        first, second (`str`): the first (gate/up, or up) and second (down) projection parameters, `[E, ...]`.
        router (`str`): the module whose `weight` is `[E, hidden]` (and optional `bias` / `e_score_correction_bias`).
        weights (`tuple[str, ...]`): every per-expert parameter, in the order the module registers them.
        transposed (`bool`): `[E, in, out]` tensors instead of `[E, out, in]`.
        gated, concatenated (`bool`): the first projection holds gate and up, concatenated or interleaved.
        first_bias, second_bias (`str`, *optional*): per-expert biases (GPT-OSS).
        output_bias (`str`, *optional*): a `[hidden]` bias the block adds after combining the experts (JetMoE).
        experts (`str`, *optional*): transformers' experts module (its forward is instrumented).
        gating (`str`, *optional*): the ScatterMoE layout's top-k gating module (hooked, with `second`'s module).
        score_bias (`str`, *optional*): a `[E]` buffer of the block biasing the expert choice (MiniMax-M2).
        scaled_input (`bool`): the block scales the experts' input by the router score (Llama 4,
            `ArchitectureSpec.experts_scale_input`).
    """

    first: str
    second: str
    router: str
    weights: tuple[str, ...]
    transposed: bool = False
    gated: bool = True
    concatenated: bool = True
    first_bias: str | None = None
    second_bias: str | None = None
    output_bias: str | None = None
    experts: str | None = None
    gating: str | None = None
    score_bias: str | None = None
    scaled_input: bool = False


def parallel_tensors(block: str, layout) -> ExpertTensors:
    """The `ExpertTensors` of a ScatterMoE-layout block at `block` (a `ParallelExperts` describes it)."""
    first, second = f"{block}.{layout.first}.weight", f"{block}.{layout.second}.weight"
    return ExpertTensors(
        first=first,
        second=second,
        router=f"{block}.{layout.router}",
        weights=(first, second),
        gated=layout.gated,
        output_bias=f"{block}.{layout.output_bias}",
        gating=f"{block}.{layout.gating}",
    )


def expert_tensors(layer, spec) -> ExpertTensors:
    """The `ExpertTensors` of the MoE block of `layer`."""
    if spec.expert_layout is not None:
        return parallel_tensors(spec.moe, spec.expert_layout)
    path = f"{spec.moe}.{spec.experts}"
    if spec.experts_scale_input:  # Llama 4: no `use_experts_implementation` attributes, one fixed layout
        first, second = f"{path}.gate_up_proj", f"{path}.down_proj"
        return ExpertTensors(
            first=first,
            second=second,
            router=f"{spec.moe}.{spec.router}",
            weights=(first, second),
            transposed=True,
            experts=path,
            scaled_input=True,
        )
    experts = layer.get_submodule(path)
    first = "gate_up_proj" if experts.has_gate else "up_proj"
    return ExpertTensors(
        first=f"{path}.{first}",
        second=f"{path}.down_proj",
        router=f"{spec.moe}.{spec.router}",
        weights=tuple(f"{path}.{name}" for name, _ in experts.named_parameters(recurse=False)),
        transposed=experts.is_transposed,
        gated=experts.has_gate,
        concatenated=experts.is_concatenated,
        first_bias=f"{path}.{first}_bias" if experts.has_bias else None,
        second_bias=f"{path}.down_proj_bias" if experts.has_bias else None,
        experts=path,
        score_bias=f"{spec.moe}.{spec.expert_score_bias}" if spec.expert_score_bias else None,
    )


def parallel_blocks(layer, spec) -> list[nn.Module]:
    """The ScatterMoE-layout blocks of `layer` (JetMoE's MoE block and mixture of attention experts). They call their
    expert width `hidden_size` and the model's `input_size`: `sync_parallel_block` keeps both."""
    blocks = [layer.get_submodule(spec.moe)] if spec.moe is not None and spec.expert_layout is not None else []
    if spec.attention_experts is not None:
        blocks.append(layer.get_submodule(f"{spec.attention}.{spec.attention_experts}"))
    return blocks


def sync_parallel_block(block, layout, num_experts: int, hidden: int, width: int) -> None:
    """The sizes a ScatterMoE-layout block, its gating and its two projections cache at init (the MoA's forward reads
    its `hidden_size`, the MoE's its `input_size`, the gating its `num_experts`)."""
    first, second = block.get_submodule(layout.first), block.get_submodule(layout.second)
    gating = block.get_submodule(layout.gating)
    block.input_size, block.hidden_size = hidden, width
    if isinstance(getattr(block, "num_experts", None), int):
        block.num_experts = num_experts
    gating.num_experts, gating.input_size = num_experts, hidden
    first.num_experts, first.input_size, first.output_size = num_experts, hidden, (2 if layout.gated else 1) * width
    second.num_experts, second.input_size, second.output_size = num_experts, width, hidden


def tensor_owner(layer, path: str) -> tuple[nn.Module, str]:
    module, _, name = path.rpartition(".")
    return layer.get_submodule(module), name


def get_tensor(layer, path: str) -> torch.Tensor:
    return getattr(*tensor_owner(layer, path))


def first_width_dim(t: ExpertTensors) -> int:
    """Dimension of the expert width in the first projection (`[E, 2I, H]` -> 1; transposed -> 2)."""
    return 2 if t.transposed else 1


def second_width_dim(t: ExpertTensors) -> int:
    """Dimension of the expert width in the second projection (`[E, H, I]` -> 2; transposed `[E, I, H]` -> 1)."""
    return 1 if t.transposed else 2


# ---------------------------------------------------------------------------------------------- instrumentation
def _linear(x, weight, bias, transposed: bool):
    out = x @ weight if transposed else F.linear(x, weight)
    return out if bias is None else out + bias


def expert_forward(experts, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(down_proj input, output)` of expert `e` of a transformers experts module on tokens `x` `[T, H]`, as
    transformers' eager experts compute it."""
    first = "gate_up_proj" if experts.has_gate else "up_proj"

    def bias(name):
        return getattr(experts, f"{name}_bias")[e] if experts.has_bias else None

    h = _linear(x, getattr(experts, first)[e], bias(first), experts.is_transposed)
    act = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    out = _linear(act, experts.down_proj[e], bias("down_proj"), experts.is_transposed)
    return act, out


class _Instrumented:
    """Replaces a transformers experts module's forward (an instance attribute, removed by `remove()`) by an eager
    loop that calls `observer(e, token_idx, weights, down_input, output)` for every expert that received tokens."""

    def __init__(self, experts):
        self.experts, self.observers = experts, []
        experts.forward = self.forward

    def forward(self, hidden_states, top_k_index, top_k_weights):
        experts = self.experts
        final = torch.zeros_like(hidden_states)
        num_experts = experts.num_experts
        for e in torch.unique(top_k_index).tolist():
            if e >= num_experts:  # transformers marks masked routing slots with num_experts
                continue
            token_idx, top_k_pos = torch.where(top_k_index == e)
            act, out = expert_forward(experts, e, hidden_states[token_idx])
            weights = top_k_weights[token_idx, top_k_pos]
            for observer in self.observers:
                observer(e, token_idx, weights, act, out)
            final.index_add_(0, token_idx, (out * weights[:, None]).to(final.dtype))
        return final

    def remove(self):
        _INSTALLED.pop(self.experts, None)
        if "forward" in vars(self.experts):
            del self.experts.forward


class _Hooked:
    """Hooks on a ScatterMoE-layout block, which computes each expert on its tokens anyway: the gating module's output
    gives the routing (token index and gate of each row, tokens per expert), the second projection's input and output
    each expert's activations and output; calls `observer(e, token_idx, weights, second_input, output)` for every
    expert that received tokens."""

    def __init__(self, gating, second):
        self.observers, self.routing, self.inputs = [], None, None
        self.handles = [
            gating.register_forward_hook(self._routing),
            second.register_forward_pre_hook(self._input),
            second.register_forward_hook(self._output),
        ]
        self.key = gating

    def _routing(self, module, args, output):
        _, token_idx, gates, expert_size, _ = output
        self.routing = (token_idx, gates, expert_size)

    def _input(self, module, args):
        self.inputs = args[0]

    def _output(self, module, args, output):
        token_idx, gates, expert_size = self.routing
        start = 0
        for e, size in enumerate(expert_size):
            if size:
                rows = slice(start, start + size)
                for observer in self.observers:
                    observer(e, token_idx[rows], gates[rows], self.inputs[rows], output[rows])
            start += size
        self.inputs = None

    def remove(self):
        _INSTALLED.pop(self.key, None)
        for handle in self.handles:
            handle.remove()


class _ScaledInstrumented:
    """Llama 4's experts get every token once per expert, already multiplied by its router score (zero for the
    experts not chosen), and no routing. A hook on the router keeps each token's top-k experts and scores; the
    experts' forward is replaced (an instance attribute, removed by `remove()`) by a loop that computes each expert
    on its routed tokens only, which is exact: without biases, a zero input gives a zero output. Observers get the
    router score as the weight and the expert's output on the scaled input, what the block adds."""

    def __init__(self, experts, router):
        self.experts, self.observers, self.routing = experts, [], None
        self.handle = router.register_forward_hook(self._routing)
        experts.forward = self.forward

    def _routing(self, module, args, output):
        router_scores, router_logits = output
        self.routing = (router_scores, torch.topk(router_logits, module.top_k, dim=1).indices)

    def forward(self, hidden_states):
        experts = self.experts
        router_scores, top_k_index = self.routing
        x = hidden_states.view(router_scores.shape[1], -1, hidden_states.shape[-1])
        final = torch.zeros_like(x)
        for e in torch.unique(top_k_index).tolist():
            token_idx, _ = torch.where(top_k_index == e)
            gate, up = (x[e, token_idx] @ experts.gate_up_proj[e]).chunk(2, dim=-1)
            act = up * experts.act_fn(gate)
            out = act @ experts.down_proj[e]
            for observer in self.observers:
                observer(e, token_idx, router_scores[token_idx, e], act, out)
            final[e, token_idx] = out.to(final.dtype)
        self.routing = None
        return final.view(-1, hidden_states.shape[-1])

    def remove(self):
        _INSTALLED.pop(self.experts, None)
        self.handle.remove()
        if "forward" in vars(self.experts):
            del self.experts.forward


# The instrumented module -> its instrumentation, so that several structures share one (and one pass).
_INSTALLED: "weakref.WeakKeyDictionary[nn.Module, _Instrumented | _ScaledInstrumented | _Hooked]" = (
    weakref.WeakKeyDictionary()
)


def instrument(layer, t: ExpertTensors, observer) -> _Instrumented | _ScaledInstrumented | _Hooked | None:
    """Adds `observer(e, token_idx, weights, second_input, output)` to the instrumentation of `t`'s experts; returns
    a handle when it installed it (the caller removes it), `None` when it joined an existing one."""
    key = layer.get_submodule(t.experts if t.experts is not None else t.gating)
    handle = _INSTALLED.get(key)
    if handle is not None:
        handle.observers.append(observer)
        return None
    if t.scaled_input:
        handle = _ScaledInstrumented(key, layer.get_submodule(t.router))
    elif t.experts is not None:
        handle = _Instrumented(key)
    else:
        handle = _Hooked(key, layer.get_submodule(t.second.rpartition(".")[0]))
    _INSTALLED[key] = handle
    handle.observers.append(observer)
    return handle


# ---------------------------------------------------------------------------------------------- scores
def expert_observer(collector, store: dict, num_experts: int):
    """An observer adding each expert's output norms, router-weighted output norms and token counts to `store`."""

    def observe(e, token_idx, weights, act, out):
        mask = collector.token_mask[token_idx]  # padded positions are excluded
        if not store:
            zeros_like(store, out.device, output_norm=(num_experts,), reap=(num_experts,), count=(num_experts,))
        norms = out.float().norm(dim=-1) * mask
        store["output_norm"][e] += norms.sum().double()
        store["reap"][e] += (norms * weights.float()).sum().double()
        store["count"][e] += mask.sum().double()

    return observe


def hooks(collector, index: int, layer) -> list:
    t = expert_tensors(layer, collector.spec)
    num_experts = get_tensor(layer, t.first).shape[0]
    handle = instrument(layer, t, expert_observer(collector, collector.store(KEY, index), num_experts))
    return [handle] if handle is not None else []


def sites(spec) -> list[tuple[int, str, int, str]]:
    experts = spec.experts if spec.expert_layout is None else spec.expert_layout.second
    return [(3, KEY, 0, f"output of {spec.moe}.{experts}")]


def score_shapes(shape: dict) -> dict[str, tuple]:
    """`{score key: per-layer dims}` that every statistic of the key starts with."""
    return {KEY: (shape[_FIELD],)}


def collect(collector, shape: dict, device) -> dict[str, dict]:
    """`{score key: statistics}` of the importance pass, summed over processes."""
    return {KEY: collector.stacked(KEY, shape[_FIELD], 1, STATISTICS, device)}


def random_scores(key: str, shape: dict, draw) -> dict:
    """The random baseline's scores (`draw(*dims)` draws `[num_layers, *dims]`)."""
    return {"score": draw(shape[_FIELD])}


def magnitude_scores(model, layers, spec, shape: dict) -> dict[str, dict]:
    """`{score key: {"score": ...}}` of the weight-magnitude baseline."""
    return {KEY: static_scores([magnitude(layer, spec, shape) for layer in layers])}


def reduce_stats(stats: dict, expert_importance: str) -> torch.Tensor:
    """`[num_layers, num_experts]` from expert statistics: output norm / REAP means, routed-token counts, or static
    scores (`{"score"}`) as they are."""
    if "score" in stats:
        return stats["score"].double()
    count = stats["count"].double()
    if expert_importance == "frequency":
        return count
    return stats[expert_importance].double() / count.clamp_min(1)


def scores(importance, expert_importance: str = "output_norm") -> torch.Tensor:
    """`[num_layers, num_experts]` expert importance by `expert_importance`."""
    return reduce_stats(importance.experts, expert_importance)


def weights_magnitude(layer, t: ExpertTensors) -> torch.Tensor:
    """`[num_experts]`: L2 norm of each expert's weights."""
    total = 0
    for path in t.weights:
        total = total + get_tensor(layer, path).float().pow(2).flatten(1).sum(1)
    return total.sqrt()


def magnitude(layer, spec, shape) -> torch.Tensor:
    if not spec.has(layer, BLOCK):  # a hybrid's layer without an MoE block: a zero row, never used
        return torch.zeros(shape[_FIELD])
    return weights_magnitude(layer, expert_tensors(layer, spec))


def tensors_hidden_weights(layer, t: ExpertTensors) -> tuple[list, list]:
    """Hidden-facing weights of `t`'s experts as `[rows, hidden]` reads / `[hidden, cols]` writes."""
    first, second = get_tensor(layer, t.first), get_tensor(layer, t.second)
    if t.transposed:  # [E, H, 2I] reads, [E, I, H] writes
        reads = first.transpose(1, 2).flatten(0, 1)
        writes = second.flatten(0, 1).t()
    else:  # [E, 2I, H] reads, [E, H, I] writes
        reads = first.flatten(0, 1)
        writes = second.transpose(0, 1).flatten(1)
    return [reads, layer.get_submodule(t.router).weight], [writes]


def hidden_weights(layer, spec) -> tuple[list, list]:
    """Hidden-facing weights as `[rows, hidden]` reads / `[hidden, cols]` writes, for magnitude channel scores."""
    return tensors_hidden_weights(layer, expert_tensors(layer, spec))


# ---------------------------------------------------------------------------------------------- slicing
def slice_experts(layer, t: ExpertTensors, kept: torch.Tensor) -> None:
    """Keeps the experts `kept` of `t`: every per-expert tensor and the router's rows (and biases)."""
    for path in t.weights:
        slice_parameter(*tensor_owner(layer, path), kept, dim=0)
    router = layer.get_submodule(t.router)
    if isinstance(router, nn.Linear):
        slice_linear(router, out_index=kept)
    else:
        for name in ("weight", "bias"):
            if isinstance(getattr(router, name, None), nn.Parameter):
                slice_parameter(router, name, kept, dim=0)
        # Sigmoid routers (Nemotron-H) hold their load-balancing bias as a buffer, saved with the weights.
        bias = getattr(router, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            router.e_score_correction_bias = bias.index_select(0, kept.to(bias.device))
    if t.score_bias is not None:  # a buffer: saved with the weights, so the reload routes as the pruned model does
        owner, name = tensor_owner(layer, t.score_bias)
        bias = getattr(owner, name)
        setattr(owner, name, bias.index_select(0, kept.to(bias.device)))
    # The cached counts (routers, experts, gating) follow in `sync_modules`; these two are read before it runs.
    if t.experts is not None:
        layer.get_submodule(t.experts).num_experts = kept.numel()
        router.num_experts = kept.numel()


def slice_tensors_hidden(layer, t: ExpertTensors, kept: torch.Tensor) -> None:
    """Keeps the hidden channels `kept` in `t`'s experts (inputs of the first projection, outputs of the second and
    their biases), the router's columns and the block's output bias."""
    slice_parameter(*tensor_owner(layer, t.first), kept, dim=1 if t.transposed else 2)
    slice_parameter(*tensor_owner(layer, t.second), kept, dim=2 if t.transposed else 1)
    if t.second_bias is not None:
        slice_parameter(*tensor_owner(layer, t.second_bias), kept, dim=1)
    if t.output_bias is not None:
        slice_parameter(*tensor_owner(layer, t.output_bias), kept, dim=0)
    router = layer.get_submodule(t.router)
    if isinstance(router, nn.Linear):
        slice_linear(router, in_index=kept)
    else:
        slice_parameter(router, "weight", kept, dim=1)


def slice_hidden(layer, spec, kept: torch.Tensor) -> None:
    slice_tensors_hidden(layer, expert_tensors(layer, spec), kept)


def select_experts(expert_scores: torch.Tensor, k: int, groups: int = 1) -> torch.Tensor:
    """The `k` best of `expert_scores` `[num_experts]`, `k // groups` in each of `groups` groups of consecutive
    experts (a grouped router's groups), in ascending order."""
    per_group = expert_scores.view(groups, -1)
    size = per_group.shape[1]
    return torch.cat([topk_sorted(row, k // groups) + g * size for g, row in enumerate(per_group)])


def prune(model, layers, spec, importance, source: dict, target: dict, kept_layers, record, config) -> None:
    if target[_FIELD] >= source[_FIELD]:
        return
    expert_scores = scores(importance, config.expert_importance)
    groups = source.get("n_group", 1)  # `PrunedConfig.validate_for` keeps num_experts a multiple of it
    for new_idx, src_idx in enumerate(kept_layers):
        if not spec.has(layers[new_idx], BLOCK):
            continue
        kept = select_experts(expert_scores[src_idx], target[_FIELD], groups)
        slice_experts(layers[new_idx], expert_tensors(layers[new_idx], spec), kept)
        record.experts[new_idx] = kept.tolist()


def update_config(model_config, spec, source: dict, target: dict) -> None:
    setattr(model_config, spec.num_experts_field, target[_FIELD])


def sync_modules(model, model_config, spec) -> None:
    """Routers, experts and the `*ForCausalLM` (for its load-balancing loss) cache `num_experts` and `hidden_dim`;
    ScatterMoE-layout blocks cache their sizes too (`sync_parallel_block`)."""
    from ...architectures import get_decoder_layers

    num_experts = getattr(model_config, spec.num_experts_field)
    for module in model.modules():
        if isinstance(getattr(module, "num_experts", None), int):
            module.num_experts = num_experts
        if isinstance(getattr(module, "hidden_dim", None), int):
            module.hidden_dim = model_config.hidden_size
    for layer in get_decoder_layers(model):
        # Granite's MoE blocks reshape their output with the hidden size they cached as `input_size`.
        if spec.has(layer, BLOCK) and isinstance(getattr(layer.get_submodule(spec.moe), "input_size", None), int):
            layer.get_submodule(spec.moe).input_size = model_config.hidden_size
    if spec.expert_layout is not None:
        width = getattr(model_config, spec.expert_width_field)
        for layer in get_decoder_layers(model):
            block = layer.get_submodule(spec.moe)
            sync_parallel_block(block, spec.expert_layout, num_experts, model_config.hidden_size, width)


def gather_per_expert(module, name: str, index: torch.Tensor, dim: int) -> None:
    """Keeps `index[e]` along `dim` of expert `e`'s slice of the fused parameter `module.<name>` (`[E, ...]`)."""
    param = getattr(module, name).data
    index = index.to(param.device)
    shape = list(param.shape)
    shape[dim] = index.shape[1]
    view = [index.shape[0]] + [1] * (param.dim() - 1)
    view[dim] = index.shape[1]
    replace_parameter(module, name, torch.gather(param, dim, index.view(view).expand(shape)))


# ---------------------------------------------------------------------------------------------- counting
def tensors_count_roles(t: ExpertTensors, width: str) -> dict[str, tuple]:
    """Exact dims of every parameter of `t` (keyed by parameter path): `E` experts (the active count uses top-k), `R`
    router rows (every expert is scored for every token), `width` the expert width (`2<width>` for gate and up),
    `h` hidden."""
    fused = f"2{width}" if t.gated else width
    roles = {
        t.first: ("E", "h", fused) if t.transposed else ("E", fused, "h"),
        t.second: ("E", width, "h") if t.transposed else ("E", "h", width),
        f"{t.router}.weight": ("R", "h"),
        f"{t.router}.bias": ("R",),
        f"{t.router}.e_score_correction_bias": ("R",),
    }
    if t.first_bias is not None:
        roles[t.first_bias] = ("E", fused)
    if t.second_bias is not None:
        roles[t.second_bias] = ("E", "h")
    if t.output_bias is not None:
        roles[t.output_bias] = ("h",)
    if t.score_bias is not None:
        roles[t.score_bias] = ("R",)
    return roles


def count_roles(spec, layer) -> dict[str, tuple]:
    return tensors_count_roles(expert_tensors(layer, spec), "fe")


def count_sizes(shape: dict) -> dict[str, int]:
    return {"E": shape[_FIELD], "R": shape[_FIELD]}
