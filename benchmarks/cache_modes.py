"""Teacher-cache modes compared: bytes per token, KD step time and student quality, on the embedded teacher.

Teacher: the embedded SmolLM2-135M-Instruct. Student: the teacher pruned with `prune_model` in depth and width (layers
5-24 dropped, 10 of 30 kept; hidden 288, MLP 768, 6 heads), small enough for several seeds on a 2-core CPU. Data: the
`stdlib` corpus (CPython's own source, in distribution for the teacher) packed to `--seq-length` tokens; the held-out
split is the corpus's own (modules never trained on).

    python benchmarks/cache_modes.py            # the default budget (20 steps, 3 seeds, every section in one process)
    python benchmarks/cache_modes.py --quick    # tiny settings (a few minutes), to check the script

On a busy 2-core CPU the committed results were run in parts (docs/benchmarks.md gives the commands): the caches
written once, then one `--skip-speed --max-steps 10 --seed-list S --caches DIR` process per seed, then `--merge`.

1. **Bytes per token** of each cache written over the training samples, read from the cache's `teacher_cache.json`:
   `bytes_per_token` (the whole cache on disk: token ids, mask, teacher columns and Arrow framing) and
   `teacher_bytes_per_token` (the teacher's values alone). Modes: `hidden` fp32 / bf16, `topk` raw (fp32
   log-probabilities) and compressed (`compress=True, dtype="uint8"`) at k = 64 and 128, `sampled` at K = 12 and 32.
   And each cache's **read time** as the trainer reads it (the rows fetched as PyTorch's DataLoader fetches them, then
   the collator), at the training batch and at 4x and 10x it, best of `READ_ROUNDS` interleaved rounds.
2. **Step time**: one optimizer step (forward, backward, AdamW) of KD from each cache, of KD from the live teacher and
   of the student's plain CE step, interleaved in one process: an untimed warm-up, then `--rounds` rounds in which each
   method runs one step in a rotated order. Ratios to the CE step are taken within each round (median [min, max]);
   the CPU is shared with other jobs, so the absolute times are not the numbers to compare.
3. **Quality**: `--steps` steps of `DistillationTrainer` (batch `--batch-size`, LR `--learning-rate` constant) from
   each source, for each of `--seeds` seeds (the seed orders the same training samples), then the held-out loss and
   the held-out KL(teacher || student) per token. Arms: exact KD from the live teacher, KD from each quality cache,
   and the student's own CE (no teacher) for scale. The arms of one seed see the same batches in the same order, so
   differences to exact KD are also given paired by seed.

The teacher's outputs on the training samples are computed once and reused: the teacher's base model is memoised per
sample (`MemoizedTeacher`) for the cache writes and the live-teacher quality arm, so the benchmark pays one teacher
pass over the data (cache write times are measured by `teacher_cache.py`, not here). The step-time section runs the
real, unmemoised teacher.

Writes `benchmarks/results/cache_modes.json` and `.png`, and prints the tables.
"""

import argparse
import copy
import shutil
import statistics
import tempfile
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE_MODES = {
    "hidden_fp32": dict(mode="hidden", dtype="float32"),
    "hidden_bf16": dict(mode="hidden", dtype="bfloat16"),
    "topk64": dict(mode="topk", top_k=64),
    "topk64_uint8": dict(mode="topk", top_k=64, compress=True, dtype="uint8"),
    "topk128": dict(mode="topk", top_k=128),
    "topk128_uint8": dict(mode="topk", top_k=128, compress=True, dtype="uint8"),
    "sampled12": dict(mode="sampled", num_samples=12),
    "sampled24": dict(mode="sampled", num_samples=24),
    "sampled32": dict(mode="sampled", num_samples=32),
}
QUALITY_ARMS = ["live", "sampled12", "topk64_uint8", "sampled32", "topk128_uint8", "topk64", "ce", "sampled24"]
STUDENT = dict(hidden_size=288, intermediate_size=768, num_attention_heads=6, layers_to_drop=list(range(5, 25)))
TARGETS = {"sampled12": 40, "sampled24": 40, "topk64_uint8": 150}  # bytes per token
# Read times at these multiples of --batch-size (capped at the training samples): at the small training batch the
# per-column cost of `datasets`' formatting dominates; at larger ones, the bytes themselves.
READ_BATCHES = (1, 4, 10)
READ_ROUNDS = 9


