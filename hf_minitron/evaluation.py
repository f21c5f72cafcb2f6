"""Evaluation: lm-eval benchmarks, held-out perplexity, and teacher-vs-student comparisons.

The Minitron papers compare a pruned and distilled student to its teacher on downstream benchmarks
([paper 1](https://arxiv.org/abs/2407.14679), Table 2; [paper 2](https://arxiv.org/abs/2408.11796), Table 1) and
track the LM loss on held-out data. This module runs in-memory models through
[lm-evaluation-harness](https://github.com/EleutherAI/lm-evaluation-harness) (`evaluate_model`), measures held-out
perplexity without it (`heldout_perplexity`), puts teacher and student side by side (`compare_models`,
`format_comparison`), and turns an lm-eval task into a `model -> float` scorer that depth selection and the
architecture search can maximise (`make_lm_eval_scorer`).

The papers' benchmarks (`PAPER_TASKS`) are downloaded from the Hub by lm-eval. `pydoc_topics`, a multiple-choice task
built from CPython's bundled documentation, ships with the package (`hf_minitron/data/tasks/`) and runs offline.

One module, past 500 lines: lm-eval, held-out perplexity and the teacher-vs-student comparison produce and read one
results format.
"""

import logging
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import iter_samples, shard_batches
from .io import atomic_write_json
from .runtime import all_reduce_, dist_info, input_device


logger = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "data" / "tasks"
OFFLINE_TASKS = ("pydoc_topics",)
# Benchmarks and shot counts of paper 2, Table 1 (paper 1 uses the same settings for the tasks they share).
PAPER_TASKS = {"mmlu": 5, "winogrande": 5, "arc_challenge": 25, "hellaswag": 10, "gsm8k": 5, "truthfulqa_mc2": 0}
# The metric reported for a task when it has several; lm-eval's leaderboard conventions, `acc` otherwise.
PRIMARY_METRICS = {
    "arc_challenge": "acc_norm",
    "hellaswag": "acc_norm",
    "gsm8k": "exact_match,strict-match",
}


def _as_task_list(tasks: str | Iterable[str]) -> list[str]:
    task_list = [tasks] if isinstance(tasks, str) else list(tasks)
    if not task_list or not all(isinstance(t, str) and t for t in task_list):
        raise ValueError(
            f"tasks={tasks!r} is invalid: pass an lm-eval task name or a list of them, e.g. {list(OFFLINE_TASKS)} "
            f"(offline) or {list(PAPER_TASKS)} (the papers' benchmarks, downloaded from the Hub)."
        )
    return task_list


def get_task_manager(tasks: str | Iterable[str] = OFFLINE_TASKS, include_path: str | os.PathLike | None = None):
    """An lm-eval `TaskManager` that knows the tasks shipped with hf-minitron (and those under `include_path`, a
    folder of your own task YAMLs).

    Indexing lm-eval's ~15k built-in task configs takes seconds (8-13 s on a 2-core CPU), so they are only included
    when a requested task is neither ours nor under `include_path` (a group of yours that lists built-in tasks: name
    one built-in task too, so that they are indexed).
    """
    from lm_eval.tasks import TaskManager

    task_list = _as_task_list(tasks)
    paths = [str(TASKS_DIR)] + ([str(include_path)] if include_path is not None else [])
    if include_path is not None:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(t in local.all_tasks for t in task_list):
            return local
    return TaskManager(include_path=paths, include_defaults=any(t not in OFFLINE_TASKS for t in task_list))


def check_task_names(
    tasks: str | Iterable[str], include_path: str | os.PathLike | None = None, task_manager=None
) -> None:
    """Raises before any model is loaded if a task name is neither ours nor lm-eval's (a typo would otherwise fail
    after the models are loaded, deep inside lm-eval). `task_manager`: the one the tasks will run with, if built
    already (see `get_task_manager`)."""
    task_list = [t for t in _as_task_list(tasks)]
    if all(t in OFFLINE_TASKS for t in task_list) and include_path is None:
        return
    known = set((task_manager or get_task_manager(task_list, include_path)).all_tasks)
    unknown = [t for t in task_list if t not in known]
    if unknown:
        import difflib

        hints = {t: difflib.get_close_matches(t, known, n=3) for t in unknown}
        detail = "; ".join(
            f"{t!r} (did you mean {', '.join(map(repr, h))}?)" if h else repr(t) for t, h in hints.items()
        )
        raise ValueError(
            f"Unknown lm-eval task(s): {detail}. Use task names of lm-eval (`lm-eval --tasks list`) or ours "
            f"({list(OFFLINE_TASKS)}), or pass include_path for your own task YAMLs."
        )


