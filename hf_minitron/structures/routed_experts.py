"""Routed experts of a Mixture-of-Experts block: scores, selection, slicing, counting.

The experts of a transformers 5 MoE block are fused 3-D parameters: `gate_up_proj` `[E, 2I, H]` and `down_proj`
`[E, H, I]` (or transposed, `[E, H, 2I]` / `[E, I, H]`, with biases and interleaved gate/up columns for GPT-OSS),
described by the attributes transformers' `use_experts_implementation` sets on the module (`has_gate`, `has_bias`,
`is_transposed`, `is_concatenated`). Pruning keeps whole experts: the same slice of every expert tensor, the router's
rows (and bias), so routing among the kept experts is unchanged up to the softmax over fewer logits.

Scores, per layer, from the tokens routed to each expert during ONE calibration pass (`expert_importance`):

* `"output_norm"` (default): mean L2 norm of the expert's output over its routed tokens (NVIDIA ModelOpt's
  Minitron estimator for MoE);
* `"reap"`: mean router weight x output norm over its routed tokens (REAP, https://arxiv.org/abs/2510.13999);
* `"frequency"`: how many tokens were routed to it;
* and, with `importance="magnitude"` / `"random"`, the L2 norm of its weights / a seeded random score.

The statistics come from an instrumented eager forward of the experts module (`instrument`), which computes each
expert once, as transformers' eager path does, and shows every expert's down-projection input and output to the
observers of this module and of `expert_neurons.py`: the pass costs no second expert computation.
"""

import torch
import torch.nn.functional as F

from .slicing import replace_parameter, slice_parameter, topk_sorted
from .statistics import zeros_like


KEY = "experts"
FIELD = "num_experts"
EXPERT_IMPORTANCE = ("output_norm", "reap", "frequency")
STATISTICS = ("output_norm", "reap", "count")


def present(spec) -> bool:
    return spec.moe is not None


def experts_module(layer, spec):
    return layer.get_submodule(f"{spec.moe}.{spec.experts}")


def router_module(layer, spec):
    return layer.get_submodule(f"{spec.moe}.{spec.router}")


# ---------------------------------------------------------------------------------------------- fused expert layout
def _first_name(experts) -> str:
    return "gate_up_proj" if experts.has_gate else "up_proj"


def _in_dim(experts) -> int:
    """Dimension of the expert FFN width in the first projection (`[E, 2I, H]` -> 1; transposed -> 2)."""
    return 2 if experts.is_transposed else 1


def _down_in_dim(experts) -> int:
    """Dimension of the expert FFN width in `down_proj` (`[E, H, I]` -> 2; transposed `[E, I, H]` -> 1)."""
    return 1 if experts.is_transposed else 2


def _linear(x, weight, bias, transposed: bool):
    out = x @ weight if transposed else F.linear(x, weight)
    return out if bias is None else out + bias


def _bias(experts, name: str, e: int):
    return getattr(experts, f"{name}_bias")[e] if experts.has_bias else None


