"""Pruning a real-weight hybrid Mamba2-attention model: which estimator keeps it best, before and after a short KD.

    python benchmarks/hybrid_prune_quality.py                  # default budget (estimated ~25-30 min, 2-core CPU)
    python benchmarks/hybrid_prune_quality.py --kd-steps 0     # pruning only

The model is the embedded hybrid (`hf_minitron.embedded_hybrid`: SmolLM2-135M-Instruct converted into a stock
`BambaForCausalLM`, attention in 10 of 30 layers, Mamba2 mixers of 18 heads x 64 channels in 9 B/C groups in the
other 20, a SwiGLU MLP of 1536 in every layer). Targets, each a valid Bamba shape (heads x head_dim a multiple of the
hidden size):

* `mamba_heads9`: 18 -> 9 Mamba heads per layer, by `activation` (Minitron-SSM's group-aware selection: every B/C
  group keeps one of its two heads), `group_blind` (the same scores, the top 9 heads overall, the paper's naive
  baseline), `magnitude` and `random` (mean over seeds);
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
from the unpruned hybrid (same batches, same steps for every arm). One activation importance pass serves every
activation-based width arm; it is timed against plain forward passes of the base model on the same batches
(interleaved repeats, min), the target being <= 1.10x.

Writes `benchmarks/results/hybrid_prune_quality.{json,png}` and prints a Markdown table.
"""

import argparse
import copy
import json
import statistics
import time

import torch
from _common import RESULTS, as_tensors, held_out_loss, num_parameters, time_importance


TARGETS = {
    "mamba_heads9": {"mamba_num_heads": 9},
    "mamba_head_dim32": {"mamba_head_dim": 32},
    "ffn1024": {"intermediate_size": 1024},
    "hidden384": {"hidden_size": 384},
    "depth24": {"num_hidden_layers": 24},
    "drop6_mamba": {"num_layers_by_type": {"mamba": 14}},
    "drop6_attention": {"num_layers_by_type": {"attention": 4}},
}
WIDTH_ESTIMATORS = ("activation", "magnitude", "random")
HEAD_ESTIMATORS = ("activation", "group_blind", "magnitude", "random")
DEPTH_ESTIMATORS = ("contiguous", "block_influence")


def estimators(target_name: str) -> tuple[str, ...]:
    if target_name == "mamba_heads9":
        return HEAD_ESTIMATORS
    if target_name == "depth24":
        return DEPTH_ESTIMATORS
    if target_name.startswith("drop6"):
        return ("block_influence",)
    return WIDTH_ESTIMATORS


def _pruned_config(target: dict, estimator: str, seed: int, calibration_samples: int, depth_samples: int):
    from hf_minitron import PrunedConfig

    if estimator == "group_blind":
        method = {"importance": "activation", "mamba_group_aware": False}
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
        lines.append(f"| {target} | {estimator} | {arm['parameters']:,} | {arm['pruned']:.3f} | {after} |")
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

    targets = [t for t in TARGETS if any(k.startswith(t + "/") for k in results["arms"])]
    columns = 4
    rows = -(-len(targets) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(targets) :]:
        ax.axis("off")
    for ax, target in zip(axes.flat, targets):
        arms = {k.split("/")[1]: v for k, v in results["arms"].items() if k.startswith(target + "/")}
        names = list(arms)
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [arms[n]["pruned"] for n in names], width=0.4, label="after pruning")
        if all(arms[n].get("after_kd") is not None for n in names):
            ax.bar([i + 0.2 for i in x], [arms[n]["after_kd"] for n in names], width=0.4, label="after KD")
        ax.axhline(results["hybrid_loss"], color="black", linestyle="--", label="unpruned hybrid")
        ax.set_xticks(list(x), names, rotation=20)
        ax.set_title(target)
        ax.set_ylabel("held-out loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--depth-samples", type=int, default=4, help="samples that score each depth candidate")
    parser.add_argument("--validation-samples", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--kd-steps", type=int, default=3)
    parser.add_argument("--kd-batch-size", type=int, default=2)
    parser.add_argument("--random-seeds", type=int, default=1)
    parser.add_argument("--timing-repeats", type=int, default=2)
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of the targets")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(RESULTS / "hybrid_prune_quality.json"))
    args = parser.parse_args()
    unknown = set(args.targets.split(",")) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}: choose from {', '.join(TARGETS)}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    from hf_minitron import prune_model
    from hf_minitron.data import embedded_datasets
    from hf_minitron.embedded_hybrid import embedded_hybrid_info, load_embedded_hybrid

    teacher, tokenizer = load_embedded_hybrid()
    teacher.eval()
    info = embedded_hybrid_info()
    data = embedded_datasets(tokenizer, args.seq_length)
    calibration = data["train"].select(range(args.calibration_samples))
    train = data["train"].select(range(args.calibration_samples, len(data["train"])))
    validation = as_tensors(data["validation"].select(range(min(args.validation_samples, len(data["validation"])))))

    print("Timing the importance pass against plain forward passes ...", flush=True)
    base_config = _pruned_config({}, "activation", 0, len(calibration), args.depth_samples)
    timing, scores = time_importance(teacher, calibration, base_config, args.timing_repeats)
    print(f"importance / base forward: {timing['importance_over_base_forward']:.3f}", flush=True)

    results = {
        "setup": {
            **vars(args),
            "parameters": num_parameters(teacher),
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
            pruned_losses, kd_losses, arm_started = [], [], time.perf_counter()
            for seed in seeds:
                config = _pruned_config(target, estimator, seed, len(calibration), args.depth_samples)
                # The activation scores serve every width arm; depth arms measure their own (Block Influence).
                given = scores if config.importance == "activation" and estimator not in DEPTH_ESTIMATORS else None
                student = prune_model(copy.deepcopy(teacher), config, calibration, scores=given, show_progress=False)
                pruned_losses.append(held_out_loss(student, validation))
                if args.kd_steps:
                    distill(student, teacher, train, args.kd_steps, args.kd_batch_size, RESULTS / ".hybrid_kd")
                    kd_losses.append(held_out_loss(student, validation))
            arm = {
                "pruned": statistics.mean(pruned_losses),
                "pruned_all": pruned_losses,
                "after_kd": statistics.mean(kd_losses) if kd_losses else None,
                "after_kd_all": kd_losses,
                "parameters": num_parameters(student),
                "layer_types": list(student.config.layers_block_type),
                "seconds": round(time.perf_counter() - arm_started, 1),
            }
            results["arms"][f"{target_name}/{estimator}"] = arm
            after = "-" if arm["after_kd"] is None else f"{arm['after_kd']:.3f}"
            print(
                f"{target_name:>16} {estimator:<16} pruned {arm['pruned']:.3f}  after KD {after}  "
                f"({arm['seconds']:.0f} s)",
                flush=True,
            )
    results["wall_seconds"] = time.perf_counter() - started

    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1)
    plot(results, args.output.replace(".json", ".png"))
    print(render_markdown(results))


if __name__ == "__main__":
    main()