def _fewshot_groups(task_list: list[str], num_fewshot: int | dict[str, int] | None) -> dict[int | None, list[str]]:
    """Tasks grouped by shot count: `simple_evaluate` takes one `num_fewshot` for all the tasks of a call."""
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, (int, dict, type(None))):
        raise ValueError(
            f"num_fewshot={num_fewshot!r} is invalid: pass an int for every task, a dict task -> int (e.g. "
            "hf_minitron.evaluation.PAPER_TASKS), or None for each task's default."
        )
    groups: dict[int | None, list[str]] = {}
    for task in task_list:
        shots = num_fewshot.get(task) if isinstance(num_fewshot, dict) else num_fewshot
        if shots is not None and (not isinstance(shots, int) or shots < 0):
            raise ValueError(f"num_fewshot for task {task!r} is {shots!r}: expected a non-negative integer or None.")
        groups.setdefault(shots, []).append(task)
    return groups


def _num_samples(name: str, raw: dict) -> int:
    """Evaluated documents of a task, or of all the subtasks of a group (e.g. the 57 of `mmlu`)."""
    if name in raw.get("n-samples", {}):
        return int(raw["n-samples"][name]["effective"])
    return sum(_num_samples(child, raw) for child in raw.get("group_subtasks", {}).get(name, []))


def _summarize(name: str, raw: dict) -> dict:
    entry = raw.get("results", {}).get(name) or raw.get("groups", {}).get(name)
    if entry is None:
        raise RuntimeError(f"lm-eval returned no results for task {name!r} (got {sorted(raw.get('results', {}))}).")
    metrics, stderr = {}, {}
    for key, value in entry.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue  # "alias", "name", "sample_len", and stderr "N/A" when it was not computed
        metric, filter_name = key.split(",", 1)
        if metric.endswith("_stderr"):
            metric = metric[: -len("_stderr")]
            stderr[metric if filter_name == "none" else f"{metric},{filter_name}"] = float(value)
        else:
            metrics[metric if filter_name == "none" else f"{metric},{filter_name}"] = float(value)
    if not metrics:
        raise RuntimeError(f"lm-eval returned no numeric metric for task {name!r}: {entry}.")
    primary = PRIMARY_METRICS.get(name)
    if primary not in metrics:
        primary = "acc" if "acc" in metrics else next(iter(metrics))
    return {
        "metrics": metrics,
        "stderr": stderr,
        "primary_metric": primary,
        "num_fewshot": raw.get("n-shot", {}).get(name),
        "num_samples": _num_samples(name, raw),
    }


