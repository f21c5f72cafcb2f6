"""Pruning a real-weight Qwen3.5 (Gated DeltaNet + gated attention): which estimator keeps it best, before and after a
short KD.

    python benchmarks/qwen35_prune_quality.py                  # every target, 10 KD steps (~50 min on 1 busy thread)
    python benchmarks/qwen35_prune_quality.py --kd-steps 0     # pruning only
    # the committed results (~25 min): 5 KD steps, no unpruned control (run separately: 10 steps left it unchanged)
    python benchmarks/qwen35_prune_quality.py --kd-steps 5 --timing-repeats 1 \
        --targets deltanet_values9,deltanet_keys6,attention_heads6

On a 2-core CPU shared with other jobs one KD step (teacher and student forward, student backward, batch 2 x 128
tokens) takes ~18 s: transformers runs the gated delta rule with its PyTorch fallback there.

The model is the embedded Qwen3.5 (`hf_minitron.embedded.qwen35`: SmolLM2-135M-Instruct converted into a stock
`Qwen3_5ForCausalLM`, gated attention with q/k norms in 10 of 30 layers, Gated DeltaNet mixers of 9 key heads and 18
value heads of 64 in the other 20, a SwiGLU MLP of 1536 in every layer). Targets, each a valid Qwen3.5 shape:

* `unpruned`: the model itself through the same KD steps, a check of the KD path: its KD gradient is zero, so its loss
  must not move;
* `deltanet_values9`: 18 -> 9 DeltaNet value heads per layer (`linear_num_value_heads`), one kept in each key head;
  the embedded model's two value heads per key head are the fast and the slow decay of one attention head;
* `deltanet_keys6`: 9 -> 6 DeltaNet key heads (`linear_num_key_heads`) with their value heads (18 -> 12). Halving is
  not a valid target: 9 key heads do not halve, and 4 key heads would need 4.5 value heads each;
* `attention_heads6`: 9 -> 6 query heads per gated attention layer (`num_attention_heads`; 2 of the 3 in each KV
  group, the 3 KV heads kept), the gate rows going with their heads;

each by `activation` (the paper's estimator), `magnitude` (weight norms) and `random` (mean over `--random-seeds`
seeds). Every arm is evaluated by held-out loss right after pruning and after `--kd-steps` steps of
`DistillationTrainer` from the unpruned model (same batches, same steps, LR 2e-5, for every arm). One activation
importance pass serves every activation arm; it is timed against plain forward passes of the base model on the same
batches (interleaved repeats, min), the target being <= 1.10x.

Writes `benchmarks/results/qwen35_prune_quality.{json,png}` and prints a Markdown table.
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
    "unpruned": {},  # the control: what the same KD steps do to the model itself
    "deltanet_values9": {"linear_num_value_heads": 9},
    "deltanet_keys6": {"linear_num_key_heads": 6, "linear_num_value_heads": 12},
    "attention_heads6": {"num_attention_heads": 6},
}
KD_DIR = RESULTS / ".qwen35_kd"
ESTIMATORS = ("activation", "magnitude", "random")


def _pruned_config(target: dict, estimator: str, seed: int, calibration_samples: int):
    from hf_minitron import PrunedConfig

    method = {} if estimator == "none" else {"importance": estimator}
    return PrunedConfig(**target, **method, seed=seed, calibration_samples=calibration_samples)


def render_markdown(results: dict) -> str:
    setup = results["setup"]
    build = setup["build"]
    lines = [
        f"Embedded Qwen3.5 (SmolLM2-135M converted into `qwen3_5_text`: gated attention in "
        f"{len(build['attention_layers'])} of 30 layers, Gated DeltaNet in the rest; {setup['parameters']:,} "
        f"parameters): held-out loss {results['base_loss']:.3f} at {setup['seq_length']} tokens (SmolLM2 "
        f"{build['teacher_loss']:.3f} and the converted model {build['qwen35_loss']:.3f} at the build's "
        f"{build['recipe']['seq_length']} tokens).",
        "",
        f"| target | estimator | parameters | loss after pruning | loss after {setup['kd_steps']} KD steps |",
        "|---|---|---|---|---|",
    ]
    for name, arm in results["arms"].items():
        target, estimator = name.split("/")
        if len(arm["pruned_all"]) > 1:
            estimator += f" (mean of {len(arm['pruned_all'])} seeds)"
        after = "-" if arm.get("after_kd") is None else f"{arm['after_kd']:.3f}"
        lines.append(f"| {target} | {estimator} | {arm['parameters']:,} | {arm['pruned']:.3f} | {after} |")
    lines += timing_rows(results["timing"])
    return "\n".join(lines)


def main():
    parser = arm_arguments(__doc__, "qwen35_prune_quality.json", TARGETS, threads=1)
    args = parse_arm_arguments(parser, TARGETS)
    started = time.perf_counter()

    from hf_minitron.embedded.qwen35 import embedded_qwen35_info, load_embedded_qwen35
    from hf_minitron.io import atomic_write_json

    teacher, info, calibration, train, validation, timing, scores = load_and_time(
        load_embedded_qwen35, embedded_qwen35_info, args, lambda n: _pruned_config({}, "activation", 0, n)
    )

    results = {
        "setup": {
            **vars(args),
            "parameters": num_parameters(teacher),
            "build": {k: v for k, v in info.items() if k != "layers"},
        },
        "base_loss": held_out_loss(teacher, validation),
        "timing": timing,
        "arms": {},
    }
    for target_name in args.targets.split(","):
        target = TARGETS[target_name]
        for estimator in ("none",) if target_name == "unpruned" else ESTIMATORS:
            seeds = range(args.random_seeds) if estimator == "random" else [0]
            configs = [_pruned_config(target, estimator, seed, len(calibration)) for seed in seeds]
            configs = [(c, scores if c.importance == "activation" else None) for c in configs]
            arm, _, records = measure_arm(
                teacher, configs, calibration, validation, train, args.kd_steps, args.kd_batch_size, KD_DIR
            )
            if target_name.startswith("deltanet"):
                arm["kept_value_heads"] = dict(records[0].deltanet_value_heads)
                arm["kept_key_heads"] = dict(records[0].deltanet_key_heads)
            elif target_name.startswith("attention"):
                arm["kept_heads"] = dict(records[0].heads)
            report_arm(results, target_name, estimator, arm)
    results["wall_seconds"] = time.perf_counter() - started

    atomic_write_json(args.output, results, indent=1)
    plot_arms(results, TARGETS, results["base_loss"], "unpruned Qwen3.5", args.output.replace(".json", ".png"))
    print(render_markdown(results))


if __name__ == "__main__":
    main()
