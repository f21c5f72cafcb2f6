"""Distillation step throughput, memory and quality: DistillationTrainer vs TRL GKD vs naive KD vs plain CE.

Same teacher (the embedded SmolLM2-135M), same student (the teacher pruned with `hf_minitron.prune_model`), same
batches (the embedded corpus) for every method.

    python benchmarks/distill_throughput.py                      # ~30 min on a busy 2-core CPU
    python benchmarks/distill_throughput.py --rounds 3 --dtypes fp32 --memory-seq-length 1024 --quality-steps 0

Methods (one optimizer step each: forward, backward, AdamW):
- `minitron`: `DistillationTrainer.training_step` (fused chunked forward-KL, the default config);
- `gkd`: TRL `GKDTrainer.training_step` with `lmbda=0, beta=0` (supervised forward KL on full logits);
- `naive`: full student and teacher logits, `hf_minitron.kd_loss`, backward;
- `ce`: the student's own cross-entropy step (`labels=`), the cost floor of any training step;
- `teacher`: a teacher forward pass alone (no step), for the ratio KD / (CE + teacher forward).

Methodology: each method lives in its own worker process (so its peak RSS is its own) with a fixed
`torch.set_num_threads`; the driver runs `--warmup` untimed steps of each, then `--rounds` timed rounds in which every
method runs one step, one process at a time, in a rotated order. Background load therefore hits all methods alike, and
the ratios are taken within each round (median and range over rounds): on a shared machine these are the numbers to
compare, the absolute tokens/s are not. Peak memory is measured at `--memory-seq-length` in fresh processes, one at a
time.

Writes `benchmarks/results/distill_throughput.json` and `.png`, and prints a table.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
STUDENT_DIR = os.path.join(RESULTS, ".pruned_student")


# ---------------------------------------------------------------------------------------------- worker (one config)
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _batches(tokenizer, seq_length, batch_size, count):
    from hf_minitron.data import embedded_datasets
    from hf_minitron.distillation.trainer import DataCollatorForDistillation

    data = embedded_datasets(tokenizer, seq_length, max_train_samples=batch_size * count)["train"]
    collate = DataCollatorForDistillation(pad_token_id=tokenizer.pad_token_id or 0)
    rows = [data[i] for i in range(len(data))]
    while len(rows) < batch_size * count:  # long sequences: reuse samples rather than run out
        rows += rows
    return [collate(rows[i * batch_size : (i + 1) * batch_size]) for i in range(count)]


def build_step(method: str, dtype_name: str, seq_length: int, chunk_size: int | None):
    """`(step, batches_needed)`: `step(batch)` runs one optimizer step of `method` (a forward for `teacher`)."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_minitron import DistillationConfig, DistillationTrainer, kd_loss
    from hf_minitron.embedded import load_default_teacher

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    teacher, tokenizer = load_default_teacher(dtype=dtype)
    teacher.eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(STUDENT_DIR, dtype=dtype)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    output_dir = os.path.join(RESULTS, ".tmp")

    if method == "minitron":
        args = DistillationConfig(output_dir=output_dir, report_to="none", use_cpu=True, kd_chunk_size=chunk_size)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer)

        def step(batch):
            num_items = batch["labels"][:, 1:].ne(-100).sum()
            trainer.training_step(student, batch, num_items)
    elif method == "gkd":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from datasets import Dataset
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        args = GKDConfig(
            output_dir=output_dir, report_to="none", use_cpu=True, lmbda=0.0, beta=0.0, temperature=1.0,
            max_length=seq_length, bf16=False,
        )  # fmt: skip
        placeholder = Dataset.from_dict({"input_ids": [[0]]})  # GKDTrainer requires one; batches are fed directly
        trainer = GKDTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=placeholder,
            processing_class=tokenizer,
            data_collator=lambda rows: rows,
        )

        def step(batch):
            num_items = batch["labels"][:, 1:].ne(-100).sum()
            trainer.training_step(student, dict(batch), num_items)
    elif method == "naive":

        def step(batch):
            labels = batch["labels"][:, 1:]
            with torch.no_grad():
                teacher_logits = teacher(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            logits = student(batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            loss = kd_loss(logits, teacher_logits, labels) / labels.ne(-100).sum()
            loss.backward()
    elif method == "ce":

        def step(batch):
            student(**batch).loss.backward()
    elif method == "teacher":

        def step(batch):
            with torch.no_grad():
                teacher(batch["input_ids"], attention_mask=batch["attention_mask"])
    else:
        raise ValueError(f"unknown method {method!r}")

    student.train()

    def full_step(batch):
        step(batch)
        if method != "teacher":
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return full_step, tokenizer


def serve(method: str, dtype_name: str, seq_length: int, batch_size: int, count: int, chunk: int, threads: int):
    """Worker loop: one JSON line per command read from stdin (`step I`, `stats`, `quit`)."""
    import torch

    torch.set_num_threads(threads)
    step, tokenizer = build_step(method, dtype_name, seq_length, None if chunk <= 0 else chunk)
    batches = _batches(tokenizer, seq_length, batch_size, count)
    setup_rss = _rss_mb()
    print(json.dumps({"ready": method}), flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[0] == "step":
            batch = batches[int(command[1]) % len(batches)]
            start = time.perf_counter()
            step(batch)
            print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)
        elif command[0] == "stats":
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(json.dumps({"peak_rss_mb": peak, "rss_after_setup_mb": setup_rss}), flush=True)
        else:
            return


class Worker:
    """A `serve` subprocess driven one command at a time."""

    def __init__(self, method, dtype, seq_length, batch_size, count, chunk, threads):
        env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
        argv = [method, dtype, seq_length, batch_size, count, chunk, threads]
        self.method = method
        self.log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty worker must never block on it
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", *map(str, argv)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
        )  # fmt: skip
        self.ask(None)  # waits for "ready"

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


def _spread(values):
    import statistics

    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def throughput(methods, dtype, seq_length, batch_size, warmup, rounds, chunk, threads) -> dict:
    """Interleaved rounds: every method runs one step per round, in an order rotated from round to round."""
    count = warmup + rounds
    workers = [Worker(m, dtype, seq_length, batch_size, count, chunk, threads) for m in methods]
    seconds = {m: [] for m in methods}
    try:
        for index in range(count):
            shift = index % len(workers)
            for worker in workers[shift:] + workers[:shift]:
                took = worker.ask(f"step {index}")["seconds"]
                if index >= warmup:
                    seconds[worker.method].append(took)
            print(
                f"  {dtype} round {index + 1}/{count}: "
                + ", ".join(f"{m} {s[-1]:.2f}s" for m, s in seconds.items() if s),
                flush=True,
            )
        memory = {w.method: w.ask("stats") for w in workers}
    finally:
        for worker in workers:
            worker.close()
    tokens = seq_length * batch_size
    per_method = {
        m: {
            "seconds_per_step": _spread(seconds[m]),
            "tokens_per_s": tokens / _spread(seconds[m])["median"],
            **memory[m],
        }
        for m in methods
    }
    ratios = {}
    rounds_range = range(len(seconds[methods[0]]))
    if "gkd" in methods:
        ratios["minitron_vs_gkd_tokens_per_s"] = _spread(
            [seconds["gkd"][i] / seconds["minitron"][i] for i in rounds_range]
        )
    if "naive" in methods:
        ratios["minitron_vs_naive_tokens_per_s"] = _spread(
            [seconds["naive"][i] / seconds["minitron"][i] for i in rounds_range]
        )
    if "ce" in methods and "teacher" in methods:
        ratios["kd_step_over_ce_step_plus_teacher_forward"] = _spread(
            [seconds["minitron"][i] / (seconds["ce"][i] + seconds["teacher"][i]) for i in rounds_range]
        )
        if "gkd" in methods:
            # The most any KD step can gain over GKD while it still runs the student's training step and the
            # teacher's forward (the matmuls every exact KD step shares): a ceiling for minitron_vs_gkd.
            ratios["ceiling_gkd_over_ce_step_plus_teacher_forward"] = _spread(
                [seconds["gkd"][i] / (seconds["ce"][i] + seconds["teacher"][i]) for i in rounds_range]
            )
    return {
        "dtype": dtype, "seq_length": seq_length, "batch_size": batch_size, "warmup": warmup, "rounds": rounds,
        "threads": threads, "methods": per_method, "ratios": ratios,
    }  # fmt: skip


def memory_row(method, seq_length, chunk, threads) -> dict:
    """Peak RSS of one fp32 step at `seq_length`, batch 1, in a fresh process of its own."""
    worker = Worker(method, "fp32", seq_length, 1, 2, chunk, threads)
    try:
        worker.ask("step 0")
        took = worker.ask("step 1")["seconds"]
        stats = worker.ask("stats")
    finally:
        worker.close()
    return {"method": method, "seq_length": seq_length, "seconds_per_step": took, **stats}


def quality(steps: int, seq_length: int, batch_size: int, eval_samples: int) -> dict:
    """Held-out CE of the pruned student after the same number of KD-only vs CE-only steps."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_minitron import DistillationConfig, DistillationTrainer
    from hf_minitron.data import embedded_datasets
    from hf_minitron.embedded import load_default_teacher

    teacher, tokenizer = load_default_teacher()
    data = embedded_datasets(tokenizer, seq_length, max_train_samples=steps * batch_size)
    validation = data["validation"].select(range(min(eval_samples, len(data["validation"]))))
    result = {}
    for name, weights in (
        ("kd", {"kd_loss_weight": 1.0, "ce_loss_weight": 0.0}),
        ("ce", {"kd_loss_weight": 0.0, "ce_loss_weight": 1.0}),
    ):
        torch.manual_seed(0)
        student = AutoModelForCausalLM.from_pretrained(STUDENT_DIR)
        args = DistillationConfig(
            output_dir=os.path.join(RESULTS, ".tmp"), report_to="none", use_cpu=True, max_steps=steps,
            per_device_train_batch_size=batch_size, learning_rate=1e-4, lr_scheduler_type="constant",
            save_strategy="no", disable_tqdm=True, per_device_eval_batch_size=batch_size, **weights,
        )  # fmt: skip
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=data["train"], processing_class=tokenizer
        )
        if "before" not in result:
            result["before"] = trainer.evaluate(validation)["eval_loss"]
        trainer.train()
        result[f"after_{name}"] = trainer.evaluate(validation)["eval_loss"]
    result.update(steps=steps, seq_length=seq_length, batch_size=batch_size, eval_samples=len(validation))
    return result


# ---------------------------------------------------------------------------------------------- driver
def build_student(calibration_samples: int) -> dict:
    """Prunes the teacher once (width: MLP, heads, embedding channels) and saves it for the workers."""
    from hf_minitron import PrunedConfig
    from hf_minitron.data import embedded_datasets, take_samples
    from hf_minitron.embedded import load_default_teacher
    from hf_minitron.pruning.prune import prune_model

    teacher, tokenizer = load_default_teacher()
    teacher_params = sum(p.numel() for p in teacher.parameters())  # before pruning: prune_model edits in place
    target = PrunedConfig(
        hidden_size=384, intermediate_size=1024, num_attention_heads=6, calibration_samples=calibration_samples,
        calibration_batch_size=8,
    )  # fmt: skip
    calibration = take_samples(embedded_datasets(tokenizer, 128)["train"], calibration_samples)
    student = prune_model(teacher, target, calibration, show_progress=False)
    student.save_pretrained(STUDENT_DIR)
    student_params = sum(p.numel() for p in student.parameters())
    info = {"teacher_params": teacher_params, "student_params": student_params, "pruned_config": target.to_dict()}
    with open(os.path.join(STUDENT_DIR, "benchmark_student.json"), "w") as f:
        json.dump(info, f, indent=2)
    return info


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    labels, medians, errors = [], [], [[], []]
    for run in results["throughput"]:
        for method, r in run["methods"].items():
            if method == "teacher":
                continue
            tokens = run["seq_length"] * run["batch_size"]
            spread = r["seconds_per_step"]
            labels.append(f"{method}\n{run['dtype']}")
            medians.append(r["tokens_per_s"])
            errors[0].append(r["tokens_per_s"] - tokens / spread["max"])
            errors[1].append(tokens / spread["min"] - r["tokens_per_s"])
    axes[0].bar(labels, medians, yerr=errors, color="tab:blue", capsize=3)
    run = results["throughput"][0]
    axes[0].set_title(f"tokens/s, median (range) of {run['rounds']} rounds, seq {run['seq_length']}")
    names = {
        "minitron_vs_gkd_tokens_per_s": "vs GKD\n(>= 1.3)",
        "ceiling_gkd_over_ce_step_plus_teacher_forward": "ceiling\nGKD/(CE+T)",
        "kd_step_over_ce_step_plus_teacher_forward": "KD/(CE+T)\n(<= 1.03)",
    }
    ratio_labels, ratio_values, ratio_errors = [], [], [[], []]
    for run in results["throughput"]:
        for key, name in names.items():
            if key in run["ratios"]:
                r = run["ratios"][key]
                ratio_labels.append(f"{name}\n{run['dtype']}")
                ratio_values.append(r["median"])
                ratio_errors[0].append(r["median"] - r["min"])
                ratio_errors[1].append(r["max"] - r["median"])
    axes[1].bar(ratio_labels, ratio_values, yerr=ratio_errors, color="tab:purple", capsize=3)
    axes[1].tick_params(axis="x", labelsize=7)
    axes[1].axhline(1.0, color="grey", linewidth=0.8)
    axes[1].set_title("Within-round ratios (median, range)")
    memory = results["memory"]
    if not memory:
        axes[2].axis("off")
    if not results.get("quality"):
        axes[3].axis("off")
    if memory:
        axes[2].bar([r["method"] for r in memory], [r["peak_rss_mb"] for r in memory], color="tab:orange")
        axes[2].set_title(f"Peak RSS (MB) of an fp32 step, seq {memory[0]['seq_length']}")
    q = results.get("quality")
    if q:
        axes[3].bar(
            ["before", f"KD x{q['steps']}", f"CE x{q['steps']}"],
            [q["before"], q["after_kd"], q["after_ce"]],
            color="tab:green",
        )
        axes[3].set_title("Held-out CE of the pruned student")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(results: dict) -> None:
    print(f"\n{'method':9s} {'dtype':5s} {'tokens/s':>9s} {'s/step median [min, max]':>27s} {'peak RSS MB':>12s}")
    for run in results["throughput"]:
        for method, r in run["methods"].items():
            s = r["seconds_per_step"]
            print(
                f"{method:9s} {run['dtype']:5s} {r['tokens_per_s']:9.1f} {s['median']:9.2f} [{s['min']:6.2f}, "
                f"{s['max']:6.2f}] {r['peak_rss_mb']:12.0f}"
            )
    print("\nwithin-round ratios: median [min, max]")
    for run in results["throughput"]:
        for key, r in run["ratios"].items():
            print(f"  {run['dtype']} {key:45s} {r['median']:6.3f} [{r['min']:.3f}, {r['max']:.3f}]")
    if results["memory"]:
        print(f"\nseq {results['memory'][0]['seq_length']}, batch 1, fp32: peak RSS MB, step memory over setup MB")
        for r in results["memory"]:
            print(f"  {r['method']:9s} {r['peak_rss_mb']:8.0f} {r['peak_rss_mb'] - r['rss_after_setup_mb']:8.0f}")
    q = results.get("quality")
    if q:
        print(
            f"\nheld-out CE: before {q['before']:.3f}, after {q['steps']} KD steps {q['after_kd']:.3f}, "
            f"after {q['steps']} CE steps {q['after_ce']:.3f}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", nargs=7, metavar=("METHOD", "DTYPE", "SEQ", "BATCH", "COUNT", "CHUNK", "THREADS"))
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps of every method before the rounds.")
    parser.add_argument("--rounds", type=int, default=6, help="Timed rounds (one step of every method each).")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads of every worker.")
    parser.add_argument("--chunk-size", type=int, default=0, help="kd_chunk_size of the fused loss (0: automatic).")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--methods", nargs="+", default=["minitron", "gkd", "naive", "ce", "teacher"])
    parser.add_argument("--memory-seq-length", type=int, default=2048, help="0 skips the memory rows.")
    parser.add_argument("--quality-steps", type=int, default=12, help="0 skips the quality comparison.")
    parser.add_argument("--quality-seq-length", type=int, default=128)
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--reuse-student", action="store_true", help="Keep the pruned student of an earlier run.")
    parser.add_argument("--output", default=os.path.join(RESULTS, "distill_throughput.json"))
    args = parser.parse_args()

    if args.serve:
        method, dtype, *numbers = args.serve
        serve(method, dtype, *map(int, numbers))
        return

    import torch

    torch.set_num_threads(args.threads)
    os.makedirs(RESULTS, exist_ok=True)
    started = time.time()
    info = os.path.join(STUDENT_DIR, "benchmark_student.json")
    if args.reuse_student and os.path.isfile(info):
        with open(info) as f:
            results = {"student": json.load(f)}
    else:
        results = {"student": build_student(args.calibration_samples)}
    # 1. Throughput: interleaved rounds per dtype.
    results["throughput"] = [
        throughput(
            args.methods,
            dtype,
            args.seq_length,
            args.batch_size,
            args.warmup,
            args.rounds,
            args.chunk_size,
            args.threads,
        )  # fmt: skip
        for dtype in args.dtypes
    ]
    # 2. Memory of one long sequence, one process at a time.
    results["memory"] = []
    if args.memory_seq_length:
        for method in ("minitron", "ce", "naive"):
            results["memory"].append(memory_row(method, args.memory_seq_length, args.chunk_size, args.threads))
            print(f"  memory {method}: {results['memory'][-1]['peak_rss_mb']:.0f} MB", flush=True)
    # 3. Quality: KD vs CE steps on the pruned student.
    if args.quality_steps:
        results["quality"] = quality(args.quality_steps, args.quality_seq_length, 4, 32)
    results["wall_seconds"] = time.time() - started
    from hf_minitron.io import atomic_write_json

    atomic_write_json(args.output, results)
    plot(results, args.output.replace(".json", ".png"))
    print_table(results)
    print(f"total {results['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
