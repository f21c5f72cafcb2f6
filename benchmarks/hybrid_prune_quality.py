"""Pruning a real-weight hybrid Mamba2-attention model: which estimator keeps it best, before and after a short KD.

    python benchmarks/hybrid_prune_quality.py                  # default budget (~10 min on a quiet 2-core CPU)
    python benchmarks/hybrid_prune_quality.py --kd-steps 0     # pruning only

The model is the embedded hybrid (`hf_minitron.embedded.hybrid`: SmolLM2-135M-Instruct converted into a stock
`BambaForCausalLM`, attention in 10 of 30 layers, Mamba2 mixers of 18 heads x 64 channels in 9 B/C groups in the
other 20, a SwiGLU MLP of 1536 in every layer). Targets, each a valid Bamba shape (heads x head_dim a multiple of the
hidden size):

* `unpruned`: the hybrid itself through the same KD steps, a check of the KD path: its KD gradient is zero, so its
  loss must not move;
* `mamba_heads9`: 18 -> 9 Mamba heads per layer, by `activation` (Minitron-SSM's group-aware selection: every B/C
  group keeps one of its two heads), `group_blind` (the same scores, the top 9 heads overall, the paper's naive
  baseline), `magnitude`, `magnitude_group_blind` and `random` (mean over seeds). The JSON records, per arm and
  Mamba layer, how many groups the selection left without a head: where none is, the group-blind model IS the
  group-aware one (the embedded hybrid's two heads per group are the two time scales of one attention head, so one
  of them may win in every group), and the magnitude pair shows what emptied groups cost with the same scores;
* `mamba_head_dim32`: every head's channels 64 -> 32;
* `ffn1024`: MLP neurons 1536 -> 1024;
* `hidden384`: hidden size 576 -> 384 (Bamba's Mamba width is `mamba_expand x hidden`: 1152 = 3 x 384; 480 would not
  divide it, which `prune_model` refuses with the shapes that would);
* `depth24`: 6 of 30 layers dropped, by `contiguous` (the block whose removal costs least LM loss) or
  `block_influence` (1 - cos of each layer's input and output);
* `drop6_mamba` / `drop6_attention`: 6 layers of one type dropped (`num_layers_by_type`, by Block Influence).

By construction the mixers' `out_proj` input is `1 + (normalised linear attention) / 10` per channel (see step 3 of
`embedded_hybrid`), so the activation statistic of the Mamba channels (mean |input|) carries that constant offset;
what tells channels apart is their deviation from it.

Every arm is evaluated by held-out loss right after pruning and after `--kd-steps` steps of `DistillationTrainer`
from the unpruned hybrid (same batches, same steps for every arm; the mixers' `out_proj` frozen, see `FROZEN`). One
activation importance pass serves every activation-based width arm; it is timed against plain forward passes of
the base model on the same batches (interleaved repeats, min), the target being <= 1.10x.

Writes `benchmarks/results/hybrid_prune_quality.{json,png}` and prints a Markdown table.
"""

import time

from _common import (
    RESULTS,
    arm_arguments,
    held_out_loss,
    load_and_time,
    measure_arm,
    num_parameters,
    parse_arm_arguments,
    plot_arms,
    report_arm,
    timing_rows,
)


TARGETS = {
    "unpruned": {},  # the control: what the same KD steps do to the hybrid itself
    "mamba_heads9": {"mamba_num_heads": 9},
    "mamba_head_dim32": {"mamba_head_dim": 32},
    "ffn1024": {"intermediate_size": 1024},
    "hidden384": {"hidden_size": 384},
    "depth24": {"num_hidden_layers": 24},
    "drop6_mamba": {"num_layers_by_type": {"mamba": 14}},
    "drop6_attention": {"num_layers_by_type": {"attention": 4}},
}
KD_DIR = RESULTS / ".hybrid_kd"
# The embedded hybrid's mixers feed out_proj a constant offset (module docstring), so Adam's first, sign-like steps
# move every row of out_proj the same way and shift the residual stream: 10 KD steps at 2e-5 took the ffn1024 student
# from 4.83 to 6.46 with out_proj trained, to 4.62 with it frozen (4.68 with every Mamba parameter frozen). Frozen in
# every arm; everything else trains.
FROZEN = ("mamba.out_proj",)
WIDTH_ESTIMATORS = ("activation", "magnitude", "random")
HEAD_ESTIMATORS = ("activation", "group_blind", "magnitude", "magnitude_group_blind", "random")
DEPTH_ESTIMATORS = ("contiguous", "block_influence")


def estimators(target_name: str) -> tuple[str, ...]:
    if target_name == "unpruned":
        return ("none",)
    if target_name == "mamba_heads9":
        return HEAD_ESTIMATORS
    if target_name == "depth24":
        return DEPTH_ESTIMATORS
    if target_name.startswith("drop6"):
        return ("block_influence",)
    return WIDTH_ESTIMATORS


