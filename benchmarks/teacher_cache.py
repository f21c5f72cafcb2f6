"""Offline teacher: distillation from a teacher cache vs a live teacher, on SmolLM2-135M.

Teacher: the embedded SmolLM2-135M-Instruct; student: the teacher pruned to hidden 384 / MLP 1024 / 6 heads (as in
`distill_throughput.py`); data: the embedded corpus packed to `--seq-length` tokens. Caches: `hidden` in fp32 and
bf16, `topk` with k = 8, 32, 128, 512 (fp32 log-probabilities).

    python benchmarks/teacher_cache.py            # the default budget, ~15 min on a 2-core CPU
    python benchmarks/teacher_cache.py --quick    # tiny settings (a few minutes), to check the script

1. **Cost and size**: seconds to write each cache over the training samples / seconds of plain teacher forwards over
   the same samples (same batch size); bytes per token on disk (the whole cache: ids, mask and teacher columns).
2. **Fidelity**: on the same batches, the KD loss and the student's gradient (all parameters) from each cache vs the
   live teacher: relative loss error, relative gradient error `|g - g_live| / |g_live|`, gradient cosine.
3. **Quality**: held-out loss of the student after the same KD steps (same batches, same seed) from each source.
4. **Speed and memory**: one optimizer step per method in its own worker process (`distill_throughput.py`'s
   methodology: untimed warm-up, then rounds in a rotated order, ratios within each round, median [min, max]):
   `ce` (the student's CE step), `live` (DistillationTrainer with the teacher), `gkd` (TRL GKDTrainer, lmbda=0,
   beta=0), and DistillationTrainer from the `hidden_fp32`, `hidden_bf16` and `topk128` caches (batches collated from
   the cache inside the timed step). Peak RSS of each worker (teacher loaded or not).
5. **Search**: wall time of `search_architectures` retraining 4 candidates with `teacher_cache="hidden"` (one teacher
   pass, counted) vs the live teacher, from the same importance scores; rankings compared.

Writes `benchmarks/results/teacher_cache.json` and `.png`, and prints a table.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
STUDENT_DIR = RESULTS / ".teacher_cache_student"
CACHES = RESULTS / ".teacher_caches"
CACHE_MODES = {
    "hidden_fp32": dict(mode="hidden", dtype="float32"),
    "hidden_bf16": dict(mode="hidden", dtype="bfloat16"),
    "topk8": dict(mode="topk", top_k=8),
    "topk32": dict(mode="topk", top_k=32),
    "topk128": dict(mode="topk", top_k=128),
    "topk512": dict(mode="topk", top_k=512),
}
SPEED_METHODS = ["ce", "live", "gkd", "hidden_fp32", "hidden_bf16", "topk128"]
SECTIONS = ["cost", "fidelity", "quality", "speed", "search"]
TARGETS = {"hidden": 1.25, "topk": 1.10}


def _spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def _args(output_dir, **kwargs):
    from hf_minitron import DistillationConfig

    defaults = dict(
        output_dir=str(output_dir), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
        learning_rate=1e-4, lr_scheduler_type="constant", logging_steps=1,
    )  # fmt: skip
    return DistillationConfig(**{**defaults, **kwargs})


def _rows(dataset, count):
    return [
        {"input_ids": dataset[i]["input_ids"], "attention_mask": dataset[i]["attention_mask"]} for i in range(count)
    ]


# ---------------------------------------------------------------------------------------------- 0. student and data
def build_student(calibration_samples: int) -> dict:
    """Prunes the teacher once (width: MLP, heads, embedding channels), as `distill_throughput.py` does."""
    from hf_minitron import PrunedConfig, prune_model
    from hf_minitron.data import embedded_datasets, take_samples
    from hf_minitron.embedded import load_default_teacher

    info = STUDENT_DIR / "benchmark_student.json"
    target = PrunedConfig(
        hidden_size=384, intermediate_size=1024, num_attention_heads=6, calibration_samples=calibration_samples,
        calibration_batch_size=8,
    )  # fmt: skip
    if info.is_file() and json.loads(info.read_text())["pruned_config"] == target.to_dict():
        return json.loads(info.read_text())
    teacher, tokenizer = load_default_teacher()
    teacher_params = sum(p.numel() for p in teacher.parameters())
    calibration = take_samples(embedded_datasets(tokenizer, 128)["train"], calibration_samples)
    student = prune_model(teacher, target, calibration, show_progress=False)
    student.save_pretrained(STUDENT_DIR)
    result = {
        "teacher_params": teacher_params,
        "student_params": sum(p.numel() for p in student.parameters()),
        "pruned_config": target.to_dict(),
    }
    info.write_text(json.dumps(result, indent=2))
    return result


# ---------------------------------------------------------------------------------------------- 1. cost and size
def write_caches(teacher, tokenizer, train, modes) -> dict:
    """Writes every cache (fresh) and times it against plain teacher forwards over the same samples."""
    import torch

    from hf_minitron import cache_teacher
    from hf_minitron.distillation.teacher_cache import read_cache_info
    from hf_minitron.distillation.teacher_cache_writer import _collate

    shutil.rmtree(CACHES, ignore_errors=True)
    batch_size = 8
    start = time.perf_counter()
    rows = [{k: torch.as_tensor(v) for k, v in r.items()} for r in _rows(train, len(train))]
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            teacher(**_collate(rows[i : i + batch_size], "cpu"), use_cache=False)
    forward = time.perf_counter() - start
    result = {"teacher_forward_seconds": forward, "samples": len(train), "modes": {}}
    for name in modes:
        start = time.perf_counter()
        cache_teacher(
            teacher, train, CACHES / name, tokenizer=tokenizer, batch_size=batch_size, show_progress=False,
            **CACHE_MODES[name],
        )  # fmt: skip
        seconds = time.perf_counter() - start
        info = read_cache_info(CACHES / name)
        result["modes"][name] = {
            "write_seconds": seconds,
            "write_over_teacher_forward": seconds / forward,
            "bytes_per_token": info["bytes_per_token"],
            "bytes": info["bytes"],
            "tokens": info["tokens"],
        }
        print(f"  cache {name}: {seconds:.1f} s ({seconds / forward:.2f}x the teacher forwards), "
              f"{info['bytes_per_token']:.0f} bytes/token", flush=True)  # fmt: skip
    return result


# ---------------------------------------------------------------------------------------------- 2. fidelity
def fidelity(teacher, train, modes, batches: int, batch_size: int) -> dict:
    """Loss and student gradient of the same batches: every cache vs the live teacher."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_minitron import DistillationTrainer, load_teacher_cache
    from hf_minitron.distillation.trainer import DataCollatorForDistillation

    collate = DataCollatorForDistillation()
    student = AutoModelForCausalLM.from_pretrained(STUDENT_DIR)
    tmp = tempfile.mkdtemp()

    def loss_and_grad(trainer, rows):
        losses, grads = [], []
        for b in range(batches):
            batch = collate(rows[b * batch_size : (b + 1) * batch_size])
            student.train().zero_grad()
            loss = trainer.compute_loss(student, batch, num_items_in_batch=batch["labels"][:, 1:].ne(-100).sum())
            loss.backward()
            losses.append(loss.item())
            grads.append(torch.cat([p.grad.reshape(-1) for p in student.parameters()]).double())
        return losses, grads

    count = batches * batch_size
    live = DistillationTrainer(model=student, teacher_model=teacher, args=_args(tmp), train_dataset=train)
    live_losses, live_grads = loss_and_grad(live, _rows(train, count))
    result = {"batches": batches, "batch_size": batch_size, "live_loss": live_losses, "modes": {}}
    for name in modes:
        cache = load_teacher_cache(CACHES / name)
        trainer = DistillationTrainer(model=student, args=_args(tmp), train_dataset=cache)
        losses, grads = loss_and_grad(trainer, [cache[i] for i in range(count)])
        result["modes"][name] = {
            "loss": losses,
            "loss_relative_error": max(abs(a - b) / abs(b) for a, b in zip(losses, live_losses)),
            "grad_relative_error": max(((g - h).norm() / h.norm()).item() for g, h in zip(grads, live_grads)),
            "grad_cosine": min(torch.nn.functional.cosine_similarity(g, h, dim=0).item() for g, h in zip(grads, live_grads)),
        }  # fmt: skip
        print(f"  fidelity {name}: {result['modes'][name]}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return result


# ---------------------------------------------------------------------------------------------- 3. quality
def quality(teacher, train, validation, modes, steps: int, batch_size: int) -> dict:
    """Held-out loss after `steps` KD steps from the live teacher and from each cache (same batches and seed)."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_minitron import DistillationTrainer, load_teacher_cache
    from hf_minitron.evaluation import heldout_perplexity

    tmp = tempfile.mkdtemp()
    result = {"steps": steps, "batch_size": batch_size, "eval_samples": len(validation), "heldout_loss": {}}
    sources = [("live", None)] + [(name, CACHES / name) for name in modes]
    for name, path in sources:
        torch.manual_seed(0)
        student = AutoModelForCausalLM.from_pretrained(STUDENT_DIR)
        if "before" not in result:
            result["before"] = heldout_perplexity(student, validation, 8)["loss"]
        data = train if path is None else load_teacher_cache(path)
        args = _args(tmp, max_steps=steps, per_device_train_batch_size=batch_size)
        start = time.perf_counter()
        DistillationTrainer(model=student, teacher_model=teacher if path is None else None, args=args,
                            train_dataset=data).train()  # fmt: skip
        result["heldout_loss"][name] = heldout_perplexity(student, validation, 8)["loss"]
        print(
            f"  quality {name}: {result['heldout_loss'][name]:.4f} ({time.perf_counter() - start:.0f} s)", flush=True
        )
    shutil.rmtree(tmp, ignore_errors=True)
    return result


# ---------------------------------------------------------------------------------------------- 4. speed and memory
def build_step(method: str, batch_size: int, seq_length: int):
    """`step(i)`: one optimizer step of `method` on batch i (collated inside the step)."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_minitron import DistillationTrainer, load_teacher_cache
    from hf_minitron.distillation.trainer import DataCollatorForDistillation

    collate = DataCollatorForDistillation()
    if method in ("ce", "live", "gkd"):
        sys.path.insert(0, str(HERE))
        import distill_throughput

        distill_throughput.STUDENT_DIR = str(STUDENT_DIR)
        step, _ = distill_throughput.build_step({"live": "minitron"}.get(method, method), "fp32", seq_length, None)
        rows = _rows(load_teacher_cache(CACHES / "hidden_fp32"), batch_size)  # the same tokens, no teacher columns
        return lambda i: step(collate(rows))

    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(STUDENT_DIR)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    cache = load_teacher_cache(CACHES / method)
    trainer = DistillationTrainer(model=student, args=_args(tempfile.mkdtemp()), train_dataset=cache)
    student.train()

    def step(i):
        batch = collate([cache[j] for j in range(batch_size)])
        trainer.training_step(student, batch, batch["labels"][:, 1:].ne(-100).sum())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM): `ru_maxrss` would report the parent's peak, inherited across fork/exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def serve(method: str, batch_size: int, seq_length: int, threads: int) -> None:
    """Worker loop: one JSON line per command read from stdin (`step I`, `stats`, `quit`)."""
    import torch

    torch.set_num_threads(threads)
    step = build_step(method, batch_size, seq_length)
    setup_rss = _rss_mb()
    print(json.dumps({"ready": method}), flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[0] == "step":
            start = time.perf_counter()
            step(int(command[1]))
            print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)
        elif command[0] == "stats":
            print(json.dumps({"peak_rss_mb": _peak_rss_mb(), "rss_after_setup_mb": setup_rss}), flush=True)
        else:
            return


