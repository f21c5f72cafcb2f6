"""Pruning a real-weight MoE: which expert estimator keeps the model best, before and after a short KD.

    python benchmarks/moe_prune_quality.py                    # default budget, ~20-30 min on a quiet 2-core CPU
    python benchmarks/moe_prune_quality.py --kd-steps 0       # pruning only

The model is the embedded MoE (`hf_minitron.embedded_moe`: SmolLM2-135M-Instruct MoEfied into a stock
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

import argparse
import copy
import json
import statistics
import time

import torch
from _common import RESULTS, as_tensors, held_out_loss, num_parameters, time_importance


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


def distill(student, teacher, train, steps: int, batch_size: int, output_dir) -> None:
    from hf_minitron import DistillationConfig, DistillationTrainer

    args = DistillationConfig(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=2e-5,
        lr_scheduler_type="constant",
        report_to="none",
        save_strategy="no",
        logging_steps=max(1, steps),
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    student.requires_grad_(True)  # a copy of the teacher, which the previous arm's trainer froze in place
    DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train).train()


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
    t = results["timing"]
    lines += [
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| importance pass / base-model forward (min of {len(t['all']['importance'])}) | "
        f"{t['importance_over_base_forward']:.3f} | <= 1.10 |",
    ]
    return "\n".join(lines)


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TARGETS), figsize=(6 * len(TARGETS), 4.5))
    for ax, target in zip(axes, TARGETS):
        arms = {k.split("/")[1]: v for k, v in results["arms"].items() if k.startswith(target + "/")}
        names = list(arms)
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [arms[n]["pruned"] for n in names], width=0.4, label="after pruning")
        if all(arms[n].get("after_kd") is not None for n in names):
            ax.bar([i + 0.2 for i in x], [arms[n]["after_kd"] for n in names], width=0.4, label="after KD")
        ax.axhline(results["moe_loss"], color="black", linestyle="--", label="unpruned MoE")
        ax.set_xticks(list(x), names, rotation=20)
        ax.set_title(target)
        ax.set_ylabel("held-out loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--validation-samples", type=int, default=16)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--kd-steps", type=int, default=10)
    parser.add_argument("--kd-batch-size", type=int, default=2)
    parser.add_argument("--random-seeds", type=int, default=2)
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(RESULTS / "moe_prune_quality.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    from hf_minitron import count_parameters, prune_model
    from hf_minitron.data import embedded_datasets
    from hf_minitron.embedded_moe import embedded_moe_info, load_embedded_moe

    teacher, tokenizer = load_embedded_moe()
    teacher.eval()
    info = embedded_moe_info()
    data = embedded_datasets(tokenizer, args.seq_length)
    calibration = data["train"].select(range(args.calibration_samples))
    train = data["train"].select(range(args.calibration_samples, len(data["train"])))
    validation = as_tensors(data["validation"].select(range(min(args.validation_samples, len(data["validation"])))))

    print("Timing the importance pass against plain forward passes ...", flush=True)
    base_config = _pruned_config({}, "output_norm", 0, len(calibration))
    timing, scores = time_importance(teacher, calibration, base_config, args.timing_repeats)
    print(f"importance / base forward: {timing['importance_over_base_forward']:.3f}", flush=True)

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
            pruned_losses, kd_losses = [], []
            for seed in seeds:
                config = _pruned_config(target, estimator, seed, len(calibration))
                given = scores if config.importance == "activation" else None
                student = prune_model(copy.deepcopy(teacher), config, calibration, scores=given, show_progress=False)
                pruned_losses.append(held_out_loss(student, validation))
                if args.kd_steps:
                    distill(student, teacher, train, args.kd_steps, args.kd_batch_size, RESULTS / ".moe_kd")
                    kd_losses.append(held_out_loss(student, validation))
            arm = {
                "pruned": statistics.mean(pruned_losses),
                "pruned_all": pruned_losses,
                "after_kd": statistics.mean(kd_losses) if kd_losses else None,
                "after_kd_all": kd_losses,
                "parameters": count_parameters(teacher.config, config),
                "active": count_parameters(teacher.config, config, "active"),
            }
            results["arms"][f"{target_name}/{estimator}"] = arm
            after = "-" if arm["after_kd"] is None else f"{arm['after_kd']:.3f}"
            print(f"{target_name:>9} {estimator:<12} pruned {arm['pruned']:.3f}  after KD {after}", flush=True)
    results["wall_seconds"] = time.perf_counter() - started

    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1)
    plot(results, args.output.replace(".json", ".png"))
    print(render_markdown(results))


if __name__ == "__main__":
    main()
