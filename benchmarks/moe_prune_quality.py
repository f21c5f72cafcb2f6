"""Pruning a real-weight MoE: which expert estimator keeps the model best, before and after a short KD.

    python benchmarks/moe_prune_quality.py                    # default budget, ~20-30 min on a quiet 2-core CPU
    python benchmarks/moe_prune_quality.py --kd-steps 0       # pruning only

The model is the embedded MoE (`hf_minitron.embedded.moe`: SmolLM2-135M-Instruct MoEfied into a stock
`Qwen2MoeForCausalLM`, 8 routed experts of 128 neurons, top-2, plus a 512-neuron shared expert). Targets:

* `experts6` / `experts4`: 8 -> 6 / 4 routed experts per layer, chosen by each estimator: `output_norm` (mean L2
  norm of the expert's output over its routed tokens, ModelOpt), `reap` (mean router weight x output norm), `frequency`
  (routed tokens), `magnitude` (weight norm), `random` (mean over seeds);
* `width64`: every expert's width 128 -> 64 (the neurons by activation, magnitude or random).

Every arm is evaluated by held-out loss right after pruning and after `--kd-steps` steps of `DistillationTrainer`
from the unpruned MoE (same batches, same steps for every arm). One activation importance pass serves every
activation-based arm; it is timed against plain forward passes of the base model on the same batches
(interleaved repeats, min), the target being <= 1.10x.

Writes `benchmarks/results/moe_prune_quality.{json,png}` and prints a Markdown table.
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


KD_DIR = RESULTS / ".moe_kd"
TARGETS = {"experts6": {"num_experts": 6}, "experts4": {"num_experts": 4}, "width64": {"moe_intermediate_size": 64}}
EXPERT_ESTIMATORS = ("output_norm", "reap", "frequency", "magnitude", "random")
WIDTH_ESTIMATORS = ("activation", "magnitude", "random")


def _pruned_config(target: dict, estimator: str, seed: int, calibration_samples: int):
    from hf_minitron import PrunedConfig

    if estimator in ("output_norm", "reap", "frequency"):
        method = {"importance": "activation", "expert_importance": estimator}
    else:
        method = {"importance": estimator}
    return PrunedConfig(**target, **method, seed=seed, calibration_samples=calibration_samples)


def render_markdown(results: dict) -> str:
    setup = results["setup"]
    lines = [
        f"Embedded MoE (SmolLM2-135M MoEfied, {setup['parameters']:,} parameters): held-out loss "
        f"{results['moe_loss']:.3f}; dense teacher {setup['teacher_loss']:.3f}.",
        "",
        f"| target | estimator | parameters | active | loss after pruning | loss after {setup['kd_steps']} KD steps |",
        "|---|---|---|---|---|---|",
    ]
    for name, arm in results["arms"].items():
        target, estimator = name.split("/")
        after = "-" if arm.get("after_kd") is None else f"{arm['after_kd']:.3f}"
        lines.append(
            f"| {target} | {estimator} | {arm['parameters']:,} | {arm['active']:,} | {arm['pruned']:.3f} | {after} |"
        )
    lines += timing_rows(results["timing"])
    return "\n".join(lines)


def main():
    parser = arm_arguments(
        __doc__, "moe_prune_quality.json", calibration_samples=32, validation_samples=16, timing_repeats=3
    )
    args = parse_arm_arguments(parser)
    started = time.perf_counter()

    from hf_minitron import count_parameters
    from hf_minitron.embedded.moe import embedded_moe_info, load_embedded_moe

    teacher, info, calibration, train, validation, timing, scores = load_and_time(
        load_embedded_moe, embedded_moe_info, args, lambda n: _pruned_config({}, "output_norm", 0, n)
    )

    results = {
        "setup": {
            **vars(args),
            "parameters": num_parameters(teacher),
            "teacher_loss": info.get("teacher_loss"),
            "build": {k: v for k, v in info.items() if k != "layers"},
        },
        "moe_loss": held_out_loss(teacher, validation),
        "timing": timing,
        "arms": {},
    }
    for target_name, target in TARGETS.items():
        estimators = WIDTH_ESTIMATORS if target_name.startswith("width") else EXPERT_ESTIMATORS
        for estimator in estimators:
            seeds = range(args.random_seeds) if estimator == "random" else [0]
            configs = [_pruned_config(target, estimator, seed, len(calibration)) for seed in seeds]
            configs = [(c, scores if c.importance == "activation" else None) for c in configs]
            arm, _, _ = measure_arm(
                teacher, configs, calibration, validation, train, args.kd_steps, args.kd_batch_size, KD_DIR
            )
            config = configs[0][0]
            arm["parameters"] = count_parameters(teacher.config, config)
            arm["active"] = count_parameters(teacher.config, config, "active")
            report_arm(results, target_name, estimator, arm)
    results["wall_seconds"] = time.perf_counter() - started

    from hf_minitron.io import atomic_write_json

    atomic_write_json(args.output, results, indent=1)
    plot_arms(
        results,
        TARGETS,
        results["moe_loss"],
        "unpruned MoE",
        args.output.replace(".json", ".png"),
        columns=len(TARGETS),
    )
    print(render_markdown(results))


if __name__ == "__main__":
    main()
