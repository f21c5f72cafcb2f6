"""What `hf-minitron run` prints: a timed heading per stage, the closing teacher-vs-student table and the wall time of
each stage."""

import json
import logging
import time
from datetime import datetime
from pathlib import Path

from .run_config import MinitronArguments


# ---------------------------------------------------------------------------------------------- what the run prints
_STAGE_TITLES = {
    "teacher_correction": "Teacher correction (fine-tuning on the data)",
    "pruned": "Importance estimation and pruning",
    "distilled": "Distillation from the teacher",
    "on_policy": "On-policy distillation (the student samples, the teacher scores)",
    "sft": "SFT (supervised fine-tuning)",
    "dpo": "DPO / RPO (preference optimisation)",
    "evaluation": "Evaluation of teacher and student",
    "final": "Final folder: checkpoint, model card and plots",
    "push": "Upload to the Hub",
}


STAGE_TIMES = "stage_times.json"


def stage_titles(args: MinitronArguments, alignment) -> dict[str, str]:
    names = ["teacher_correction"] if args.correct_teacher else []
    names += ["pruned", "distilled", *(stage.name for stage in alignment or []), "evaluation", "final"]
    names += ["push"] if args.push_to_hub else []
    return {name: _STAGE_TITLES[name] for name in names}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


class StageLog:
    """Prints a heading with the time when each stage starts (or that it was reused), and keeps each stage's wall
    time in `output_dir/stage_times.json`, so that a rerun can still say what the reused stages took."""

    def __init__(self, root: Path, titles: dict[str, str], report: bool):
        self.root, self.titles, self.report, self.keep_times = root, titles, report, False
        try:
            self.previous = json.loads((root / STAGE_TIMES).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.previous = {}
        self.times: dict[str, dict] = {}
        self._started: dict[str, float] = {}

    def begin(self, name: str, reused: bool, output) -> None:
        if reused:
            seconds = (self.previous.get(name) or {}).get("seconds")
            self.times[name] = {"seconds": seconds, "reused": True}
        else:
            self._started[name] = time.monotonic()
        if not self.report:
            return
        number = f"{list(self.titles).index(name) + 1}/{len(self.titles)}"
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        if reused:
            took = self.times[name]["seconds"]
            detail = f"reused {output} (finished earlier with these settings" + (
                f", took {_duration(took)})" if took is not None else ")"
            )
            print(f"[{stamp}] {number} {self.titles[name]}: {detail}", flush=True)
        else:
            print(f"\n=== [{stamp}] {number} {self.titles[name]} -> {output}", flush=True)

    def end(self, name: str) -> None:
        if name not in self._started:
            return
        self.times[name] = {"seconds": time.monotonic() - self._started.pop(name), "reused": False}
        if self.keep_times:
            from ..io import atomic_write_json

            atomic_write_json(self.root / STAGE_TIMES, {**self.previous, **self.times})


def print_run_summary(summary: dict, console=None) -> None:
    """The closing report of `hf-minitron run`: teacher vs student (parameters, held-out loss and perplexity, task
    scores) and the wall time of each stage."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    evaluation = summary.get("evaluation") or {}
    models = evaluation.get("models", {})
    if "teacher" in models and "student" in models:
        teacher, student = models["teacher"], models["student"]
        table = Table(title="Teacher vs student")
        table.add_column("", no_wrap=True)
        for column in ("teacher", "student"):
            table.add_column(column, justify="right", overflow="fold")  # a long path wraps, whole
        table.add_row(
            "model", summary.get("teacher_name") or teacher["name"], summary.get("model_name") or student["name"]
        )
        t, s = teacher["num_parameters"], student["num_parameters"]
        table.add_row("parameters", f"{t:,}", f"{s:,} ({s / t:.0%})")
        if "heldout" in teacher and "heldout" in student:
            tokens = teacher["heldout"]["num_tokens"]
            table.add_row(
                f"held-out loss ({tokens:,} tokens)",
                f"{teacher['heldout']['loss']:.3f}",
                f"{student['heldout']['loss']:.3f}",
            )
            table.add_row(
                "held-out perplexity",
                f"{teacher['heldout']['perplexity']:.1f}",
                f"{student['heldout']['perplexity']:.1f}",
            )
        for task, info in evaluation.get("tasks", {}).items():
            metric = info["metric"]
            table.add_row(
                f"{task} {metric} (n={info['num_samples']})",
                f"{teacher['results'][task]['metrics'][metric]:.3f}",
                f"{student['results'][task]['metrics'][metric]:.3f}",
            )
        console.print(table)
    times = summary.get("stage_times") or {}
    if times:
        table = Table(title="Wall time per stage")
        table.add_column("stage", no_wrap=True)
        table.add_column("wall time", justify="right")
        for name, entry in times.items():
            # A reused stage shows what it took when it ran, marked as such: no column that is empty in a fresh run.
            took = _duration(entry["seconds"]) + (" (reused)" if entry["reused"] else "")
            table.add_row(_STAGE_TITLES.get(name, name), took)
        total = sum(entry["seconds"] or 0 for entry in times.values() if not entry["reused"])
        table.add_row("this run", _duration(total))
        console.print(table)


def quiet_third_party_output() -> None:
    """For the command line: leaves our stage headings, the trainers' progress bars and losses, and real warnings,
    without the per-file loading/saving bars of transformers, the map bars of datasets, and notices that ask nothing
    of the user (DeepSpeed's accelerator guess on a CPU, pin_memory without an accelerator, TRL's use of a
    deprecated transformers argument)."""
    import warnings

    warnings.filterwarnings("ignore", message=".*'pin_memory' argument is set as true but no accelerator is found")
    warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)
    # A filter on the logger itself survives DeepSpeed's own set-up of it (handlers and level) at import.
    logging.getLogger("DeepSpeed").addFilter(lambda record: "Setting accelerator to CPU" not in record.getMessage())
    import datasets
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()