# ---------------------------------------------------------------------------------------------- the teacher, once
class MemoizedTeacher:
    """Within `with`, the teacher's base model returns each sample's final hidden states from the first time it saw
    that sample (keyed by its token ids): a deterministic teacher gives the same outputs, so every cache write and every
    live-teacher arm costs one teacher pass over the data. Unpadded samples only (packed blocks)."""

    def __init__(self, teacher):
        self.base = teacher.model
        self.memo = {}

    def __enter__(self):
        self.base.forward = self._forward  # an instance attribute: nn.Module.__call__ calls it
        return self

    def __exit__(self, *exc):
        del self.base.forward

    def _forward(self, input_ids=None, attention_mask=None, **kwargs):
        import torch
        from transformers.modeling_outputs import BaseModelOutputWithPast

        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("MemoizedTeacher serves unpadded samples only.")
        keys = [row.numpy().tobytes() for row in input_ids]
        missing = [i for i, key in enumerate(keys) if key not in self.memo]
        if missing:
            kwargs = {k: v for k, v in kwargs.items() if k not in ("position_ids", "cache_position")}
            with torch.no_grad():
                out = type(self.base).forward(self.base, input_ids=input_ids[missing], **kwargs)
            for i, hidden in zip(missing, out.last_hidden_state):
                self.memo[keys[i]] = hidden
        return BaseModelOutputWithPast(last_hidden_state=torch.stack([self.memo[key] for key in keys]))

    def fill(self, rows, batch_size: int = 8) -> None:
        import torch

        for i in range(0, len(rows), batch_size):
            with torch.no_grad():
                self.base(input_ids=torch.tensor([r["input_ids"] for r in rows[i : i + batch_size]]))


def _spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def _mean_std(values):
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}  # fmt: skip


def _args(output_dir, **kwargs):
    from hf_minitron import DistillationConfig

    defaults = dict(
        output_dir=str(output_dir), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
        lr_scheduler_type="constant",
    )  # fmt: skip
    return DistillationConfig(**{**defaults, **kwargs})


# ---------------------------------------------------------------------------------------------- 1. bytes per token
def write_caches(teacher, tokenizer, train, memo, modes, batch_size: int) -> dict:
    from hf_minitron import cache_teacher
    from hf_minitron.distillation.teacher_cache import read_cache_info

    shutil.rmtree(CACHES, ignore_errors=True)
    result, caches = {}, {}
    with memo:
        for name in modes:
            settings = CACHE_MODES[name]
            cache = cache_teacher(teacher, train, CACHES / name, tokenizer=tokenizer, show_progress=False, **settings)
            info = read_cache_info(CACHES / name)
            result[name] = {
                "settings": settings,
                "bytes_per_token": info["bytes_per_token"],
                "teacher_bytes_per_token": info["teacher_bytes_per_token"],
                "bytes": info["bytes"],
                "tokens": info["tokens"],
            }
            caches[name] = cache
            print(f"  {name}: {info['bytes_per_token']:.1f} bytes/token "
                  f"({info['teacher_bytes_per_token']:.1f} teacher values)", flush=True)  # fmt: skip
    # Read times at the training batch and at larger ones (`READ_BATCHES`), in interleaved rounds whose order alternates
    # (each cache once per round, the best round kept), so that load from other jobs and drift fall on every cache alike.
    batch_sizes = sorted({min(m * batch_size, len(train)) for m in READ_BATCHES})
    for size in batch_sizes:
        best = dict.fromkeys(caches, float("inf"))
        for round_ in range(READ_ROUNDS):
            for name, cache in list(caches.items())[:: 1 if round_ % 2 else -1]:
                best[name] = min(best[name], read_time(cache, size))
        for name, seconds in best.items():
            result[name].setdefault("read_ms_per_sample", {})[size] = seconds * 1e3 / size
            if size == batch_size:
                result[name]["read_ms_per_batch"] = seconds * 1e3
            print(f"  {name}: read {seconds * 1e3:.2f} ms per batch of {size}", flush=True)
    return result


