"""On-policy distillation after KD against KD alone, at equal teacher compute, on a generative measure.

    python benchmarks/on_policy.py           # the default budget (3 seeds; ~30 min on a quiet 2-core CPU)
    python benchmarks/on_policy.py --quick   # tiny settings, to check the script

Teacher: the embedded SmolLM2-135M-Instruct. Student (`--student`): `mild` (the default), the teacher pruned to 24
layers (layers 19-24 dropped) and MLP 1024, which still completes code; or `small`, the student of `cache_modes.py`
(layers 5-24 dropped, hidden 288, MLP 768, 6 heads: 18% of the teacher, whose completions are mostly wrong). Data: the `stdlib` corpus (CPython's source,
in distribution for the teacher) packed to `--seq-length` tokens; its held-out modules are never trained on.

For each seed (which orders the training samples):

1. `kd_first`: `--steps` steps of `DistillationTrainer` from the live teacher (forward KL, the Minitron KD) on the
   first `steps x batch` training samples;
2. from that state, two arms, each a fresh trainer over the next `steps x batch` samples:
   - `kd`: `--steps` more KD steps;
   - `kd_then_on_policy`: `--steps` steps of the on-policy stage (`hf_minitron.distillation.on_policy`, TRL's
     `DistillationTrainer`, `beta` = `--beta`): the prompt of each sample is its first `--prompt-length` tokens, the
     student samples up to `seq_length - prompt_length` more, and the teacher scores prompt plus completion.

   A KD step has the teacher read `batch x seq_length` tokens; an on-policy step at most as many (prompt plus a
   completion that may stop early at EOS): the on-policy arm gets at most the teacher compute of the KD arm. It
   also pays the student's sampling, which is reported as wall time.

Both arms train at the same constant learning rate `--learning-rate`, unless `--on-policy-learning-rate` gives the
on-policy stage its own. Measured for the pruned student, `kd_first` and
both arms:

- the held-out loss (next-token cross-entropy on held-out modules, teacher-forced);
- **next-line completion of held-out function bodies**: `--lines` lines drawn (fixed seed) from the bodies of
  `def`s in the held-out modules (code: not blank, a comment, or inside or opening a triple-quoted string; at least 8
  characters), each
  with up to `--context` tokens of the file before it as the prompt. `exact_match`: the greedy completion, up to its
  first newline, equals the line (both stripped); `token_accuracy`: the share of the line's tokens that are the
  model's argmax given the true text before them (teacher-forced, so one early miss does not sink the rest).

The verdict compares the arms paired by seed: a difference counts when it has the same sign on every seed and exceeds
the spread (std over seeds) of the paired differences.

Writes `benchmarks/results/on_policy.json` and `.png`, and prints a Markdown table.
"""

import argparse
import copy
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path


HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ARMS = ("kd", "kd_then_on_policy")
MILD_STUDENT = dict(layers_to_drop=list(range(19, 25)), intermediate_size=1024)
MEASURES = ("heldout_loss", "exact_match", "token_accuracy")


# ---------------------------------------------------------------------------------------------- the generative measure
def function_body_lines(texts: list[str], count: int, seed: int = 0) -> list[tuple[str, str]]:
    """`count` `(text before the line, the line)` pairs: lines of `def` bodies in `texts` (see the module docstring),
    drawn with a fixed seed."""
    candidates = []
    for text in texts:
        lines = text.split("\n")
        offsets = [0]
        for line in lines:
            offsets.append(offsets[-1] + len(line) + 1)
        body_indent, in_string = None, None
        for i, line in enumerate(lines):
            stripped = line.strip()
            indent = len(line) - len(line.lstrip())
            inside = in_string is not None  # the line starts inside a triple-quoted string (a docstring: prose)
            for quote in ('"""', "'''"):
                if (in_string in (None, quote)) and line.count(quote) % 2:
                    in_string = None if in_string == quote else quote
            if inside or '"""' in line or "'''" in line:
                continue
            if stripped.startswith(("def ", "async def ")) and stripped.endswith(":"):
                body_indent = indent + 1  # the body is indented deeper than its `def`
                continue
            if body_indent is None or not stripped:
                continue
            if indent < body_indent:
                body_indent = None
                continue
            if len(stripped) >= 8 and not stripped.startswith("#") and i > 0:
                candidates.append((text[: offsets[i]], line))
    random.Random(seed).shuffle(candidates)
    return candidates[:count]