class Worker:
    """A `serve` subprocess, started at once and driven one command at a time."""

    def __init__(self, method, batch_size, seq_length, threads):
        env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.method = method
        self.log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty worker must never block on it
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", method, str(batch_size), str(seq_length), str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
        )  # fmt: skip

    def ask(self, command):
        if command is not None:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        while True:
            line = self.process.stdout.readline()
            if not line:
                self.log.seek(0)
                raise RuntimeError(f"worker {self.method} died:\n{self.log.read()[-4000:]}")
            if line.startswith("{"):
                return json.loads(line)

    def close(self):
        self.process.stdin.write("quit\n")
        self.process.stdin.close()
        self.process.wait(timeout=120)


def speed(methods, batch_size: int, seq_length: int, warmup: int, rounds: int, threads: int) -> dict:
    workers = [Worker(m, batch_size, seq_length, threads) for m in methods]  # loading in parallel
    seconds = {m: [] for m in methods}
    try:
        for worker in workers:
            worker.ask(None)  # ready
        for index in range(warmup + rounds):
            shift = index % len(workers)
            for worker in workers[shift:] + workers[:shift]:
                took = worker.ask(f"step {index}")["seconds"]
                if index >= warmup:
                    seconds[worker.method].append(took)
            print(f"  round {index + 1}/{warmup + rounds}: "
                  + ", ".join(f"{m} {s[-1]:.2f}s" for m, s in seconds.items() if s), flush=True)  # fmt: skip
        memory = {w.method: w.ask("stats") for w in workers}
    finally:
        for worker in workers:
            worker.close()
    tokens = batch_size * seq_length
    rounds_range = range(rounds)
    ratios = {
        f"{m}_over_ce": _spread([seconds[m][i] / seconds["ce"][i] for i in rounds_range]) for m in methods if m != "ce"
    }
    if "gkd" in methods:
        for m in methods:
            if m not in ("ce", "gkd"):
                ratios[f"gkd_over_{m}"] = _spread([seconds["gkd"][i] / seconds[m][i] for i in rounds_range])
    per_method = {
        m: {"seconds_per_step": _spread(seconds[m]), "tokens_per_s": tokens / _spread(seconds[m])["median"], **memory[m]}
        for m in methods
    }  # fmt: skip
    return {"batch_size": batch_size, "seq_length": seq_length, "warmup": warmup, "rounds": rounds,
            "threads": threads, "methods": per_method, "ratios": ratios}  # fmt: skip