def _pruned_config(target: dict, estimator: str, seed: int, calibration_samples: int, depth_samples: int):
    from hf_minitron import PrunedConfig

    if estimator.endswith("group_blind"):
        method = {"importance": estimator.removesuffix("group_blind").rstrip("_") or "activation"}
        method["mamba_group_aware"] = False
    elif estimator == "none":
        method = {}
    elif estimator in DEPTH_ESTIMATORS:
        method = {"depth_method": estimator}
    else:
        method = {"importance": estimator}
    return PrunedConfig(
        **target,
        **method,
        seed=seed,
        calibration_samples=calibration_samples,
        depth_calibration_samples=depth_samples,
        depth_screening_samples=min(depth_samples, 2),
    )


def groups_left_without_a_head(kept_heads: dict, config) -> dict:
    """Per Mamba layer, how many B/C groups kept none of their heads: 0 everywhere means the group-blind selection
    equals the group-aware one (each group keeps one of its two heads), and the two arms give the same model."""
    per_group = config.mamba_n_heads // config.mamba_n_groups
    return {
        layer: config.mamba_n_groups - len({head // per_group for head in heads})
        for layer, heads in kept_heads.items()
    }


def render_markdown(results: dict) -> str:
    setup = results["setup"]
    build = setup["build"]
    lines = [
        f"Embedded hybrid (SmolLM2-135M converted into Bamba: attention in {len(build['attention_layers'])} of 30 "
        f"layers, Mamba2 in the rest; {setup['parameters']:,} parameters): held-out loss {results['hybrid_loss']:.3f} "
        f"(SmolLM2 {build['teacher_loss']:.3f} and hybrid {build['hybrid_loss']:.3f} at the build's 256 tokens).",
        "",
        f"| target | estimator | parameters | loss after pruning | loss after {setup['kd_steps']} KD steps |",
        "|---|---|---|---|---|",
    ]
    for name, arm in results["arms"].items():
        target, estimator = name.split("/")
        after = "-" if arm.get("after_kd") is None else f"{arm['after_kd']:.3f}"
        if "groups_left_without_a_head" in arm:
            emptied = sum(arm["groups_left_without_a_head"].values())
            estimator += f" ({emptied} of {len(arm['groups_left_without_a_head']) * setup['groups']} groups emptied)"
        lines.append(f"| {target} | {estimator} | {arm['parameters']:,} | {arm['pruned']:.3f} | {after} |")
    lines += timing_rows(results["timing"])
    return "\n".join(lines)


def main():
    parser = arm_arguments(__doc__, "hybrid_prune_quality.json", TARGETS, random_seeds=1)
    parser.add_argument("--depth-samples", type=int, default=4, help="samples that score each depth candidate")
    args = parse_arm_arguments(parser, TARGETS)
    started = time.perf_counter()

    from hf_minitron.embedded.hybrid import embedded_hybrid_info, load_embedded_hybrid
    from hf_minitron.io import atomic_write_json

    teacher, info, calibration, train, validation, timing, scores = load_and_time(
        load_embedded_hybrid,
        embedded_hybrid_info,
        args,
        lambda n: _pruned_config({}, "activation", 0, n, args.depth_samples),
    )

    results = {
        "setup": {
            **vars(args),
            "parameters": num_parameters(teacher),
            "groups": teacher.config.mamba_n_groups,
            "frozen_in_kd": list(FROZEN),
            "build": {k: v for k, v in info.items() if k != "layers"},
        },
        "hybrid_loss": held_out_loss(teacher, validation),
        "timing": timing,
        "arms": {},
    }
    for target_name in args.targets.split(","):
        target = TARGETS[target_name]
        for estimator in estimators(target_name):
            seeds = range(args.random_seeds) if estimator == "random" else [0]
            configs = [_pruned_config(target, estimator, seed, len(calibration), args.depth_samples) for seed in seeds]
            # The activation scores serve every width arm; depth arms measure their own (Block Influence).
            configs = [
                (c, scores if c.importance == "activation" and estimator not in DEPTH_ESTIMATORS else None)
                for c in configs
            ]
            arm, student, records = measure_arm(
                teacher, configs, calibration, validation, train, args.kd_steps, args.kd_batch_size, KD_DIR, FROZEN
            )
            arm["layer_types"] = list(student.config.layers_block_type)
            if target_name == "mamba_heads9":
                kept_heads = dict(records[0].mamba_heads)
                arm["kept_heads"] = kept_heads
                arm["groups_left_without_a_head"] = groups_left_without_a_head(kept_heads, teacher.config)
            report_arm(results, target_name, estimator, arm)
    results["wall_seconds"] = time.perf_counter() - started

    atomic_write_json(args.output, results, indent=1)
    plot_arms(results, TARGETS, results["hybrid_loss"], "unpruned hybrid", args.output.replace(".json", ".png"))
    print(render_markdown(results))


if __name__ == "__main__":
    main()