def encode_lines(tokenizer, pairs, context: int) -> list[dict]:
    """Each pair as token ids: `ids` (the last `context` tokens before the line's content, then the line), `start` (the
    first token of the line's content: a token that begins in the indentation belongs to the line) and `end`."""
    encoded = []
    for before, line in pairs:
        content_start = len(before) + len(line) - len(line.lstrip())
        text = before + line + "\n"
        tokens = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        ids, offsets = tokens["input_ids"], tokens["offset_mapping"]
        start = next(i for i, (_, stop) in enumerate(offsets) if stop > content_start)
        end = next((i for i, (first, _) in enumerate(offsets) if first >= len(before) + len(line)), len(ids))
        keep = max(0, start - context)
        encoded.append({"ids": ids[keep:end], "start": start - keep, "line": line.strip()})
    return encoded


def next_line_scores(model, tokenizer, lines: list[dict], batch_size: int = 8) -> dict:
    """Exact match (greedy, left-padded batches) and token accuracy (teacher-forced, right-padded batches)."""
    import torch

    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    exact, correct, total = 0, 0, 0
    with torch.no_grad():
        for first in range(0, len(lines), batch_size):
            chunk = lines[first : first + batch_size]
            width = max(len(item["ids"]) for item in chunk)
            ids = torch.full((len(chunk), width), pad)
            mask = torch.zeros_like(ids)
            for row, item in enumerate(chunk):
                ids[row, : len(item["ids"])] = torch.tensor(item["ids"])
                mask[row, : len(item["ids"])] = 1
            predicted = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
            for row, item in enumerate(chunk):
                start, end = item["start"], len(item["ids"])
                correct += int((predicted[row, start - 1 : end - 1] == ids[row, start:end]).sum())
                total += end - start
            prompt_width = max(item["start"] for item in chunk)
            prompts = torch.full((len(chunk), prompt_width), pad)
            prompt_mask = torch.zeros_like(prompts)
            for row, item in enumerate(chunk):  # left-padded: every prompt ends where generation starts
                prompts[row, prompt_width - item["start"] :] = torch.tensor(item["ids"][: item["start"]])
                prompt_mask[row, prompt_width - item["start"] :] = 1
            new_tokens = max(len(item["ids"]) - item["start"] for item in chunk) + 4
            generated = model.generate(
                prompts, attention_mask=prompt_mask, do_sample=False, max_new_tokens=new_tokens, pad_token_id=pad
            )
            for row, item in enumerate(chunk):
                text = tokenizer.decode(generated[row, prompt_width:], skip_special_tokens=True)
                exact += text.split("\n")[0].strip() == item["line"]
    return {"exact_match": exact / len(lines), "token_accuracy": correct / total}


def evaluate(model, tokenizer, validation, lines) -> dict:
    from _common import held_out_loss

    return {"heldout_loss": held_out_loss(model, validation)} | next_line_scores(model, tokenizer, lines)


# ---------------------------------------------------------------------------------------------- training
def kd(student, teacher, samples, steps, args, seed, output_dir):
    from hf_minitron import DistillationConfig, DistillationTrainer

    config = DistillationConfig(
        output_dir=str(output_dir), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
        lr_scheduler_type="constant", learning_rate=args.learning_rate, per_device_train_batch_size=args.batch_size,
        max_steps=steps, seed=seed, data_seed=seed, logging_steps=max(steps, 1),
    )  # fmt: skip
    student.train().requires_grad_(True)
    DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=samples).train()
    return student


def on_policy(student, teacher, tokenizer, samples, steps, args, seed, output_dir):
    from hf_minitron.distillation.on_policy import OnPolicyConfig, build_on_policy_trainer

    config = OnPolicyConfig(
        output_dir=str(output_dir), report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
        lr_scheduler_type="constant", learning_rate=args.on_policy_learning_rate or args.learning_rate,
        per_device_train_batch_size=args.batch_size, max_steps=steps, seed=seed, data_seed=seed,
        logging_steps=max(steps, 1), beta=args.beta,
        prompt_length=args.prompt_length, max_completion_length=args.seq_length - args.prompt_length,
    )  # fmt: skip
    student.train().requires_grad_(True)
    samples = samples.remove_columns([c for c in samples.column_names if c != "input_ids"])
    build_on_policy_trainer(student, teacher, config, samples, tokenizer).train()
    return student