def expert_forward(experts, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(down_proj input, output)` of expert `e` on tokens `x` `[T, H]`, as transformers' eager experts compute it."""
    first = _first_name(experts)
    h = _linear(x, getattr(experts, first)[e], _bias(experts, first, e), experts.is_transposed)
    act = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    out = _linear(act, experts.down_proj[e], _bias(experts, "down_proj", e), experts.is_transposed)
    return act, out


class _Instrumented:
    """Replaces an experts module's forward (an instance attribute, removed by `remove()`) by an eager loop that
    calls `observer(e, token_idx, weights, down_input, output)` for every expert that received tokens."""

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
        if "forward" in vars(self.experts):
            del self.experts.forward


def instrument(experts, observer) -> _Instrumented | None:
    """Adds `observer` to the experts module's instrumented forward; returns a handle when it installed it."""
    current = vars(experts).get("forward")
    if isinstance(getattr(current, "__self__", None), _Instrumented):
        current.__self__.observers.append(observer)
        return None
    handle = _Instrumented(experts)
    handle.observers.append(observer)
    return handle


# ---------------------------------------------------------------------------------------------- scores
def hooks(collector, index: int, layer) -> list:
    experts = experts_module(layer, collector.spec)
    store = collector.store(KEY, index)
    num_experts = experts.num_experts

    def observe(e, token_idx, weights, act, out):
        mask = collector.token_mask[token_idx]  # padded positions are excluded
        if not store:
            zeros_like(store, out.device, output_norm=(num_experts,), reap=(num_experts,), count=(num_experts,))
        norms = out.float().norm(dim=-1) * mask
        store["output_norm"][e] += norms.sum().double()
        store["reap"][e] += (norms * weights.float()).sum().double()
        store["count"][e] += mask.sum().double()

    handle = instrument(experts, observe)
    return [handle] if handle is not None else []


def sites(spec) -> list[tuple[int, str, int, str]]:
    return [(3, KEY, 0, f"output of {spec.moe}.{spec.experts}")]


def scores(importance, expert_importance: str = "output_norm") -> torch.Tensor:
    """`[num_layers, num_experts]` expert importance by `expert_importance`."""
    stats = importance.experts
    if "score" in stats:
        return stats["score"].double()
    count = stats["count"].double()
    if expert_importance == "frequency":
        return count
    return stats[expert_importance].double() / count.clamp_min(1)


def magnitude(layer, spec, shape) -> torch.Tensor:
    """`[num_experts]`: L2 norm of each expert's weights."""
    experts = experts_module(layer, spec)
    total = 0
    for param in experts.parameters(recurse=False):
        total = total + param.float().pow(2).flatten(1).sum(1)
    return total.sqrt()


def hidden_weights(layer, spec) -> tuple[list, list]:
    """Hidden-facing weights as `[rows, hidden]` reads / `[hidden, cols]` writes, for magnitude channel scores."""
    experts = experts_module(layer, spec)
    first = getattr(experts, _first_name(experts))
    down = experts.down_proj
    if experts.is_transposed:  # [E, H, 2I] reads, [E, I, H] writes
        reads = first.transpose(1, 2).flatten(0, 1)
        writes = down.flatten(0, 1).t()
    else:  # [E, 2I, H] reads, [E, H, I] writes
        reads = first.flatten(0, 1)
        writes = down.transpose(0, 1).flatten(1)
    return [reads, router_module(layer, spec).weight], [writes]


# ---------------------------------------------------------------------------------------------- slicing
def slice_experts(layer, spec, kept: torch.Tensor) -> None:
    experts = experts_module(layer, spec)
    for name, _ in list(experts.named_parameters(recurse=False)):
        slice_parameter(experts, name, kept, dim=0)
    experts.num_experts = kept.numel()
    router = router_module(layer, spec)
    for name in ("weight", "bias", "e_score_correction_bias"):
        if isinstance(getattr(router, name, None), torch.nn.Parameter):
            slice_parameter(router, name, kept, dim=0)
    router.num_experts = kept.numel()


def slice_hidden(layer, spec, kept: torch.Tensor) -> None:
    experts = experts_module(layer, spec)
    first = _first_name(experts)
    slice_parameter(experts, first, kept, dim=1 if experts.is_transposed else 2)
    slice_parameter(experts, "down_proj", kept, dim=2 if experts.is_transposed else 1)
    if experts.has_bias:
        slice_parameter(experts, "down_proj_bias", kept, dim=1)
    router = router_module(layer, spec)
    slice_parameter(router, "weight", kept, dim=1)


def prune(model, layers, spec, importance, source: dict, target: dict, kept_layers, record, config) -> None:
    if target[FIELD] >= source[FIELD]:
        return
    expert_scores = scores(importance, config.expert_importance)
    for new_idx, src_idx in enumerate(kept_layers):
        kept = topk_sorted(expert_scores[src_idx], target[FIELD])
        slice_experts(layers[new_idx], spec, kept)
        record.experts[new_idx] = kept.tolist()


def update_config(model_config, spec, source: dict, target: dict) -> None:
    setattr(model_config, spec.num_experts_field, target[FIELD])


def sync_modules(model, model_config) -> None:
    """Routers, experts and the `*ForCausalLM` (for its load-balancing loss) cache `num_experts` and `hidden_dim`."""
    from ..architectures import get_architecture

    num_experts = getattr(model_config, get_architecture(model_config).num_experts_field)
    for module in model.modules():
        if isinstance(getattr(module, "num_experts", None), int):
            module.num_experts = num_experts
        if isinstance(getattr(module, "hidden_dim", None), int):
            module.hidden_dim = model_config.hidden_size


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
def count_roles(spec, layer) -> dict[str, tuple]:
    """Exact dims of every expert parameter (keyed by parameter name): `E` experts (the active count uses top-k),
    `R` router rows (every expert is scored for every token), `fe` / `2fe` expert width, `h` hidden."""
    experts = experts_module(layer, spec)
    base, router = f"{spec.moe}.{spec.experts}", f"{spec.moe}.{spec.router}"
    width = "2fe" if experts.has_gate else "fe"
    first = _first_name(experts)
    roles = {
        f"{base}.{first}": ("E", "h", width) if experts.is_transposed else ("E", width, "h"),
        f"{base}.down_proj": ("E", "fe", "h") if experts.is_transposed else ("E", "h", "fe"),
        f"{base}.{first}_bias": ("E", width),
        f"{base}.down_proj_bias": ("E", "h"),
        f"{router}.weight": ("R", "h"),
        f"{router}.bias": ("R",),
        f"{router}.e_score_correction_bias": ("R",),
    }
    return roles


def count_sizes(shape: dict) -> dict[str, int]:
    return {"E": shape[FIELD], "R": shape[FIELD]}