def evaluate_model(
    model,
    tokenizer,
    tasks: str | Iterable[str] = OFFLINE_TASKS,
    num_fewshot: int | dict[str, int] | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    task_manager=None,
    bootstrap_iters: int = 100000,
    seed: int = 1234,
    return_raw: bool = False,
) -> dict:
    """Runs an in-memory model through lm-eval tasks.

    Args:
        model (`PreTrainedModel`):
            A causal LM, evaluated on its current device in `eval()` mode.
        tokenizer (`PreTrainedTokenizerBase`):
            Its tokenizer. lm-eval sets `pad_token` to `unk`/`eos` if the tokenizer has none.
        tasks (`str` or `list[str]`, *optional*, defaults to `("pydoc_topics",)`):
            lm-eval task or group names. `OFFLINE_TASKS` run without a network; `PAPER_TASKS` are the papers'.
        num_fewshot (`int` or `dict[str, int]`, *optional*):
            Shots for every task, or per task (e.g. `PAPER_TASKS`); `None` keeps each task's default.
        limit (`int` or `float`, *optional*):
            Documents per task (a float in (0, 1) is a fraction). For quick checks only: lm-eval takes the first ones.
        batch_size (`int`, *optional*, defaults to `8`):
            Requests per forward pass.
        max_length (`int`, *optional*):
            Longest context in tokens (left-truncated); defaults to the model's `max_position_embeddings`.
        task_manager (`lm_eval.tasks.TaskManager`, *optional*):
            Reuse one across calls (see `get_task_manager`); indexing lm-eval's built-in tasks takes seconds.
        bootstrap_iters (`int`, *optional*, defaults to `100000`):
            Bootstrap iterations for metrics whose standard error is not analytic; `0` skips standard errors.
        seed (`int`, *optional*, defaults to `1234`):
            Seed of few-shot sampling and of lm-eval's random generators.
        return_raw (`bool`, *optional*, defaults to `False`):
            Also return lm-eval's full output(s) under `"raw"`, one per distinct shot count.

    Returns:
        `dict`: `{task: {"metrics": {name: value}, "stderr": {name: value}, "primary_metric": str, "num_fewshot": int,
        "num_samples": int}}`. Metric names keep lm-eval's filter suffix unless it is `none`
        (`"acc"`, `"exact_match,strict-match"`).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    task_list = _as_task_list(tasks)
    groups = _fewshot_groups(task_list, num_fewshot)
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r} is invalid: expected a positive integer.")
    if task_manager is None:
        task_manager = get_task_manager(task_list)

    was_training = model.training
    notices = _LmEvalNotices()
    with notices:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    results, raws = {}, []
    try:
        for shots, group in groups.items():
            with notices:
                raw = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=group,
                    num_fewshot=shots,
                    limit=limit,
                    task_manager=task_manager,
                    bootstrap_iters=bootstrap_iters,
                    log_samples=False,
                    random_seed=seed,
                    numpy_random_seed=seed,
                    torch_random_seed=seed,
                    fewshot_random_seed=seed,
                )
            raws.append(raw)
            results.update({task: _summarize(task, raw) for task in group})
    finally:
        model.train(was_training)  # HFLM puts the model in eval mode
    if notices.truncated:
        logger.warning(
            "lm-eval cut %d request(s) to the model's %d-token context (the oldest tokens go first).",
            notices.truncated,
            lm.max_length,
        )
    if return_raw:
        results["raw"] = raws
    return results


class _LmEvalNotices(logging.Filter):
    """Holds back lm-eval's notices about how it is called, which say nothing to our user and come again for every
    model and task (an in-memory model passed as `pretrained`, task metadata hints), and counts its one-line-per-request
    truncation warnings, reported once by `evaluate_model`."""

    _LOGGERS = ("lm_eval.models.huggingface", "lm_eval.api.task", "lm_eval.evaluator")
    _NOTICES = (
        "`pretrained` model kwarg is not of type `str`",
        "Passed an already-initialized model through `pretrained`",
        "Custom kwargs can be passed to `--metadata`",
        "For example --metadata=",
    )

    def __init__(self):
        super().__init__()
        self.truncated = 0

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Combined length of context"):
            self.truncated += 1
            return False
        return not any(notice in message for notice in self._NOTICES)

    def __enter__(self):
        for name in self._LOGGERS:
            logging.getLogger(name).addFilter(self)
        return self

    def __exit__(self, *exc):
        for name in self._LOGGERS:
            logging.getLogger(name).removeFilter(self)


def primary_score(task_result: dict) -> float:
    """The value of a task's primary metric in an `evaluate_model` result."""
    return task_result["metrics"][task_result["primary_metric"]]