# ---------------------------------------------------------------------------------------------- report
def _mean_std(values):
    return {"values": values, "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}  # fmt: skip


def summarise(runs: dict) -> dict:
    """Each stage's mean ± std over seeds, and the on-policy arm's paired difference to the KD arm."""
    summary = {name: {m: _mean_std([r[m] for r in per_seed]) for m in MEASURES} for name, per_seed in runs.items()}
    for measure in MEASURES:
        paired = [a[measure] - b[measure] for a, b in zip(runs["kd_then_on_policy"], runs["kd"], strict=True)]
        d = _mean_std(paired)
        d["same_sign_every_seed"] = all(x > 0 for x in paired) or all(x < 0 for x in paired)
        d["beyond_spread"] = d["same_sign_every_seed"] and abs(d["mean"]) > d["std"]
        summary.setdefault("on_policy_minus_kd", {})[measure] = d
    return summary


def verdicts(summary: dict) -> list[str]:
    better = {"heldout_loss": -1, "exact_match": 1, "token_accuracy": 1}
    lines = []
    for measure, d in summary["on_policy_minus_kd"].items():
        if not d["beyond_spread"]:
            word = "no difference beyond the seed spread"
        else:
            word = "on-policy better" if d["mean"] * better[measure] > 0 else "on-policy worse"
        lines.append(f"{measure}: on-policy minus KD {d['mean']:+.4f} ± {d['std']:.4f} (paired over seeds): {word}")
    return lines


def print_table(result: dict) -> None:
    s = result["summary"]
    n = len(s["kd"]["heldout_loss"]["values"])
    print(f"\n| model | held-out loss ({n} seeds) | next-line exact match | next-line token accuracy |")
    print("|---|---|---|---|")
    for name in ("teacher", "pruned"):
        r = result[name]
        print(f"| {name} | {r['heldout_loss']:.4f} | {r['exact_match']:.3f} | {r['token_accuracy']:.3f} |")
    for name in ("kd_first", *ARMS):
        r = s[name]
        print(f"| {name} | " + " | ".join(f"{r[m]['mean']:.4f} ± {r[m]['std']:.4f}" for m in MEASURES) + " |")
    d = s["on_policy_minus_kd"]
    print("| on-policy minus KD (paired) | " + " | ".join(f"{d[m]['mean']:+.4f} ± {d[m]['std']:.4f}" for m in MEASURES) + " |")  # fmt: skip
    print()
    for line in result["verdicts"]:
        print("- " + line)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    stages = ["kd_first", *ARMS]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, measure in zip(axes, MEASURES, strict=True):
        means = [s[st][measure]["mean"] for st in stages]
        stds = [s[st][measure]["std"] for st in stages]
        ax.bar(stages, means, yerr=stds, color=["#999", "#4a7", "#a47"], capsize=4)
        for st in stages:
            ax.scatter([st] * len(s[st][measure]["values"]), s[st][measure]["values"], color="k", s=8, zorder=3)
        ax.axhline(result["teacher"][measure], color="#447", ls="--", lw=1, label="teacher")
        ax.set_title(measure.replace("_", " "))
        ax.tick_params(axis="x", labelrotation=15)
        low = min(v - e for v, e in zip(means, stds, strict=True))
        high = max(max(v + e for v, e in zip(means, stds, strict=True)), result["teacher"][measure])
        ax.set_ylim(low - 0.1 * (high - low + 1e-3), high + 0.1 * (high - low + 1e-3))
    axes[0].legend()
    fig.suptitle(
        f"On-policy after KD vs KD alone, equal teacher tokens ({len(s['kd']['heldout_loss']['values'])} seeds)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------- main
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Tiny settings: checks the script in a few minutes.")
    parser.add_argument("--student", choices=["mild", "small"], default="mild")
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="Steps of the first KD stage, and of each arm after it.")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument(
        "--on-policy-learning-rate", type=float, help="The on-policy stage's learning rate (default: --learning-rate)."
    )
    parser.add_argument("--beta", type=float, default=1.0, help="The on-policy loss: 1 reverse KL, 0.5 JSD, 0 forward KL.")  # fmt: skip
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--lines", type=int, default=100)
    parser.add_argument("--context", type=int, default=192)
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(RESULTS / "on_policy.json"))
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seeds, args.eval_samples, args.lines, args.seq_length, args.prompt_length = 1, 2, 4, 4, 32, 16
        args.output = str(RESULTS / ".on_policy_quick.json")

    import torch

    sys.path.insert(0, str(HERE))
    from _common import as_tensors, num_parameters
    from cache_modes import STUDENT

    from hf_minitron import PrunedConfig, prune_model
    from hf_minitron.data import load_stdlib_corpus, load_text_datasets
    from hf_minitron.embedded import load_default_teacher
    from hf_minitron.io import atomic_write_json

    torch.set_num_threads(args.threads)
    started = time.time()
    teacher, tokenizer = load_default_teacher()
    teacher.eval().requires_grad_(False)
    per_stage = args.steps * args.batch_size
    data = load_text_datasets("stdlib", tokenizer, args.seq_length,
                              max_train_samples=args.calibration_samples + 2 * per_stage,
                              max_eval_samples=args.eval_samples)  # fmt: skip
    calibration = data["train"].select(range(args.calibration_samples))
    train = data["train"].select(range(args.calibration_samples, len(data["train"])))
    validation = as_tensors(data["validation"])
    lines = encode_lines(tokenizer, function_body_lines(load_stdlib_corpus()["validation"], args.lines), args.context)
    shape = MILD_STUDENT if args.student == "mild" else STUDENT
    config = PrunedConfig(**shape, calibration_samples=args.calibration_samples, calibration_batch_size=8)
    student = prune_model(copy.deepcopy(teacher), config, calibration, show_progress=False)
    result = {
        "args": vars(args),
        "setup": {"teacher_parameters": num_parameters(teacher), "student_parameters": num_parameters(student),
                  "student": shape, "corpus": "stdlib", "samples_per_stage": per_stage, "lines": len(lines),
                  "teacher_tokens_per_arm_at_most": per_stage * args.seq_length},
        "teacher": evaluate(teacher, tokenizer, validation, lines),
        "pruned": evaluate(student, tokenizer, validation, lines),
    }  # fmt: skip
    print("teacher", result["teacher"], "\npruned", result["pruned"], flush=True)
    runs = {name: [] for name in ("kd_first", *ARMS)}
    seconds = {name: [] for name in ("kd_first", *ARMS)}
    tmp = Path(tempfile.mkdtemp())
    for seed in range(args.seeds):
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        first, second = train.select(order[:per_stage]), train.select(order[per_stage : 2 * per_stage])
        start = time.perf_counter()
        base = kd(copy.deepcopy(student), teacher, first, args.steps, args, seed, tmp / "first")
        seconds["kd_first"].append(time.perf_counter() - start)
        runs["kd_first"].append(evaluate(base, tokenizer, validation, lines))
        for name in ARMS:
            start = time.perf_counter()
            if name == "kd":
                model = kd(copy.deepcopy(base), teacher, second, args.steps, args, seed, tmp / name)
            else:
                model = on_policy(copy.deepcopy(base), teacher, tokenizer, second, args.steps, args, seed, tmp / name)
            seconds[name].append(time.perf_counter() - start)
            runs[name].append(evaluate(model, tokenizer, validation, lines))
            print(f"seed {seed} {name}: {runs[name][-1]} ({seconds[name][-1]:.0f} s)", flush=True)
        atomic_write_json(RESULTS / f".{Path(args.output).stem}.partial.json", {**result, "runs": runs})
    result["runs"], result["train_seconds"] = runs, seconds
    result["summary"] = summarise(runs)
    result["verdicts"] = verdicts(result["summary"])
    result["wall_seconds"] = time.time() - started
    atomic_write_json(args.output, result, indent=1)
    plot(result, Path(args.output).with_suffix(".png"))
    print_table(result)
    print(f"\ntotal {result['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