def read_time(cache, batch_size: int = 4) -> float:
    """Seconds per batch to read a cache as the trainer does: a batch of rows from the Arrow shards (`__getitems__`, as
    PyTorch's DataLoader fetches from a `datasets.Dataset`), then the collator (which decodes a compressed cache's
    streams), over the whole cache."""
    from hf_minitron.distillation.trainer import DataCollatorForDistillation

    collator = DataCollatorForDistillation()
    start = time.perf_counter()
    for first in range(0, len(cache), batch_size):
        collator(cache.__getitems__(list(range(first, min(first + batch_size, len(cache))))))
    return (time.perf_counter() - start) / -(-len(cache) // batch_size)


# ---------------------------------------------------------------------------------------------- 2. step time
def speed(teacher, student, train, batch_size: int, warmup: int, rounds: int, modes=tuple(CACHE_MODES)) -> dict:
    import torch

    from hf_minitron import DistillationTrainer, load_teacher_cache
    from hf_minitron.distillation.trainer import DataCollatorForDistillation

    collate = DataCollatorForDistillation()
    tmp = tempfile.mkdtemp()
    steps = {}

    def make(name):
        model = copy.deepcopy(student).train().requires_grad_(True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        if name == "ce":
            rows = [train[j] for j in range(batch_size)]

            def step():
                model(**collate(rows)).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            return step
        data = train if name == "live" else load_teacher_cache(CACHES / name)
        trainer = DistillationTrainer(model=model, teacher_model=teacher if name == "live" else None,
                                      args=_args(tmp), train_dataset=data)  # fmt: skip

        def step():
            batch = collate([data[j] for j in range(batch_size)])  # collated inside the step, as the trainer does
            trainer.training_step(model, batch, batch["labels"][:, 1:].ne(-100).sum())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    methods = ["ce", "live", *modes]
    for name in methods:
        steps[name] = make(name)
    seconds = {m: [] for m in methods}
    for index in range(warmup + rounds):
        shift = index % len(methods)
        for name in methods[shift:] + methods[:shift]:
            start = time.perf_counter()
            steps[name]()
            if index >= warmup:
                seconds[name].append(time.perf_counter() - start)
        if index >= warmup:
            print(f"  round {index + 1 - warmup}/{rounds}: "
                  + ", ".join(f"{m} {s[-1]:.2f}s" for m, s in seconds.items()), flush=True)  # fmt: skip
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "batch_size": batch_size, "warmup": warmup, "rounds": rounds,
        "seconds_per_step": {m: _spread(s) for m, s in seconds.items()},
        "over_ce": {m: _spread([s[i] / seconds["ce"][i] for i in range(rounds)]) for m, s in seconds.items()
                    if m != "ce"},
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- 3. quality
def kl_to_teacher(student, validation, teacher_hidden, head, batch_size: int = 4) -> float:
    """Mean KL(teacher || student) per predicted token of `validation`, the teacher's logits from its stored hidden
    states."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    was_training = student.training
    student.eval()
    with torch.no_grad():
        for i in range(0, len(validation), batch_size):
            ids = torch.stack([s["input_ids"] for s in validation[i : i + batch_size]])
            logits = student(input_ids=ids).logits[:, :-1].float()
            target = F.linear(teacher_hidden[i : i + batch_size, :-1], head.weight, head.bias)[..., : logits.shape[-1]]
            total += F.kl_div(logits.log_softmax(-1), target.float().log_softmax(-1), log_target=True,
                              reduction="sum").item()  # fmt: skip
            count += ids.shape[0] * (ids.shape[1] - 1)
    student.train(was_training)
    return total / count


def quality(
    teacher,
    student,
    train,
    validation,
    memo,
    steps,
    batch_size,
    learning_rate,
    seeds,
    progress=None,
    arms=QUALITY_ARMS,
) -> dict:
    import torch
    from _common import held_out_loss

    from hf_minitron import DistillationTrainer, load_teacher_cache

    with memo, torch.no_grad():
        teacher_hidden = teacher.model(input_ids=torch.stack([s["input_ids"] for s in validation])).last_hidden_state
    head = teacher.get_output_embeddings()
    result = {
        "teacher": {"heldout_loss": held_out_loss(teacher, validation)},
        "before": {"heldout_loss": held_out_loss(student, validation),
                   "kl_to_teacher": kl_to_teacher(student, validation, teacher_hidden, head)},
        "arms": {},
    }  # fmt: skip
    tmp = tempfile.mkdtemp()
    runs = {arm: {"heldout_loss": [], "kl_to_teacher": [], "train_seconds": []} for arm in arms}
    for seed in seeds:  # seeds outermost: a run cut short still has every arm at the seeds it finished
        for arm in arms:
            model = copy.deepcopy(student).train().requires_grad_(True)
            extra = dict(kd_loss_weight=0.0, ce_loss_weight=1.0) if arm == "ce" else {}
            args = _args(tmp, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=learning_rate,
                         seed=seed, data_seed=seed, logging_steps=steps, **extra)  # fmt: skip
            live = arm in ("live", "ce")
            data = train if live else load_teacher_cache(CACHES / arm)
            start = time.perf_counter()
            with memo:
                DistillationTrainer(model=model, teacher_model=teacher if live else None, args=args,
                                    train_dataset=data).train()  # fmt: skip
            run = runs[arm]
            run["train_seconds"].append(time.perf_counter() - start)
            run["heldout_loss"].append(held_out_loss(model, validation))
            run["kl_to_teacher"].append(kl_to_teacher(model, validation, teacher_hidden, head))
            print(f"  seed {seed} {arm}: held-out loss {run['heldout_loss'][-1]:.4f}, KL to teacher "
                  f"{run['kl_to_teacher'][-1]:.4f} ({run['train_seconds'][-1]:.0f} s)", flush=True)  # fmt: skip
            if progress is not None:
                progress({**result, "runs": runs})
    shutil.rmtree(tmp, ignore_errors=True)
    return summarise(result, runs)


def summarise(result: dict, runs: dict) -> dict:
    """`result` with `arms`: each arm's mean ± std over seeds of `runs` (per-seed lists, the same seeds in the same
    order for every arm) and its difference to exact KD (the `live` arm), also paired by seed."""
    result = {**result, "arms": {}}
    for arm, run in runs.items():
        result["arms"][arm] = {"heldout_loss": _mean_std(run["heldout_loss"]),
                               "kl_to_teacher": _mean_std(run["kl_to_teacher"]),
                               "train_seconds": run["train_seconds"]}  # fmt: skip
    exact = result["arms"]["live"]
    for arm, r in result["arms"].items():
        if arm == "live":
            continue
        for key in ("heldout_loss", "kl_to_teacher"):
            delta = r[key]["mean"] - exact[key]["mean"]
            paired = [a - b for a, b in zip(r[key]["values"], exact[key]["values"])]
            r[key]["minus_exact"] = delta
            r[key]["minus_exact_paired"] = _mean_std(paired)
            # Within the seed spread of exact KD: the gap of the means is no larger than exact KD's std over seeds.
            r[key]["within_exact_spread"] = abs(delta) <= exact[key]["std"]
            # Paired by seed: a difference of the same sign on every seed is a systematic one, however small.
            r[key]["same_sign_every_seed"] = all(d > 0 for d in paired) or all(d < 0 for d in paired)
    return result


def merge(paths: list[str]) -> dict:
    """One result from runs of the same settings on different seeds (`--seed-list`, in parallel processes): the
    per-seed runs of each file's `quality` (or, for a run cut short, `quality_partial`) concatenated, in file order."""
    import json

    parts = [json.loads(Path(path).read_text()) for path in paths]
    runs = {arm: {"heldout_loss": [], "kl_to_teacher": [], "train_seconds": [], "seeds": []} for arm in QUALITY_ARMS}
    for part in parts:
        seeds = part["args"].get("seed_list") or list(range(part["args"]["seeds"]))
        if "quality" in part:
            quality = part["quality"]
            per_seed = {arm: {k: (r[k]["values"] if k != "train_seconds" else r[k]) for k in runs[arm] if k != "seeds"}
                        for arm, r in quality["arms"].items()}  # fmt: skip
        else:
            quality = part["quality_partial"]
            per_seed = quality["runs"]
        for arm, run in per_seed.items():
            done = len(run["heldout_loss"])
            for key in ("heldout_loss", "kl_to_teacher", "train_seconds"):
                runs[arm][key] += run[key][:done]
            runs[arm]["seeds"] += seeds[:done]
    # The arms are compared on the seeds exact KD finished: an arm that lacks one of them is left out (and named).
    common = set(runs["live"]["seeds"])
    unfinished = [arm for arm, run in runs.items() if not common <= set(run["seeds"])]
    runs = {arm: run for arm, run in runs.items() if arm not in unfinished}
    for run in runs.values():
        keep = [i for i, seed in enumerate(run["seeds"]) if seed in common]
        for key in run:
            run[key] = [run[key][i] for i in keep]
    first = parts[0]
    base = {k: v for k, v in first["quality" if "quality" in first else "quality_partial"].items() if k != "runs"}
    results = {k: v for k, v in first.items() if k not in ("quality", "quality_partial", "verdicts")}
    results["args"] = {**first["args"], "seed_list": runs["live"]["seeds"], "merged_from": paths}
    results["quality"] = summarise(base, {a: {k: v for k, v in r.items() if k != "seeds"} for a, r in runs.items()})
    results["quality"]["seeds"] = runs["live"]["seeds"]
    results["quality"]["unfinished_arms"] = unfinished
    results["wall_seconds_per_part"] = [p.get("wall_seconds") for p in parts]
    results["verdicts"] = verdicts(results)
    return results


# ---------------------------------------------------------------------------------------------- report
def verdicts(results: dict) -> list[str]:
    lines = []
    b = results.get("bytes")
    q = results.get("quality")
    if b:
        for name, limit in TARGETS.items():
            if name not in b:
                continue
            value = b[name]["bytes_per_token"]
            lines.append(
                f"{name}: {value:.1f} bytes/token (teacher values {b[name]['teacher_bytes_per_token']:.1f}) "
                f"{'<=' if value <= limit else '>'} target {limit}: {'met' if value <= limit else 'missed'}"
            )
        for raw, compressed in (("topk64", "topk64_uint8"), ("topk128", "topk128_uint8")):
            if "read_ms_per_sample" not in b.get(raw, {}) or "read_ms_per_sample" not in b.get(compressed, {}):
                continue
            ratios = {
                size: b[compressed]["read_ms_per_sample"][size] / ms
                for size, ms in b[raw]["read_ms_per_sample"].items()
            }
            slower = [str(size) for size, ratio in ratios.items() if ratio > 1]
            lines.append(
                f"{compressed} read / {raw} read: "
                + ", ".join(f"{ratio:.2f} at batch {size}" for size, ratio in ratios.items())
                + (f" (slower at batch {', '.join(slower)})" if slower else " (at least as fast at every batch)")
            )
    if q:
        exact = q["arms"]["live"]["heldout_loss"]
        for arm in ("sampled12", "sampled24", "sampled32", "topk64", "topk64_uint8", "topk128_uint8"):
            if arm not in q["arms"]:
                lines.append(f"{arm}: not finished on every seed of exact KD, left out")
                continue
            r = q["arms"][arm]
            h, k = r["heldout_loss"], r["kl_to_teacher"]
            lines.append(
                f"{arm}: held-out loss {h['mean']:.4f} ± {h['std']:.4f} vs exact {exact['mean']:.4f} ± "
                f"{exact['std']:.4f} (Δ {h['minus_exact']:+.4f}, paired {h['minus_exact_paired']['mean']:+.4f} ± "
                f"{h['minus_exact_paired']['std']:.4f}): {'within' if h['within_exact_spread'] else 'outside'} the "
                f"spread; KL to teacher Δ {k['minus_exact']:+.4f} (paired ± {k['minus_exact_paired']['std']:.4f})"
            )
    return lines


def print_tables(results: dict) -> None:
    b, s, q = results.get("bytes"), results.get("speed"), results.get("quality")
    print("\n| mode | bytes/token on disk | teacher values bytes/token | read ms/batch | KD step / CE step, median [min, "
          "max] |")  # fmt: skip
    print("|---|---|---|---|---|")
    if s:
        r = s["over_ce"]["live"]
        print(f"| live teacher | - | - | - | {r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}] |")
    for name in b:
        ratio = "-"
        if s:
            r = s["over_ce"][name]
            ratio = f"{r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]"
        read = b[name].get("read_ms_per_batch")
        read = "-" if read is None else f"{read:.2f}"
        print(
            f"| {name} | {b[name]['bytes_per_token']:.1f} | {b[name]['teacher_bytes_per_token']:.1f} | {read} | {ratio} |"
        )
    if q:
        a = q["arms"]
        n = len(a["live"]["heldout_loss"]["values"])
        print(f"\n| source | held-out loss, mean ± std ({n} seeds) | Δ vs exact (paired) | KL to teacher | "
              "Δ KL vs exact (paired) | within exact's spread | paired Δ loss, Δ KL: same sign every seed |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        print(f"| teacher | {q['teacher']['heldout_loss']:.4f} | - | 0 | - | - | - |")
        print(f"| student before KD | {q['before']['heldout_loss']:.4f} | - | {q['before']['kl_to_teacher']:.4f} | - "
              "| - | - |")  # fmt: skip
        for arm, r in a.items():
            h, k = r["heldout_loss"], r["kl_to_teacher"]
            if arm == "live":
                print(f"| live teacher (exact) | {h['mean']:.4f} ± {h['std']:.4f} | - | {k['mean']:.4f} ± "
                      f"{k['std']:.4f} | - | - | - |")  # fmt: skip
                continue
            hp, kp = h["minus_exact_paired"], k["minus_exact_paired"]
            print(f"| {arm} | {h['mean']:.4f} ± {h['std']:.4f} | {h['minus_exact']:+.4f} ({hp['mean']:+.4f} ± "
                  f"{hp['std']:.4f}) | {k['mean']:.4f} ± {k['std']:.4f} | {k['minus_exact']:+.4f} ({kp['mean']:+.4f} "
                  f"± {kp['std']:.4f}) | {'yes' if h['within_exact_spread'] else 'no'} | "
                  f"{'yes' if h['same_sign_every_seed'] else 'no'}, {'yes' if k['same_sign_every_seed'] else 'no'} |")  # fmt: skip
    print()
    for line in verdicts(results):
        print("- " + line)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(22, 5))
    b = results["bytes"]
    ax = axes[0]
    ax.bar(list(b), [r["bytes_per_token"] for r in b.values()], color="tab:red", label="whole cache")
    ax.bar(list(b), [r["teacher_bytes_per_token"] for r in b.values()], color="tab:orange", width=0.5,
           label="teacher values")  # fmt: skip
    for limit, style in ((40, ":"), (150, "--")):
        ax.axhline(limit, color="grey", linestyle=style, linewidth=0.8)
    ax.set_yscale("log")
    ax.set_title("Bytes per token (targets: 40 sampled K=12, 150 top-k k=64)")
    ax.tick_params(axis="x", labelsize=8, rotation=30)
    ax.legend(fontsize=8)
    if results.get("speed"):
        s = results["speed"]["over_ce"]
        ax = axes[1]
        keys = list(s)
        med = [s[k]["median"] for k in keys]
        err = [[s[k]["median"] - s[k]["min"] for k in keys], [s[k]["max"] - s[k]["median"] for k in keys]]
        ax.bar(keys, med, yerr=err, color="tab:purple", capsize=3)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"KD step / CE step ({results['speed']['rounds']} rounds, shared CPU)")
        ax.tick_params(axis="x", labelsize=8, rotation=30)
    if results.get("quality"):
        q = results["quality"]
        for ax, key, title in (
            (axes[2], "heldout_loss", "Held-out loss"),
            (axes[3], "kl_to_teacher", "Held-out KL(teacher || student)"),
        ):
            arms = list(q["arms"])
            means = [q["arms"][a][key]["mean"] for a in arms]
            stds = [q["arms"][a][key]["std"] for a in arms]
            ax.bar(arms, means, yerr=stds, color="tab:green", capsize=3)
            for i, a in enumerate(arms):
                ax.scatter([i] * len(q["arms"][a][key]["values"]), q["arms"][a][key]["values"], color="black", s=8)
            exact = q["arms"]["live"][key]
            ax.axhspan(exact["mean"] - exact["std"], exact["mean"] + exact["std"], color="grey", alpha=0.3)
            low, high = min(means) - 3 * max(stds + [1e-3]), max(means) + 3 * max(stds + [1e-3])
            ax.set_ylim(low, high)
            ax.set_title(
                f"{title} after {results['args'].get('max_steps') or results['args']['steps']} steps\n"
                "(mean ± std over seeds; band: exact KD ± std)"
            )
            ax.tick_params(axis="x", labelsize=8, rotation=30)
    for ax in [axes[1]] * (not results.get("speed")) + list(axes[2:]) * (not results.get("quality")):
        ax.axis("off")  # a section this run skipped
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Tiny settings: checks the script in a few minutes.")
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--max-steps",
        type=int,
        help="Train fewer steps than --steps on the same --steps x --batch-size samples (the caches stay the same).",
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--modes", help=f"Comma-separated caches to write (default: all of {list(CACHE_MODES)}).")
    parser.add_argument(
        "--arms", help=f"Comma-separated quality arms (default: all of {QUALITY_ARMS}; 'live' always)."
    )
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument(
        "--seed-list", help="Comma-separated seeds (instead of 0 .. --seeds - 1): one process per seed, then --merge."
    )
    parser.add_argument(
        "--caches", help="Read the caches another run of the same settings wrote (its folder) instead of writing them."
    )
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="Merge the quality runs of these outputs.")
    parser.add_argument("--output", default=str(RESULTS / "cache_modes.json"))
    args = parser.parse_args()
    args.seed_list = [int(s) for s in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
    args.modes = args.modes.split(",") if args.modes else list(CACHE_MODES)
    args.arms = ["live", *[a for a in args.arms.split(",") if a != "live"]] if args.arms else QUALITY_ARMS
    if args.merge:
        from hf_minitron.io import atomic_write_json

        results = merge(args.merge)
        atomic_write_json(args.output, results, indent=1)
        plot(results, Path(args.output).with_suffix(".png"))
        print_tables(results)
        return
    global CACHES
    CACHES = RESULTS / f".{Path(args.output).stem}_caches"  # one folder per output: runs in parallel do not collide
    if args.quick:
        args.steps, args.seeds, args.eval_samples, args.rounds, args.seq_length = 2, 2, 4, 1, 64
        args.output = str(RESULTS / ".cache_modes_quick.json")
        CACHES = RESULTS / ".cache_modes_quick_caches"

    import sys

    import torch

    sys.path.insert(0, str(HERE))
    from _common import as_tensors, num_parameters

    from hf_minitron import PrunedConfig, prune_model
    from hf_minitron.data import load_text_datasets
    from hf_minitron.embedded import load_default_teacher

    torch.set_num_threads(args.threads)
    started = time.time()
    timings = {}

    def timed(name, function, *function_args):
        start = time.perf_counter()
        print(f"{name} ...", flush=True)
        value = function(*function_args)
        timings[name] = time.perf_counter() - start
        return value

    teacher, tokenizer = load_default_teacher()
    teacher.eval().requires_grad_(False)
    train_samples = args.steps * args.batch_size
    data = load_text_datasets("stdlib", tokenizer, args.seq_length,
                              max_train_samples=args.calibration_samples + train_samples,
                              max_eval_samples=args.eval_samples)  # fmt: skip
    calibration = data["train"].select(range(args.calibration_samples))
    train = data["train"].select(range(args.calibration_samples, len(data["train"])))
    validation = as_tensors(data["validation"])
    config = PrunedConfig(**STUDENT, calibration_samples=args.calibration_samples, calibration_batch_size=8)
    student = timed("prune", lambda: prune_model(copy.deepcopy(teacher), config, calibration, show_progress=False))
    results = {
        "args": vars(args),
        "setup": {
            "teacher_parameters": num_parameters(teacher), "student_parameters": num_parameters(student),
            "student": STUDENT, "corpus": "stdlib", "train_samples": len(train), "train_tokens": len(train) *
            args.seq_length, "validation_samples": len(validation), "threads": args.threads,
        },
    }  # fmt: skip
    memo = MemoizedTeacher(teacher)
    if args.caches:  # another run's caches of the same settings: the teacher runs only for the live arm
        from hf_minitron.distillation.teacher_cache import read_cache_info

        CACHES = Path(args.caches)
        results["bytes"] = {}
        for name in args.modes:
            settings = CACHE_MODES[name]
            info = read_cache_info(CACHES / name)
            results["bytes"][name] = {"settings": settings, "read_from": str(CACHES / name)} | {
                key: info[key] for key in ("bytes_per_token", "teacher_bytes_per_token", "bytes", "tokens")
            }
    else:
        with memo:
            timed("teacher pass", memo.fill, [train[i] for i in range(len(train))])
        results["bytes"] = timed("bytes", write_caches, teacher, tokenizer, train, memo, args.modes, args.batch_size)
    if not args.skip_speed:
        results["speed"] = timed(
            "speed", speed, teacher, student, train, args.batch_size, args.warmup, args.rounds, args.modes
        )
    if not args.skip_quality:
        seeds = args.seed_list
        from hf_minitron.io import atomic_write_json

        def progress(partial):  # the runs so far, should the measurement be cut short
            atomic_write_json(
                RESULTS / f".{Path(args.output).stem}.partial.json", {**results, "quality_partial": partial}
            )

        steps = args.max_steps or args.steps
        results["quality"] = timed("quality", quality, teacher, student, train, validation, memo, steps,
                                   args.batch_size, args.learning_rate, seeds, progress, args.arms)  # fmt: skip
    results["verdicts"] = verdicts(results)
    results["seconds"] = timings
    results["wall_seconds"] = time.time() - started
    if not args.caches:
        shutil.rmtree(CACHES, ignore_errors=True)
    from hf_minitron.io import atomic_write_json

    atomic_write_json(args.output, results, indent=1)
    plot(results, Path(args.output).with_suffix(".png"))
    print_tables(results)
    print(f"\ntotal {results['wall_seconds']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})")


if __name__ == "__main__":
    main()