# ---------------------------------------------------------------------------------------------- 5. search
def search(teacher, tokenizer, data, steps: int, candidates: int, batch_size: int) -> dict:
    """`search_architectures` retraining `candidates` candidates with one hidden cache vs the live teacher."""
    from hf_minitron import SearchConfig, search_architectures
    from hf_minitron.pruning.prune import compute_scores

    config = SearchConfig(
        target_ratio=0.6, tolerance=0.05, max_candidates=candidates, retrain_steps=steps, eval_interval=steps,
        eval_batch_size=8, pruning={"calibration_samples": 16, "depth_calibration_samples": 4},
    )  # fmt: skip
    retraining = _args(tempfile.gettempdir(), per_device_train_batch_size=batch_size)
    scores = compute_scores(teacher, config.base_pruned_config(), data["train"], show_progress=False)
    result = {"steps": steps, "candidates": candidates, "batch_size": batch_size}
    for name, teacher_cache in (("live", None), ("cached", "hidden")):
        output_dir = tempfile.mkdtemp(prefix=f"teacher-cache-search-{name}-")
        start = time.perf_counter()
        found = search_architectures(
            teacher, config, data["train"], data["validation"], scores=scores, output_dir=output_dir,
            distillation_config=retraining, processing_class=tokenizer, teacher_cache=teacher_cache,
            show_progress=False,
        )  # fmt: skip
        result[name] = {
            "seconds": time.perf_counter() - start,
            "ranking": [c.name for c in found.ranking()],
            "heldout_loss": {c.name: c.metric[steps] for c in found.candidates},
        }
        shutil.rmtree(output_dir, ignore_errors=True)
        print(f"  search {name}: {result[name]['seconds']:.0f} s, ranking {result[name]['ranking']}", flush=True)
    result["speedup"] = result["live"]["seconds"] / result["cached"]["seconds"]
    result["same_ranking"] = result["live"]["ranking"] == result["cached"]["ranking"]
    return result


