"""Distillation step throughput, memory and quality: DistillationTrainer vs TRL GKD vs naive KD vs plain CE.

Same teacher (the embedded SmolLM2-135M), same student (the teacher pruned with `hf_minitron.prune_model`), same
data (the embedded corpus). Every configuration runs in a fresh subprocess so its peak RSS is its own.

    python benchmarks/distill_throughput.py                      # ~10-15 min on a 2-core CPU
    python benchmarks/distill_throughput.py --steps 2 --quality-steps 6 --memory-seq-length 1024   # quicker

Methods (one optimizer step each: forward, backward, AdamW):
- `minitron`: `DistillationTrainer.training_step` (fused chunked forward-KL, the default config);
- `gkd`: TRL `GKDTrainer.training_step` with `lmbda=0, beta=0` (supervised forward KL on full logits);
- `naive`: full student and teacher logits, `hf_minitron.kd_loss`, backward;
- `ce`: the student's own cross-entropy step (`labels=`), the cost floor of any training step;
- `teacher`: a teacher forward pass alone (no step), for the ratio KD / (CE + teacher forward).

Writes `benchmarks/results/distill_throughput.json` and `.png`.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
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
    from hf_minitron.distillation_trainer import DataCollatorForDistillation

    data = embedded_datasets(tokenizer, seq_length, max_train_samples=batch_size * count)["train"]
    collate = DataCollatorForDistillation(pad_token_id=tokenizer.pad_token_id or 0)
    rows = [data[i] for i in range(len(data))]
    while len(rows) < batch_size * count:  # long sequences: reuse samples rather than run out
        rows += rows
    return [collate(rows[i * batch_size : (i + 1) * batch_size]) for i in range(count)]


def worker(method: str, dtype_name: str, seq_length: int, batch_size: int, steps: int, chunk_size: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from hf_minitron import DistillationConfig, DistillationTrainer, kd_loss
    from hf_minitron.embedded import load_default_teacher

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    teacher, tokenizer = load_default_teacher(dtype=dtype)
    teacher.eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(STUDENT_DIR, dtype=dtype)
    batches = _batches(tokenizer, seq_length, batch_size, steps + 1)
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
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        args = GKDConfig(
            output_dir=output_dir, report_to="none", use_cpu=True, lmbda=0.0, beta=0.0, temperature=1.0,
            max_length=seq_length, bf16=False,
        )  # fmt: skip
        from datasets import Dataset

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

    full_step(batches[0])  # warm-up (allocator, kernels)
    baseline = _rss_mb()
    start = time.perf_counter()
    for batch in batches[1:]:
        full_step(batch)
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "method": method,
        "dtype": dtype_name,
        "seq_length": seq_length,
        "batch_size": batch_size,
        "steps": steps,
        "seconds_per_step": elapsed / steps,
        "tokens_per_s": batch_size * seq_length * steps / elapsed,
        "peak_rss_mb": peak,
        "rss_after_setup_mb": baseline,
    }


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
    from hf_minitron.pruning import prune_model

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
    return {"teacher_params": teacher_params, "student_params": student_params, "pruned_config": target.to_dict()}


def run_worker(*argv) -> dict:
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(
        [sys.executable, __file__, "--worker", *map(str, argv)], capture_output=True, text=True, env=env, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker {argv} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["throughput"] if r["method"] != "teacher"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    labels = [f"{r['method']}\n{r['dtype']}" for r in runs]
    axes[0].bar(labels, [r["tokens_per_s"] for r in runs], color="tab:blue")
    axes[0].set_title(f"Training tokens/s (seq {runs[0]['seq_length']}, batch {runs[0]['batch_size']})")
    memory = results["memory"]
    axes[1].bar(
        [r["method"] for r in memory], [r["peak_rss_mb"] - r["rss_after_setup_mb"] for r in memory], color="tab:orange"
    )
    axes[1].set_title(f"Step memory over setup RSS (MB), seq {memory[0]['seq_length']}" if memory else "memory")
    q = results.get("quality")
    if q:
        axes[2].bar(
            ["before", f"KD x{q['steps']}", f"CE x{q['steps']}"],
            [q["before"], q["after_kd"], q["after_ce"]],
            color="tab:green",
        )
        axes[2].set_title("Held-out CE of the pruned student")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=6, metavar=("METHOD", "DTYPE", "SEQ", "BATCH", "STEPS", "CHUNK"))
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per configuration (after one warm-up).")
    parser.add_argument("--chunk-size", type=int, default=1024, help="kd_chunk_size of the fused loss.")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--memory-seq-length", type=int, default=2048)
    parser.add_argument("--quality-steps", type=int, default=12)
    parser.add_argument("--quality-seq-length", type=int, default=128)
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--output", default=os.path.join(RESULTS, "distill_throughput.json"))
    args = parser.parse_args()

    if args.worker:
        method, dtype, seq, batch, steps, chunk = args.worker
        print(json.dumps(worker(method, dtype, int(seq), int(batch), int(steps), int(chunk))))
        return

    os.makedirs(RESULTS, exist_ok=True)
    started = time.time()
    results = {"student": build_student(args.calibration_samples)}
    # 1. Throughput of each method and dtype.
    results["throughput"] = []
    for dtype in args.dtypes:
        for method in ("minitron", "gkd", "naive", "ce", "teacher"):
            results["throughput"].append(
                run_worker(method, dtype, args.seq_length, args.batch_size, args.steps, args.chunk_size)
            )
            print(f"  {method:9s} {dtype}: {results['throughput'][-1]['tokens_per_s']:8.1f} tokens/s", flush=True)
    # 2. Memory of one long sequence.
    results["memory"] = [
        run_worker(method, "fp32", args.memory_seq_length, 1, 1, args.chunk_size)
        for method in ("minitron", "ce", "naive")
    ]
    # 3. Quality: KD vs CE steps on the pruned student.
    results["quality"] = quality(args.quality_steps, args.quality_seq_length, 4, 32)

    summary = {}
    for dtype in args.dtypes:
        by = {r["method"]: r for r in results["throughput"] if r["dtype"] == dtype}
        summary[dtype] = {
            "minitron_vs_gkd_tokens_per_s": by["minitron"]["tokens_per_s"] / by["gkd"]["tokens_per_s"],
            "minitron_vs_naive_tokens_per_s": by["minitron"]["tokens_per_s"] / by["naive"]["tokens_per_s"],
            "kd_step_over_ce_step_plus_teacher_forward": by["minitron"]["seconds_per_step"]
            / (by["ce"]["seconds_per_step"] + by["teacher"]["seconds_per_step"]),
        }
    memory = {r["method"]: r for r in results["memory"]}
    summary["memory_step_mb"] = {m: r["peak_rss_mb"] - r["rss_after_setup_mb"] for m, r in memory.items()}
    summary["memory_peak_rss_mb"] = {m: r["peak_rss_mb"] for m, r in memory.items()}
    results["summary"] = summary
    results["wall_seconds"] = time.time() - started
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    plot(results, args.output.replace(".json", ".png"))

    print(f"\n{'method':10s} {'dtype':5s} {'tokens/s':>9s} {'s/step':>7s} {'peak RSS MB':>12s}")
    for r in results["throughput"]:
        print(
            f"{r['method']:10s} {r['dtype']:5s} {r['tokens_per_s']:9.1f} {r['seconds_per_step']:7.2f} {r['peak_rss_mb']:12.0f}"
        )
    print(f"\nseq {args.memory_seq_length}, batch 1, fp32: method, peak RSS MB, step memory over setup MB")
    for r in results["memory"]:
        print(f"  {r['method']:9s} {r['peak_rss_mb']:8.0f} {r['peak_rss_mb'] - r['rss_after_setup_mb']:8.0f}")
    print("\n" + json.dumps(summary, indent=2))
    q = results["quality"]
    print(
        f"\nheld-out CE: before {q['before']:.3f}, after {q['steps']} KD steps {q['after_kd']:.3f}, after CE steps {q['after_ce']:.3f}"
    )
    print(f"total {results['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