@torch.no_grad()
def loss_sums(model, samples: list[dict], batch_size: int = 8, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """`[summed loss, tokens]` (float64) of next-token cross-entropy over the unmasked tokens of this process's share
    of `samples` (every `world_size`-th batch from `rank`): the one held-out loss of the package, which
    `heldout_perplexity`, depth selection (`lm_loss`) and the search's ranking all reduce."""
    device = input_device(model)
    total = torch.zeros(2, dtype=torch.float64)
    for batch in shard_batches(samples, batch_size, rank, world_size):
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        total += torch.tensor([loss.item(), float((labels != -100).sum())], dtype=torch.float64)
    return total


@torch.no_grad()
def lm_loss(model, samples: list[dict], batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over the unmasked tokens of `samples`, summed across processes (each process
    takes its share of the batches)."""
    rank, world_size = dist_info()
    total = all_reduce_(loss_sums(model, samples, batch_size, rank, world_size), input_device(model))
    return float(total[0] / total[1].clamp_min(1))


@torch.no_grad()
def heldout_perplexity(model, dataset, batch_size: int = 8) -> dict:
    """Token-level cross-entropy and perplexity of `model` on tokenized held-out data.

    Every token after the first of each sample is predicted from the ones before it; padding (`attention_mask == 0`)
    is ignored. The mean is over tokens, not batches, so the result does not depend on `batch_size`.

    Args:
        model (`PreTrainedModel`):
            A causal LM, evaluated on the device of its parameters.
        dataset (`datasets.Dataset` or `list[dict]`):
            Samples with `input_ids` (and optionally `attention_mask`), e.g.
            `hf_minitron.data.embedded_datasets(tokenizer)["validation"]`.
        batch_size (`int`, *optional*, defaults to `8`):
            Samples per forward pass.

    Returns:
        `dict`: `{"loss": float, "perplexity": float, "num_tokens": int}`.
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r} is invalid: expected a positive integer.")
    samples = list(iter_samples(dataset))
    if not samples:
        raise ValueError("heldout_perplexity got an empty dataset: pass at least one tokenized sample.")
    was_training = model.training
    model.eval()
    try:
        total_loss, total_tokens = loss_sums(model, samples, batch_size)
    finally:
        model.train(was_training)
    total_tokens = int(total_tokens)
    if total_tokens == 0:
        raise ValueError("heldout_perplexity found no token to predict: samples need at least 2 unmasked tokens.")
    loss = float(total_loss / total_tokens)
    return {"loss": loss, "perplexity": math.exp(loss), "num_tokens": total_tokens}


def _num_parameters(model) -> int:
    # Tied embeddings are one tensor shared by two modules; parameters() yields it once.
    return sum(p.numel() for p in model.parameters())


def compare_models(
    teacher,
    student,
    tokenizer,
    tasks: str | Iterable[str] = OFFLINE_TASKS,
    num_fewshot: int | dict[str, int] | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    heldout_dataset=None,
    teacher_name: str = "teacher",
    student_name: str = "student",
    output_file: str | os.PathLike | None = None,
    teacher_tokenizer=None,
    report: bool = False,
    **evaluate_kwargs,
) -> dict:
    """Evaluates teacher and student on the same tasks (and held-out data) and returns them side by side.

    Args:
        teacher, student (`PreTrainedModel`):
            The models to compare. They share `tokenizer` (pruning keeps the vocabulary) unless `teacher_tokenizer`
            is given.
        tokenizer (`PreTrainedTokenizerBase`):
            The shared tokenizer (the student's).
        teacher_tokenizer (`PreTrainedTokenizerBase`, *optional*):
            The teacher's own tokenizer when it differs from the student's: the teacher's tasks are run with it.
            Held-out perplexity (per token) is then refused, as it is not comparable across tokenizers.
        tasks, num_fewshot, limit, batch_size:
            As in `evaluate_model`.
        heldout_dataset (`datasets.Dataset` or `list[dict]`, *optional*):
            Tokenized held-out samples for `heldout_perplexity`; skipped when `None`.
        teacher_name, student_name (`str`, *optional*):
            Labels of the models (e.g. Hub ids) in the result and tables.
        output_file (`str` or `os.PathLike`, *optional*):
            Where to write the result as JSON (main process only, atomically).
        report (`bool`, *optional*, defaults to `False`):
            Print a line as each evaluation starts (which model, which task or held-out set, how many samples): on a
            CPU each can take minutes.
        evaluate_kwargs:
            Passed on to `evaluate_model` (e.g. `max_length`, `seed`).

    Returns:
        `dict`: `{"tasks": {task: {"metric", "num_fewshot", "num_samples"}}, "models": {"teacher": {...},
        "student": {...}}}` where each model entry has `name`, `num_parameters`, `results` (the `evaluate_model`
        output) and, with `heldout_dataset`, `heldout` (the `heldout_perplexity` output). `format_comparison` renders
        it as a table; `hf_minitron.model_card` puts it in the card.
    """
    # No tasks is allowed when held-out data is given: the comparison is then held-out perplexity only.
    task_list = _as_task_list(tasks) if (tasks or heldout_dataset is None) else []
    if teacher_tokenizer is not None and heldout_dataset is not None:
        raise ValueError(
            "compare_models got a teacher_tokenizer (the models tokenize differently) and a heldout_dataset: "
            "perplexity per token cannot be compared across tokenizers. Drop heldout_dataset, or evaluate each alone."
        )
    task_manager = evaluate_kwargs.pop("task_manager", None) or (get_task_manager(task_list) if task_list else None)
    comparison = {"tasks": {}, "models": {}}
    models = (
        ("teacher", teacher, teacher_name, teacher_tokenizer or tokenizer),
        ("student", student, student_name, tokenizer),
    )
    for role, model, name, model_tokenizer in models:
        results = {}
        if task_list:
            if report:
                samples = "all" if limit is None else limit
                print(f"Evaluating the {role} ({name}) on {', '.join(task_list)} ({samples} samples each)", flush=True)
            results = evaluate_model(
                model,
                model_tokenizer,
                tasks=task_list,
                num_fewshot=num_fewshot,
                limit=limit,
                batch_size=batch_size,
                task_manager=task_manager,
                **evaluate_kwargs,
            )
            results.pop("raw", None)
        entry = {"name": name, "num_parameters": _num_parameters(model), "results": results}
        if heldout_dataset is not None:
            if report:
                print(f"Held-out loss of the {role} ({name}) on {len(heldout_dataset)} samples", flush=True)
            entry["heldout"] = heldout_perplexity(model, heldout_dataset, batch_size=batch_size)
        comparison["models"][role] = entry
    for task in task_list:
        result = comparison["models"]["teacher"]["results"][task]
        comparison["tasks"][task] = {
            "metric": result["primary_metric"],
            "num_fewshot": result["num_fewshot"],
            "num_samples": result["num_samples"],
        }
    if output_file is not None:
        save_json(comparison, output_file)
    return comparison


def save_json(obj, path: str | os.PathLike) -> None:
    """Writes `obj` as JSON on the main process, through a temporary file so readers never see a partial file."""
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    atomic_write_json(path, obj)


def comparison_rows(comparison: dict) -> list[list[str]]:
    """Rows of the teacher-vs-student table: header, one row per task, parameters, and held-out perplexity."""
    teacher, student = comparison["models"]["teacher"], comparison["models"]["student"]
    rows = [["Benchmark", "Metric", "Shots", f"Teacher ({teacher['name']})", f"Student ({student['name']})", "Δ"]]
    for task, info in comparison["tasks"].items():
        t = teacher["results"][task]["metrics"][info["metric"]]
        s = student["results"][task]["metrics"][info["metric"]]
        shots = "default" if info["num_fewshot"] is None else str(info["num_fewshot"])
        rows.append(
            [f"{task} (n={info['num_samples']})", info["metric"], shots, f"{t:.4f}", f"{s:.4f}", f"{s - t:+.4f}"]
        )
    if "heldout" in teacher and "heldout" in student:
        t, s = teacher["heldout"]["perplexity"], student["heldout"]["perplexity"]
        tokens = teacher["heldout"]["num_tokens"]
        rows.append([f"held-out (n={tokens} tokens)", "perplexity ↓", "-", f"{t:.3f}", f"{s:.3f}", f"{s - t:+.3f}"])
    t, s = teacher["num_parameters"], student["num_parameters"]
    rows.append(["parameters", "count", "-", f"{t:,}", f"{s:,}", f"{(s - t) / t:+.1%}"])
    return rows


def format_comparison(comparison: dict) -> str:
    """The teacher-vs-student comparison as a Markdown table."""
    rows = comparison_rows(comparison)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 3) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def print_comparison(comparison: dict, console=None) -> None:
    """Prints the teacher-vs-student comparison as a `rich` table."""
    from rich.console import Console
    from rich.table import Table

    rows = comparison_rows(comparison)
    table = Table(title="Teacher vs student")
    for i, header in enumerate(rows[0]):
        table.add_column(header, justify="right" if i >= 3 else "left")
    for row in rows[1:]:
        table.add_row(*row)
    (console or Console()).print(table)


