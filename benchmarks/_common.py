"""Helpers shared by the benchmark scripts: the embedded teacher, the offline corpus, the held-out loss, and the timed
importance pass, short KD and per-target plot of the MoE and hybrid pruning benchmarks."""

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch


RESULTS = Path(__file__).parent / "results"


def num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def as_tensors(rows) -> list[dict]:
    """Dataset rows as `{"input_ids", "attention_mask"}` tensors, the sample format of `hf_minitron.depth.lm_loss`."""
    return [
        {"input_ids": torch.tensor(r["input_ids"]), "attention_mask": torch.tensor(r["attention_mask"])} for r in rows
    ]


def load_teacher_and_corpus(seq_length: int, max_train_samples: int | None = None):
    """The embedded SmolLM2-135M teacher, its tokenizer and the packed train/validation splits of the offline corpus."""
    from hf_minitron.data import embedded_datasets
    from hf_minitron.embedded import load_default_teacher

    teacher, tokenizer = load_default_teacher()
    teacher.eval()
    return teacher, tokenizer, embedded_datasets(tokenizer, seq_length, max_train_samples)


def held_out_loss(model, validation: list[dict], batch_size: int = 8) -> float:
    """Mean next-token cross-entropy on `validation`, in eval mode (the model's mode is restored)."""
    from hf_minitron.pruning.structures.depth import lm_loss

    was_training = model.training
    model.eval()
    try:
        return lm_loss(model, validation, batch_size)
    finally:
        model.train(was_training)


def time_importance(model, calibration, config, repeats: int) -> dict:
    """One activation importance pass (the MoE and hybrid benchmarks), timed against plain forwards of the base model
    on the same batches: interleaved repeats, the min of each (`importance_over_base_forward`). Each round also gives
    its own ratio, the two runs in alternating order (forward first, then the pass first), whose median
    (`paired_median`) a machine whose speed drifts during the run biases less than the min of each. Returns
    `(timing, scores)`."""
    from hf_minitron import estimate_importance
    from hf_minitron.data import shard_batches, take_samples

    batches = shard_batches(take_samples(calibration, config.calibration_samples), config.calibration_batch_size)
    base = model.model
    with torch.no_grad():
        base(**batches[0], use_cache=False)  # warm-up
    timings = {"base_forward": [], "importance": []}
    scores = None

    def forward():
        with torch.no_grad():
            for batch in batches:
                base(**batch, use_cache=False)

    def importance():
        nonlocal scores
        scores = estimate_importance(model, calibration, config, depth=False, show_progress=False)

    for index in range(repeats):
        runs = [("base_forward", forward), ("importance", importance)]
        for name, run in runs if index % 2 == 0 else runs[::-1]:
            start = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in timings.items()}
    paired = [i / f for i, f in zip(timings["importance"], timings["base_forward"])]
    return {
        **best,
        "all": timings,
        "importance_over_base_forward": best["importance"] / best["base_forward"],
        "paired_median": statistics.median(paired),
    }, scores


def short_kd(student, teacher, train, steps: int, batch_size: int, output_dir, frozen: tuple[str, ...] = ()) -> None:
    """`steps` steps of `DistillationTrainer` (LR 2e-5, constant, seed 0): the same batches in the same order for every
    arm of the MoE and hybrid benchmarks. Parameters whose name contains one of `frozen` are not trained."""
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
    for name, parameter in student.named_parameters():
        if any(part in name for part in frozen):
            parameter.requires_grad_(False)
    DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train).train()


def timing_rows(timing: dict) -> list[str]:
    """The Markdown table of `time_importance`'s ratio against its target."""
    return [
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| importance pass / base-model forward (min of {len(timing['all']['importance'])}) | "
        f"{timing['importance_over_base_forward']:.3f} | <= 1.10 |",
        *(
            [f"| the same, median of the per-round ratios (alternating order) | {timing['paired_median']:.3f} | - |"]
            if "paired_median" in timing
            else []
        ),
    ]


