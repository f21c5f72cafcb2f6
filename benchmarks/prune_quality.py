"""Pruning benchmark on the embedded real models and the offline corpus (SmolLM2-135M, and
Gemma-3-270M as a second real model).

    python benchmarks/prune_quality.py                       # SmolLM2-135M, defaults: ~10 minutes on a 2-core CPU
    python benchmarks/prune_quality.py --model gemma3        # Gemma-3-270M: ~1.5x the time (estimated)
    python benchmarks/prune_quality.py --model all --calibration-samples 256 --validation-samples 64

Measures, in one run and on the same data:
1. held-out LM loss right after pruning (no retraining) with Minitron activation importance vs weight magnitude vs
   random selection, for a width-only and a depth-only target of about the same parameter count; plus the residual
   head merge on/off for the width target;
2. importance-estimation time / plain forward time over the same calibration data (target <= 1.10);
3. pruning peak RSS / model size (target <= 1.1), in a fresh subprocess.

Writes one JSON and one PNG per model, all with the same keys: benchmarks/results/prune_quality.json and .png for
SmolLM2-135M (the file earlier versions wrote), prune_quality_gemma3.json and .png for Gemma-3-270M; prints a table.
"""

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, as_tensors, num_parameters  # noqa: E402

from hf_minitron.io import atomic_write_json  # noqa: E402


# Per model: the embedded alias (`hf_minitron.embedded.resolve_model_path`), the suffix of its results files, and
# targets of about 60% of the parameters. Gemma-3-270M's tied 262k x 640 embedding is 63% of its 268M parameters, so
# its width target has to cut the hidden size hardest (640 -> 448 takes the embedding to 70%; MLP 2048 -> 1280 and 4
# -> 2 query heads of its one KV head bring the total to 60.0%), and no depth target can reach 60% of the total: 18 ->
# 11 layers is 61% of the non-embedding parameters (85% of the total). `memory_layers` is the depth of the
# width + depth prune of the memory probe (~80% of the layers).
MODELS = {
    "smollm2": dict(
        teacher="SmolLM2-135M-Instruct",
        suffix="",
        width=dict(hidden_size=456, intermediate_size=1024, num_attention_heads=6),
        depth=dict(num_hidden_layers=16),
        heads_only=dict(num_attention_heads=6),
        memory_layers=24,
    ),
    "gemma3": dict(
        teacher="Gemma-3-270M",
        suffix="_gemma3",
        width=dict(hidden_size=448, intermediate_size=1280, num_attention_heads=2),
        depth=dict(num_hidden_layers=11),
        heads_only=dict(num_attention_heads=2),
        memory_layers=14,
    ),
}


def _results_path(output: str, model: str) -> Path:
    """`--output` names SmolLM2's file; every other model writes next to it with its suffix
    (prune_quality.json -> prune_quality_gemma3.json), so `--model all` needs one flag."""
    output = Path(output)
    return output.with_name(output.stem + MODELS[model]["suffix"] + output.suffix)