def make_lm_eval_scorer(
    tokenizer,
    tasks: str | Iterable[str] = OFFLINE_TASKS,
    limit: int | float | None = None,
    num_fewshot: int | dict[str, int] | None = 0,
    batch_size: int = 8,
    **evaluate_kwargs,
) -> Callable:
    """A `model -> float` scorer (higher is better): the mean primary metric of `tasks`.

    Plugs into depth selection (`prune_model(..., depth_scorer=...)`, one call per candidate block or layer) and the
    architecture search, which call it on many candidate models, so the task manager is built once and standard
    errors are skipped.

    Args:
        tokenizer (`PreTrainedTokenizerBase`):
            The tokenizer of every model the scorer will see.
        tasks, limit, num_fewshot, batch_size:
            As in `evaluate_model`. Keep `limit` small: the scorer runs once per candidate.
        evaluate_kwargs:
            Passed on to `evaluate_model`.
    """
    task_list = _as_task_list(tasks)
    _fewshot_groups(task_list, num_fewshot)  # fail now, not at the first candidate
    task_manager = evaluate_kwargs.pop("task_manager", None) or get_task_manager(task_list)
    evaluate_kwargs.setdefault("bootstrap_iters", 0)

    def score(model) -> float:
        results = evaluate_model(
            model,
            tokenizer,
            tasks=task_list,
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size,
            task_manager=task_manager,
            **evaluate_kwargs,
        )
        return sum(primary_score(results[task]) for task in task_list) / len(task_list)

    return score


def make_perplexity_scorer(dataset, batch_size: int = 8) -> Callable:
    """A `model -> float` scorer (higher is better): minus the held-out LM loss of `heldout_perplexity`."""

    def score(model) -> float:
        return -heldout_perplexity(model, dataset, batch_size=batch_size)["loss"]

    return score