def plot_arms(results: dict, targets, baseline: float, baseline_label: str, path, columns: int = 4) -> None:
    """One panel per target: each estimator's held-out loss after pruning and (where measured) after KD, against the
    unpruned model's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = [t for t in targets if any(k.startswith(t + "/") for k in results["arms"])]
    columns = min(columns, len(targets))
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
        ax.axhline(baseline, color="black", linestyle="--", label=baseline_label)
        ax.set_xticks(list(x), names, rotation=20)
        ax.set_title(target)
        ax.set_ylabel("held-out loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def split_calibration(data, calibration_samples: int, validation_samples: int):
    """`(calibration, train, validation)`: the first train samples calibrate, the rest train the KD steps, and the
    first validation samples (as tensors) are held out."""
    from hf_minitron.embedded import validation_rows

    calibration = data["train"].select(range(calibration_samples))
    train = data["train"].select(range(calibration_samples, len(data["train"])))
    return calibration, train, validation_rows(data["validation"], validation_samples)


def measure_arm(
    teacher, configs, calibration, validation, train, kd_steps: int, kd_batch_size: int, kd_dir, frozen=()
):
    """Prunes a copy of `teacher` with each `(config, scores)` of `configs` (one per seed; precomputed importance
    `scores` or `None`), measures its held-out loss, then again after `kd_steps` of `short_kd` (`frozen` parameters
    not trained). Returns `(arm, student, records)`: the means and per-seed losses, the last student's parameters and
    the arm's seconds; the last student and every student's `pruning_record`."""
    from hf_minitron import prune_model

    started = time.perf_counter()
    pruned, after_kd, records, student = [], [], [], None
    for config, given in configs:
        student = prune_model(copy.deepcopy(teacher), config, calibration, scores=given, show_progress=False)
        records.append(student.pruning_record)
        pruned.append(held_out_loss(student, validation))
        if kd_steps:
            short_kd(student, teacher, train, kd_steps, kd_batch_size, kd_dir, frozen)
            after_kd.append(held_out_loss(student, validation))
    arm = {
        "pruned": statistics.mean(pruned),
        "pruned_all": pruned,
        "after_kd": statistics.mean(after_kd) if after_kd else None,
        "after_kd_all": after_kd,
        "parameters": num_parameters(student),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return arm, student, records


def report_arm(results: dict, target_name: str, estimator: str, arm: dict) -> None:
    """Records `arm` under `target/estimator` in `results["arms"]` and prints its line."""
    results["arms"][f"{target_name}/{estimator}"] = arm
    after = "-" if arm["after_kd"] is None else f"{arm['after_kd']:.3f}"
    print(
        f"{target_name:>16} {estimator:<16} pruned {arm['pruned']:.3f}  after KD {after}  ({arm['seconds']:.0f} s)",
        flush=True,
    )


ARM_DEFAULTS = dict(
    calibration_samples=16, validation_samples=8, seq_length=128, kd_steps=10, kd_batch_size=2, random_seeds=2,
    timing_repeats=2, threads=2,
)  # fmt: skip


def arm_arguments(doc: str, output: str, targets=None, **defaults) -> argparse.ArgumentParser:
    """The options every pruning-quality benchmark takes (`ARM_DEFAULTS`, overridden by `defaults`), `--targets` when
    the script has named `targets`, and `--output` (`output` under `RESULTS`); a script adds its own before parsing
    with [`parse_arm_arguments`]."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in {**ARM_DEFAULTS, **defaults}.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=value)
    if targets is not None:
        parser.add_argument("--targets", default=",".join(targets), help="comma-separated subset of the targets")
    parser.add_argument("--output", default=str(RESULTS / output))
    return parser


def parse_arm_arguments(parser: argparse.ArgumentParser, targets=None):
    """The parsed options, the targets checked against `targets`, the threads set."""
    args = parser.parse_args()
    if targets is not None:
        unknown = set(args.targets.split(",")) - set(targets)
        if unknown:
            parser.error(f"unknown targets {sorted(unknown)}: choose from {', '.join(targets)}")
    torch.set_num_threads(args.threads)
    return args


def load_and_time(load, load_info, args, base_config):
    """The embedded model of `load()` (eval mode) and its `load_info()`, the corpus split as `split_calibration` does,
    and one importance pass timed against plain forwards (`time_importance`, `base_config(calibration samples)`).
    Returns `(model, info, calibration, train, validation, timing, scores)`."""
    from hf_minitron.data import embedded_datasets

    model, tokenizer = load()
    model.eval()
    info = load_info()
    data = embedded_datasets(tokenizer, args.seq_length)
    calibration, train, validation = split_calibration(data, args.calibration_samples, args.validation_samples)
    print("Timing the importance pass against plain forward passes ...", flush=True)
    timing, scores = time_importance(model, calibration, base_config(len(calibration)), args.timing_repeats)
    print(f"importance / base forward: {timing['importance_over_base_forward']:.3f}", flush=True)
    return model, info, calibration, train, validation, timing, scores