# ---------------------------------------------------------------------------------------------- report
def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(18, 9))
    for ax, section in zip(axes.flat, ("fidelity", "quality", "speed", "speed", "cost", "search")):
        if not results.get(section):
            ax.axis("off")
    if results.get("fidelity"):
        modes = list(results["fidelity"]["modes"])
        ax = axes[0, 0]
        values = [max(results["fidelity"]["modes"][m]["grad_relative_error"], 1e-9) for m in modes]
        ax.bar(modes, values, color="tab:blue")
        ax.set_yscale("log")
        ax.set_title("Fidelity: relative gradient error vs live teacher (0 shown as 1e-9)")
        ax.tick_params(axis="x", labelsize=8)
    if results.get("quality"):
        ax = axes[0, 1]
        q = results["quality"]
        names = ["before", *q["heldout_loss"]]
        ax.bar(names, [q["before"], *q["heldout_loss"].values()], color="tab:green")
        low = min(q["heldout_loss"].values())
        ax.set_ylim(low - 0.5, q["before"] + 0.2)
        ax.set_title(f"Held-out loss after {q['steps']} KD steps")
        ax.tick_params(axis="x", labelsize=8, rotation=30)
    if results.get("speed"):
        _plot_speed(axes, results["speed"])
    if results.get("cost"):
        ax = axes[1, 1]
        c = results["cost"]["modes"]
        ax.bar(list(c), [r["bytes_per_token"] for r in c.values()], color="tab:red")
        ax.set_yscale("log")
        ax.set_title("Bytes per token on disk")
        ax.tick_params(axis="x", labelsize=8)
    if results.get("search"):
        sr = results["search"]
        ax = axes[1, 2]
        ax.bar(["live teacher", "one cache"], [sr["live"]["seconds"], sr["cached"]["seconds"]], color="tab:cyan")
        ax.set_title(f"Search: {sr['candidates']} candidates x {sr['steps']} steps (s); speed-up {sr['speedup']:.2f}x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_speed(axes, s: dict) -> None:
    ax = axes[0, 2]
    keys = [k for k in s["ratios"] if k.endswith("_over_ce")]
    medians = [s["ratios"][k]["median"] for k in keys]
    errors = [[s["ratios"][k]["median"] - s["ratios"][k]["min"] for k in keys],
              [s["ratios"][k]["max"] - s["ratios"][k]["median"] for k in keys]]  # fmt: skip
    ax.bar([k.replace("_over_ce", "") for k in keys], medians, yerr=errors, color="tab:purple", capsize=3)
    for target, style in ((TARGETS["hidden"], "--"), (TARGETS["topk"], ":")):
        ax.axhline(target, color="grey", linestyle=style, linewidth=0.8)
    ax.set_title(f"Step time / CE step ({s['rounds']} rounds; targets 1.25 hidden, 1.10 top-k)")
    ax.tick_params(axis="x", labelsize=8)
    ax = axes[1, 0]
    ax.bar(list(s["methods"]), [r["peak_rss_mb"] for r in s["methods"].values()], color="tab:orange")
    ax.set_title("Peak RSS of a training worker (MB)")
    ax.tick_params(axis="x", labelsize=8)


def print_table(results: dict) -> None:
    if results.get("fidelity") and results.get("quality"):
        _print_sources(results)
    if results.get("speed"):
        _print_speed(results["speed"])
    if results.get("search"):
        sr = results["search"]
        print(f"\nsearch, {sr['candidates']} candidates x {sr['steps']} KD steps: live {sr['live']['seconds']:.0f} s, "
              f"one cache {sr['cached']['seconds']:.0f} s (cache written inside), speed-up {sr['speedup']:.2f}x, "
              f"same ranking: {sr['same_ranking']}")  # fmt: skip


def _print_sources(results: dict) -> None:
    cost, fid, q = results["cost"], results["fidelity"], results["quality"]
    print("\n| source | bytes/token | write / teacher forward | loss rel. error | grad rel. error | grad cosine | "
          f"held-out loss after {q['steps']} steps |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    print(f"| live teacher | - | - | - | - | - | {q['heldout_loss']['live']:.4f} |")
    for m, f in fid["modes"].items():
        print(
            f"| {m} | {cost['modes'][m]['bytes_per_token']:.0f} | {cost['modes'][m]['write_over_teacher_forward']:.2f} "
            f"| {f['loss_relative_error']:.1e} | {f['grad_relative_error']:.1e} | {f['grad_cosine']:.6f} "
            f"| {q['heldout_loss'][m]:.4f} |"
        )
    print(f"(before training: {q['before']:.4f})")


def _print_speed(s: dict) -> None:
    print(f"\n| method | s/step median [min, max] | tokens/s | / CE step | peak RSS MB |  ({s['rounds']} rounds)")
    print("|---|---|---|---|---|")
    for m, r in s["methods"].items():
        sp = r["seconds_per_step"]
        ratio = s["ratios"].get(f"{m}_over_ce")
        ratio = "1" if ratio is None else f"{ratio['median']:.3f} [{ratio['min']:.3f}, {ratio['max']:.3f}]"
        print(f"| {m} | {sp['median']:.2f} [{sp['min']:.2f}, {sp['max']:.2f}] | {r['tokens_per_s']:.0f} | {ratio} "
              f"| {r['peak_rss_mb']:.0f} |")  # fmt: skip
    for key, r in s["ratios"].items():
        if key.startswith("gkd_over_"):
            print(f"  {key}: {r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}]")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", nargs=4, metavar=("METHOD", "BATCH", "SEQ", "THREADS"))
    parser.add_argument("--quick", action="store_true", help="Tiny settings: checks the script in a few minutes.")
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--fidelity-batches", type=int, default=2)
    parser.add_argument("--quality-steps", type=int, default=6)
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (1: steadier on a CPU shared with other jobs).",
    )
    parser.add_argument("--search-steps", type=int, default=4, help="KD steps per search candidate; 0 skips it.")
    parser.add_argument("--search-candidates", type=int, default=4)
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"Comma-separated subset of {','.join(SECTIONS)}."
    )
    parser.add_argument("--output", default=str(RESULTS / "teacher_cache.json"))
    args = parser.parse_args()
    sections = [name for name in args.sections.split(",") if name]
    if set(sections) - set(SECTIONS):
        parser.error(f"--sections: choose among {SECTIONS}")
    if args.serve:
        method, *numbers = args.serve
        serve(method, *map(int, numbers))
        return
    if args.quick:
        args.seq_length, args.fidelity_batches, args.quality_steps, args.eval_samples = 64, 1, 2, 4
        args.rounds, args.search_steps, args.search_candidates = 1, 1, 2
        args.output = str(RESULTS / ".teacher_cache_quick.json")
    modes = ["hidden_fp32", "hidden_bf16", "topk8", "topk128"] if args.quick else list(CACHE_MODES)
    if not {"fidelity", "quality"} & set(sections):  # the speed workers need only their own caches
        modes = [m for m in modes if m in SPEED_METHODS]

    import torch

    from hf_minitron.data import embedded_datasets
    from hf_minitron.embedded import load_default_teacher

    torch.set_num_threads(args.threads)
    started = time.time()
    results = {"args": vars(args), "student": build_student(args.calibration_samples)}
    teacher, tokenizer = load_default_teacher()
    teacher.eval().requires_grad_(False)
    samples = max(args.quality_steps * args.batch_size, args.fidelity_batches * args.batch_size)
    data = embedded_datasets(tokenizer, args.seq_length, max_train_samples=samples)
    train, validation = data["train"], data["validation"].select(range(args.eval_samples))
    timings = {}

    def timed(name, function, *function_args):
        start = time.perf_counter()
        print(f"{name} ...", flush=True)
        value = function(*function_args)
        timings[name] = time.perf_counter() - start
        return value

    if {"cost", "fidelity", "quality", "speed"} & set(sections):  # the caches the others read
        results["cost"] = timed("cost", write_caches, teacher, tokenizer, train, modes)
    if "fidelity" in sections:
        results["fidelity"] = timed(
            "fidelity", fidelity, teacher, train, modes, args.fidelity_batches, args.batch_size
        )
    if "quality" in sections:
        results["quality"] = timed(
            "quality", quality, teacher, train, validation, modes, args.quality_steps, args.batch_size
        )
    if "speed" in sections:
        methods = [m for m in SPEED_METHODS if m in ("ce", "live", "gkd") or m in modes]
        results["speed"] = timed("speed", speed, methods, args.batch_size, args.seq_length, args.warmup,
                                 args.rounds, args.threads)  # fmt: skip
    if args.search_steps and "search" in sections:
        search_data = embedded_datasets(
            tokenizer, args.seq_length, max_train_samples=args.search_steps * args.batch_size
        )
        search_data["validation"] = search_data["validation"].select(range(args.eval_samples))
        results["search"] = timed("search", search, teacher, tokenizer, search_data, args.search_steps,
                                  args.search_candidates, args.batch_size)  # fmt: skip
    results["seconds"] = timings
    results["wall_seconds"] = time.time() - started
    shutil.rmtree(CACHES, ignore_errors=True)
    from hf_minitron.io import atomic_write_json

    atomic_write_json(args.output, results, indent=1)
    plot(results, Path(args.output).with_suffix(".png"))
    print_table(results)
    print(f"\ntotal {results['wall_seconds']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})")


if __name__ == "__main__":
    main()
