"""Per-layer MLP widths on the embedded SmolLM2-135M: the same neuron budget, uniform or shared out by importance.

    OMP_NUM_THREADS=1 python benchmarks/per_layer_widths.py    # about 10 minutes on the shared 2-core CPU

One activation importance pass (64 calibration samples of 128 tokens), then, for each MLP target N (1024, 768 and 512
of SmolLM2's 1536 neurons per layer), the held-out LM loss right after pruning (no retraining) of:
- `uniform`: `prune_model(PrunedConfig(intermediate_size=N))`, every layer N neurons (the papers);
- `global`: the same N x 30 neurons shared out by `mlp_neurons.allocate_widths`, as `mlp_width_allocation="global"`
  does (each layer's scores divided by their mean, widths multiples of 8, at least N / 4);
- `global_raw`: the same without dividing by the layer's mean (the ablation behind the normalisation).

Llama's modelling builds every layer's MLP from one `intermediate_size`, so `prune_model` refuses the global allocation
for it (its output would not reload): the two global students are sliced in memory here, with the same scores and the
same slicing as `prune_model`, and never saved. The three students of a target have the same parameter count (checked).
Writes benchmarks/results/per_layer_widths.{json,png}; prints a table.
"""

import argparse
import copy
import gc
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, as_tensors, held_out_loss, load_teacher_and_corpus, num_parameters  # noqa: E402

from hf_minitron.io import atomic_write_json  # noqa: E402


ARMS = ("uniform", "global", "global_raw")


def prune_global(teacher, scores, width: int, normalise: bool, config):
    """A copy of `teacher` whose MLP widths share `width x layers` neurons by importance (in memory: see the module
    docstring), and those widths."""
    from hf_minitron.architectures import get_architecture, get_decoder_layers
    from hf_minitron.pruning.structures import mlp_neurons
    from hf_minitron.pruning.structures.slicing import topk_sorted

    student = copy.deepcopy(teacher)
    spec = get_architecture(student.config)
    layers = get_decoder_layers(student)
    source = teacher.config.intermediate_size
    neuron_scores = mlp_neurons.scores(scores, config.batch_aggregation)
    multiple = config.mlp_width_multiple
    widths = mlp_neurons.allocate_widths(
        list(neuron_scores),
        width * len(layers),
        [source] * len(layers),
        multiple,
        max(multiple, int(config.mlp_width_floor * width) // multiple * multiple),
        normalise=normalise,
    )
    for layer, layer_width, row in zip(layers, widths, neuron_scores):
        if layer_width < source:
            mlp_neurons.slice_mlp(getattr(layer, spec.mlp), spec, source, topk_sorted(row, layer_width))
    return student, widths


def measure(args) -> dict:
    from hf_minitron import PrunedConfig, estimate_importance, prune_model

    torch.manual_seed(0)
    teacher, _, data = load_teacher_and_corpus(args.seq_length)
    calibration = data["train"].select(range(min(args.calibration_samples, len(data["train"]))))
    validation = as_tensors(data["validation"].select(range(min(args.validation_samples, len(data["validation"])))))
    config = PrunedConfig(calibration_samples=len(calibration))
    start = time.perf_counter()
    scores = estimate_importance(teacher, calibration, config, depth=False, show_progress=False)
    results = {
        "setup": {**vars(args), "teacher": "SmolLM2-135M-Instruct", "teacher_parameters": num_parameters(teacher)},
        "importance_seconds": time.perf_counter() - start,
        "teacher_loss": held_out_loss(teacher, validation),
        "targets": {},
    }
    print(f"teacher loss {results['teacher_loss']:.3f}", flush=True)
    for width in args.widths:
        row = {}
        uniform = prune_model(copy.deepcopy(teacher), PrunedConfig(intermediate_size=width), scores=scores)
        row["uniform"] = {
            "loss": held_out_loss(uniform, validation),
            "parameters": num_parameters(uniform),
            "widths": [width] * teacher.config.num_hidden_layers,
        }
        del uniform
        gc.collect()  # prune_model's save_pretrained holds the model in a reference cycle
        for arm, normalise in (("global", True), ("global_raw", False)):
            student, widths = prune_global(teacher, scores, width, normalise, config)
            row[arm] = {
                "loss": held_out_loss(student, validation),
                "parameters": num_parameters(student),
                "widths": widths,
            }
            del student
        results["targets"][str(width)] = row
        print(
            f"N={width}: " + ", ".join(f"{arm} {row[arm]['loss']:.3f} ({row[arm]['parameters']:,})" for arm in ARMS),
            flush=True,
        )
    return results


def render_markdown(results: dict) -> str:
    lines = [
        f"SmolLM2-135M, teacher held-out loss {results['teacher_loss']:.3f}; loss right after pruning the MLPs, no "
        "retraining",
        "",
        "| MLP target N (of 1536) | parameters | uniform | global | global, raw scores | global widths (min-max) |",
        "|---|---|---|---|---|---|",
    ]
    for width, row in results["targets"].items():
        widths = row["global"]["widths"]
        lines.append(
            f"| {width} | {row['uniform']['parameters']:,} | "
            + " | ".join(f"{row[arm]['loss']:.3f}" for arm in ARMS)
            + f" | {min(widths)}-{max(widths)} |"
        )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(results["targets"])
    fig, (losses, widths) = plt.subplots(1, 2, figsize=(11, 4))
    for arm in ARMS:
        losses.plot([int(t) for t in targets], [results["targets"][t][arm]["loss"] for t in targets], "o-", label=arm)
    losses.axhline(results["teacher_loss"], color="gray", linestyle="--", label="teacher")
    losses.set(
        xlabel="MLP target N (neurons per layer on average)", ylabel="held-out loss", title="Loss after pruning"
    )
    losses.legend()
    for t in targets:
        widths.plot(results["targets"][t]["global"]["widths"], "o-", markersize=3, label=f"global, N={t}")
    widths.set(xlabel="layer", ylabel="MLP width", title="Widths chosen by the global allocation")
    widths.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[1024, 768, 512])
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--validation-samples", type=int, default=32)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--output", default=str(RESULTS / "per_layer_widths.json"))
    args = parser.parse_args()
    results = measure(args)
    for row in results["targets"].values():  # the same budget in every arm
        assert len({row[arm]["parameters"] for arm in ARMS}) == 1, row
    output = Path(args.output)
    atomic_write_json(output, results)
    plot(results, output.with_suffix(".png"))
    print(render_markdown(results), flush=True)


if __name__ == "__main__":
    main()