def _load(model: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_minitron.embedded import resolve_model_path

    path = resolve_model_path(model)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _non_embedding_parameters(model) -> int:
    """Parameters outside the input embedding and the LM head (one tensor when they are tied)."""
    embeddings = {model.get_input_embeddings().weight, model.get_output_embeddings().weight}
    return num_parameters(model) - sum(p.numel() for p in embeddings)


def _rss_bytes() -> int:
    """Anonymous resident memory (RssAnon): the memory the process really holds. File-backed pages of a safetensors
    mmap are left out: they are reclaimable page cache, and counting them would charge the checkpoint file twice."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no RssAnon line")


def _total_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the process RSS every millisecond in a thread; `.peak` is the maximum seen."""

    def __enter__(self):
        self.peak, self._stop = _rss_bytes(), False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def memory_probe(model_name: str, calibration_samples: int, seq_length: int) -> dict:
    """Run in a fresh process: RSS attributable to the model during pruning, relative to the model's size."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_minitron import PrunedConfig, prune_model
    from hf_minitron.data import embedded_datasets
    from hf_minitron.embedded import resolve_model_path

    path = resolve_model_path(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    calibration = embedded_datasets(tokenizer, seq_length)["train"].select(range(calibration_samples))
    baseline = _rss_bytes()  # interpreter + libraries, before the model exists
    model = AutoModelForCausalLM.from_pretrained(path)
    # transformers maps the safetensors file: copy every weight into anonymous memory, as for a model that was
    # trained or converted in this process, so the measure is "the model plus what pruning needs".
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    loaded = _rss_bytes()
    config = PrunedConfig(
        calibration_samples=calibration_samples,
        calibration_batch_size=8,
        **MODELS[model_name]["width"],
        num_hidden_layers=MODELS[model_name]["memory_layers"],
        depth_method="block_influence",
    )
    with PeakRSS() as peak:
        prune_model(model, config, calibration, show_progress=False)
    return {
        "model_bytes": model_bytes,
        "baseline_rss_anon": baseline,
        "loaded_rss_anon": loaded,
        "peak_rss_anon": peak.peak,
        "ratio": (peak.peak - baseline) / model_bytes,
        "note": "peak anonymous RSS during importance estimation + pruning, above the pre-model baseline, / model bytes",
    }


@torch.no_grad()
def time_importance_vs_forward(model, calibration, config) -> dict:
    from hf_minitron import estimate_importance
    from hf_minitron.data import shard_batches, take_samples

    batches = shard_batches(take_samples(calibration, config.calibration_samples), config.calibration_batch_size)
    model(**batches[0])  # warm-up
    timings = {"forward": [], "base_forward": [], "importance": []}
    for _ in range(2):  # interleaved repeats, min taken: robust to other load on the machine
        start = time.perf_counter()
        for b in batches:
            model(**b, use_cache=False)
        timings["forward"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for b in batches:
            model.model(**b, use_cache=False)
        timings["base_forward"].append(time.perf_counter() - start)
        start = time.perf_counter()
        scores = estimate_importance(model, calibration, config, show_progress=False)
        timings["importance"].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in timings.items()}
    return {
        **best,
        "importance_over_forward": best["importance"] / best["forward"],
        "importance_over_base_forward": best["importance"] / best["base_forward"],
        "scores": scores,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=[*MODELS, "all"], default="smollm2", help="Embedded model(s) to prune.")
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--validation-samples", type=int, default=32)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--depth-samples", type=int, default=8)
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument(
        "--output",
        default=str(RESULTS / "prune_quality.json"),
        help="SmolLM2's results JSON; other models write next to it with their suffix (prune_quality_gemma3.json). "
        "Each PNG is the JSON's path with .png.",
    )
    parser.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-only", action="store_true", help="Re-measure memory only, updating the JSON.")
    args = parser.parse_args()
    models = list(MODELS) if args.model == "all" else [args.model]
    if args.memory_probe:
        print(json.dumps(memory_probe(args.model, args.calibration_samples, args.seq_length)))
        return

    for model in models:
        path = _results_path(args.output, model)
        if args.memory_only:
            results = json.loads(path.read_text())
            results["memory"] = _run_memory_probe(model, args.seq_length)
        else:
            results = measure(model, args)
        atomic_write_json(path, results)
        _plot(results, path.with_suffix(".png"))
        print(render_markdown(results), flush=True)


def measure(model: str, args) -> dict:
    """Every measurement of the module docstring on one embedded model, as the dict written to its JSON."""
    from hf_minitron import PrunedConfig, prune_model
    from hf_minitron.data import embedded_datasets
    from hf_minitron.pruning.structures.depth import lm_loss

    spec = MODELS[model]
    torch.manual_seed(0)
    teacher, tokenizer = _load(model)
    data = embedded_datasets(tokenizer, args.seq_length)
    calibration = data["train"].select(range(min(args.calibration_samples, len(data["train"]))))
    validation = as_tensors(data["validation"].select(range(min(args.validation_samples, len(data["validation"])))))
    n_params = num_parameters
    base_config = PrunedConfig(calibration_samples=len(calibration), depth_calibration_samples=args.depth_samples)

    print(f"{spec['teacher']}: timing importance estimation against plain forward passes ...", flush=True)
    timing = time_importance_vs_forward(teacher, calibration, base_config)
    scores = timing.pop("scores")

    results = {
        "setup": {
            **{k: v for k, v in vars(args).items() if k not in ("output", "memory_only")},
            "model": model,
            "teacher": spec["teacher"],
            "teacher_parameters": n_params(teacher),
            "teacher_non_embedding_parameters": _non_embedding_parameters(teacher),
        },
        "teacher_loss": lm_loss(teacher, validation),
        "losses": {},
        "timing": timing,
    }

    def evaluate(pruned) -> dict:
        return {
            "loss": lm_loss(pruned, validation),
            "parameters": n_params(pruned),
            "non_embedding_parameters": _non_embedding_parameters(pruned),
            "dropped_layers": pruned.pruning_record.dropped_layers,
        }

    for target_name in ("width", "depth"):
        for method in ("activation", "magnitude", "random"):
            seeds = range(args.random_seeds) if method == "random" else [0]
            rows = []
            for seed in seeds:
                config = PrunedConfig(
                    importance=method,
                    seed=seed,
                    calibration_samples=len(calibration),
                    depth_calibration_samples=args.depth_samples,
                    **spec[target_name],
                )
                pruned = prune_model(
                    copy.deepcopy(teacher),
                    config,
                    calibration,
                    scores=scores if method == "activation" else None,
                    show_progress=False,
                )
                rows.append(evaluate(pruned))
                # `prune_model` binds `save_pretrained` to the pruned model, a reference cycle: without a collection
                # every pruned copy stays alive (one more Gemma-3-270M, ~1 GB, per row; 6.6 GB in a smoke run).
                del pruned
                gc.collect()
            losses = [row["loss"] for row in rows]
            key = f"{target_name}/{method}"
            # The sizes are the same for every seed; the layers dropped are the last seed's.
            results["losses"][key] = {**rows[-1], "loss": sum(losses) / len(losses), "all": losses}
            print(f"{target_name:>5} {method:<10} loss {results['losses'][key]['loss']:.3f}", flush=True)
    targets = {
        "width/activation+head_merge": PrunedConfig(head_merge=True, **spec["width"]),
        "heads_only/activation": PrunedConfig(**spec["heads_only"]),
        "heads_only/activation+head_merge": PrunedConfig(head_merge=True, **spec["heads_only"]),
    }
    for key, config in targets.items():
        pruned = prune_model(copy.deepcopy(teacher), config, scores=scores)
        results["losses"][key] = evaluate(pruned)
        del results["losses"][key]["dropped_layers"], pruned  # width targets drop no layers
        gc.collect()

    results["memory"] = _run_memory_probe(model, args.seq_length)
    return results


def _run_memory_probe(model: str, seq_length: int, repeats: int = 3) -> dict:
    """Fresh processes: glibc's default allocator, and one with a fixed mmap threshold so that freed weight buffers go
    back to the OS at once (what is live, rather than what glibc keeps cached). The peak is sampled by a thread every
    millisecond, so one run can miss or catch a short spike: each variant runs `repeats` times, interleaved, and the
    median and the maximum are reported."""
    print(f"Measuring pruning peak RSS in fresh processes ({repeats} runs per allocator) ...", flush=True)
    variants = (("default_malloc", {}), ("mmap_threshold_1MiB", {"MALLOC_MMAP_THRESHOLD_": "1048576"}))
    runs = {name: [] for name, _ in variants}
    for _ in range(repeats):
        for name, extra_env in variants:
            probe = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--memory-probe",
                    "--model",
                    model,
                    "--calibration-samples",
                    "16",
                    "--seq-length",
                    str(seq_length),
                ],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, **extra_env},
            )
            runs[name].append(json.loads(probe.stdout.strip().splitlines()[-1]))
    out = {}
    for name, results in runs.items():
        ratios = sorted(r["ratio"] for r in results)
        out[name] = {**results[0], "ratios": ratios, "ratio": statistics.median(ratios), "max_ratio": ratios[-1]}
    return out


def _fractions(results: dict, value: dict) -> str:
    """Share of the teacher's parameters, total and without the embeddings: they differ most where the embedding is
    large (Gemma-3-270M's is 63% of the model, so a depth target of 60% of the layers keeps 85% of the total)."""
    setup = results["setup"]
    total = f"{value['parameters'] / setup['teacher_parameters']:.0%}"
    if "non_embedding_parameters" not in value:  # results written before the column existed
        return f"{total} / -"
    return f"{total} / {value['non_embedding_parameters'] / setup['teacher_non_embedding_parameters']:.0%}"


def render_markdown(results: dict) -> str:
    t = results["timing"]
    m = results["memory"]
    setup = results["setup"]
    lines = [
        f"#### {setup['teacher']}",
        "",
        f"Teacher held-out loss: {results['teacher_loss']:.3f} ({setup['teacher_parameters']:,} params)",
        "",
        "| target | selection | parameters | of teacher (total / non-embedding) | held-out loss |",
        "|---|---|---|---|---|",
    ]
    for key, value in results["losses"].items():
        target, method = key.split("/")
        lines.append(
            f"| {target} | {method} | {value['parameters']:,} | {_fractions(results, value)} | {value['loss']:.3f} |"
        )
    lines += [
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| importance time / full-model forward time | {t['importance_over_forward']:.3f} | <= 1.10 |",
        f"| importance time / base-model (no LM head) forward time | {t['importance_over_base_forward']:.3f} | <= 1.10 |",
        f"| pruning peak anon RSS above baseline / model size (glibc default; median, max of runs) "
        f"| {m['default_malloc']['ratio']:.3f}, {m['default_malloc'].get('max_ratio', m['default_malloc']['ratio']):.3f} "
        "| <= 1.1 |",
        f"| same, MALLOC_MMAP_THRESHOLD_=1MiB (freed buffers returned at once) "
        f"| {m['mmap_threshold_1MiB']['ratio']:.3f}, "
        f"{m['mmap_threshold_1MiB'].get('max_ratio', m['mmap_threshold_1MiB']['ratio']):.3f} | <= 1.1 |",
    ]
    return "\n".join(lines)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    colors = {"activation": "tab:green", "magnitude": "tab:orange", "random": "tab:red"}
    for ax, target in zip(axes, ("width", "depth")):
        methods = ["activation", "magnitude", "random"]
        values = [results["losses"][f"{target}/{m}"]["loss"] for m in methods]
        ax.bar(methods, values, color=[colors[m] for m in methods])
        ax.axhline(results["teacher_loss"], color="k", ls="--", label="teacher")
        share = _fractions(results, results["losses"][f"{target}/activation"]).split(" / ")
        ax.set_title(
            f"{results['setup']['teacher']}: {target} to {share[0]} params"
            + (f" ({share[1]} non-emb.)" if share[1] != "-" else "")
        )
        ax.set_ylabel("held-out LM loss (no retraining)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
