"""Model card of a Minitron student: what was pruned, how it was distilled, and how it compares to its teacher.

`PipelineSummary` collects what the pipeline knows (every field optional); `render_model_card` turns it into a
`huggingface_hub.ModelCard` from the Jinja template `minitron_card.md.j2`, with YAML front matter built by
`ModelCardData` (base model, tags, datasets, license, `model-index` results); `save_model_card` writes the card and its
plots (layer importance, loss curves) next to the checkpoint on the main process.

The template ships inside the package (`hf_minitron/templates/`); `model_cards/minitron_card.md.j2` at the top of
the repository is the same file, kept for readers and for copying into a custom template (a test keeps them equal).
"""

import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .io import atomic_file, atomic_write_text


TEMPLATE_PATH = Path(__file__).parent / "templates" / "minitron_card.md.j2"
TAGS = ["minitron", "pruning", "distillation", "hf-minitron"]
LAYER_IMPORTANCE_PLOT = "layer_importance.png"
LOSS_PLOT = "loss_curves.png"

# Pruning axes, in the order of paper 1, Table 1 (depth, width: embedding, MLP, attention heads).
_AXES = {
    "num_hidden_layers": "Layers (depth)",
    "hidden_size": "Hidden size (embedding)",
    "intermediate_size": "MLP intermediate size",
    "num_attention_heads": "Attention heads",
    "num_key_value_heads": "KV heads",
    "head_dim": "Head dimension",
    "num_local_experts": "Routed experts",
    "num_experts": "Routed experts",
    "num_experts_per_tok": "Experts per token",
    "moe_intermediate_size": "Expert FFN width",
    "shared_expert_intermediate_size": "Shared-expert width",
    "vocab_size": "Vocabulary",
}
# Hub dataset ids of the papers' benchmarks, so `model-index` entries link to them; other tasks keep their name.
_TASK_DATASETS = {
    "mmlu": ("cais/mmlu", "all"),
    "winogrande": ("allenai/winogrande", "winogrande_xl"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
    "hellaswag": ("Rowan/hellaswag", None),
    "gsm8k": ("openai/gsm8k", "main"),
    "truthfulqa_mc2": ("truthfulqa/truthful_qa", "multiple_choice"),
}


@dataclass
class PipelineSummary:
    """Everything the model card reports. Every field is optional; a card section is rendered only from what is given.

    Args:
        model_name (`str`, *optional*):
            Name or Hub id of the student (title, quick start, `model-index`).
        teacher_id (`str`, *optional*):
            Hub id of the teacher (`base_model` in the front matter).
        license (`str`, *optional*):
            License of the student, usually the teacher's.
        datasets (`list[str]`, *optional*):
            Hub ids of the calibration and distillation datasets.
        teacher_config (`dict` or `PretrainedConfig`, *optional*):
            Architecture before pruning.
        student_config (`dict` or `PretrainedConfig`, *optional*):
            Architecture after pruning.
        pruned_config (`dict` or `PrunedConfig`, *optional*):
            The pruning targets and importance options.
        teacher_parameters (`int`, *optional*):
            Parameter count of the teacher.
        student_parameters (`int`, *optional*):
            Parameter count of the student.
        layer_importance (`list[float]`, *optional*):
            One importance score per teacher layer (higher is more important), plotted as a bar chart.
        dropped_layers (`list[int]`, *optional*):
            0-based indices of the teacher layers that depth pruning removed.
        teacher_correction (`dict`, *optional*):
            Settings of teacher correction (dataset, steps, tokens, learning rate, ...).
        distillation (`dict`, *optional*):
            Settings of distillation (loss, temperature, tokens, steps, learning rate, ...).
        log_history (`list[dict]`, *optional*):
            `Trainer.state.log_history` of distillation, plotted as loss curves.
        evaluation (`dict`, *optional*):
            The output of `hf_minitron.evaluation.compare_models`.
        alignment (`dict`, *optional*):
            Settings of instruction tuning / alignment after distillation.
    """

    model_name: str | None = field(default=None, metadata={"help": "Name or Hub id of the student."})
    teacher_id: str | None = field(default=None, metadata={"help": "Hub id of the teacher (base_model)."})
    license: str | None = field(default=None, metadata={"help": "License of the student."})
    datasets: list[str] | None = field(default=None, metadata={"help": "Hub ids of the datasets used."})
    teacher_config: dict | None = field(default=None, metadata={"help": "Architecture before pruning."})
    student_config: dict | None = field(default=None, metadata={"help": "Architecture after pruning."})
    pruned_config: dict | None = field(default=None, metadata={"help": "PrunedConfig used for pruning."})
    teacher_parameters: int | None = field(default=None, metadata={"help": "Parameter count of the teacher."})
    student_parameters: int | None = field(default=None, metadata={"help": "Parameter count of the student."})
    layer_importance: list[float] | None = field(default=None, metadata={"help": "Importance score per layer."})
    dropped_layers: list[int] | None = field(default=None, metadata={"help": "Indices of removed layers."})
    teacher_correction: dict | None = field(default=None, metadata={"help": "Teacher-correction settings."})
    distillation: dict | None = field(default=None, metadata={"help": "Distillation settings."})
    log_history: list[dict] | None = field(default=None, metadata={"help": "Trainer log_history."})
    evaluation: dict | None = field(default=None, metadata={"help": "compare_models output."})
    alignment: dict | None = field(default=None, metadata={"help": "Alignment settings."})

    def __post_init__(self):
        # Configs may be given as objects (PretrainedConfig, PrunedConfig); the card and JSON need plain dicts.
        for name in ("teacher_config", "student_config", "pruned_config"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                value = value.to_dict() if hasattr(value, "to_dict") else asdict(value)
                setattr(self, name, value)
        if isinstance(self.datasets, str):
            self.datasets = [self.datasets]
        if self.layer_importance is not None:
            self.layer_importance = [float(x) for x in self.layer_importance]
            if not self.layer_importance:
                raise ValueError("PipelineSummary.layer_importance=[] is empty: pass one score per layer, or None.")
        if self.dropped_layers is not None:
            self.dropped_layers = sorted(int(i) for i in self.dropped_layers)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------- card sections
def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _rows(settings: dict | None) -> list[tuple[str, str]]:
    return [(str(key), _fmt(value)) for key, value in (settings or {}).items() if value is not None]


def _pruning_rows(summary: PipelineSummary) -> list[tuple[str, str, str, str]]:
    rows = []
    before, after = summary.teacher_config or {}, summary.student_config or {}
    if before and after:
        for key, label in _AXES.items():
            if before.get(key) is not None and after.get(key) is not None:
                b, a = before[key], after[key]
                rows.append((label, _fmt(b), _fmt(a), f"{a / b:.0%}" if b else "-"))
    t, s = summary.teacher_parameters, summary.student_parameters
    if t and s:
        rows.append(("Parameters", _fmt(t), _fmt(s), f"{s / t:.1%}"))
    return rows


def _importance_rows(pruned: dict | None) -> list[tuple[str, str]]:
    if not pruned:
        return []
    rows = []
    if pruned.get("importance"):
        rows.append(("Method", pruned["importance"]))
    if pruned.get("importance") == "activation":
        # Paper 1, §2.2 and Table 11: per-token reduction, then across samples.
        seq, batch = pruned.get("sequence_aggregation"), pruned.get("batch_aggregation")
        if seq or batch:
            rows.append(("Aggregation (sequence, batch)", f"{seq}, {batch}"))
        if pruned.get("calibration_samples"):
            seq_len = pruned.get("calibration_seq_length")
            rows.append(
                ("Calibration", f"{_fmt(pruned['calibration_samples'])} samples × {seq_len} tokens" if seq_len else "")
            )
    if pruned.get("depth_method"):
        rows.append(("Depth selection", pruned["depth_method"]))
    if pruned.get("head_merge"):
        rows.append(("Head merging", "yes (paper 1, §2.3)"))
    return [(k, _fmt(v)) for k, v in rows if v]


def _depth_description(summary: PipelineSummary) -> str | None:
    if not summary.dropped_layers:
        return None
    layers = ", ".join(str(i) for i in summary.dropped_layers)
    method = (summary.pruned_config or {}).get("depth_method")
    how = {
        "contiguous": "the contiguous block whose removal costs least (paper 2, §2.2)",
        "block_influence": "the layers with the lowest block influence (1 - cosine similarity of input and output)",
        "lm_loss": "the layers whose removal alone increases the LM loss least (paper 1, §2.2)",
        "explicit": "given explicitly",
    }.get(method, "by importance")
    return f"Depth pruning removed layers {layers} (0-based) of the teacher: {how}."


def _steps(summary: PipelineSummary) -> list[str]:
    steps = []
    if summary.teacher_correction is not None:
        steps.append("**Teacher correction**: the teacher was fine-tuned lightly on the distillation data.")
    if summary.pruned_config or summary.student_config:
        method = (summary.pruned_config or {}).get("importance", "activation")
        steps.append(f"**Pruning**: {method} importance ranked heads, MLP neurons, embedding channels and layers.")
    if summary.distillation is not None or summary.log_history:
        loss = (summary.distillation or {}).get("loss") or (summary.distillation or {}).get("kd_loss")
        steps.append(f"**Distillation** from the teacher's logits{f' ({loss})' if loss else ''}.")
    if summary.alignment is not None:
        steps.append("**Alignment** of the distilled model.")
    if summary.evaluation is not None:
        steps.append("**Evaluation** of teacher and student on the same benchmarks.")
    return steps


def _eval_results(summary: PipelineSummary) -> list:
    from huggingface_hub import EvalResult

    evaluation = summary.evaluation
    if not evaluation or "student" not in evaluation.get("models", {}):
        return []
    results = []
    student = evaluation["models"]["student"]
    for task, info in evaluation["tasks"].items():
        metrics = student["results"][task]["metrics"]
        dataset, config = _TASK_DATASETS.get(task, (task, None))
        shots = info.get("num_fewshot")
        results.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=dataset,
                dataset_name=task,
                dataset_config=config,
                dataset_args={"num_few_shot": shots} if shots is not None else None,
                metric_type=info["metric"],
                metric_value=float(metrics[info["metric"]]),
                metric_name=f"{info['metric']} ({shots}-shot)" if shots is not None else info["metric"],
            )
        )
    heldout = student.get("heldout")
    if heldout:
        results.append(
            EvalResult(
                task_type="text-generation",
                dataset_type="held-out",
                dataset_name="held-out text",
                metric_type="perplexity",
                metric_value=float(heldout["perplexity"]),
            )
        )
    return results


def render_model_card(
    summary: PipelineSummary,
    layer_importance_plot: str | None = None,
    loss_plot: str | None = None,
    template_path: str | os.PathLike | None = None,
):
    """The model card of `summary` as a `huggingface_hub.ModelCard` (no file is written).

    Args:
        summary (`PipelineSummary`):
            What to report; sections without data are left out.
        layer_importance_plot, loss_plot (`str`, *optional*):
            Paths of the plots relative to the card, shown as images when given.
        template_path (`str` or `os.PathLike`, *optional*):
            A custom Jinja template; defaults to the packaged `minitron_card.md.j2`.
    """
    import jinja2
    from huggingface_hub import ModelCard, ModelCardData

    if isinstance(summary, dict):
        summary = PipelineSummary(**summary)
    eval_results = _eval_results(summary)
    title = summary.model_name or "Minitron student"
    card_data = ModelCardData(
        # model-index entries need a name; without results, an unnamed card keeps it out of the front matter.
        model_name=summary.model_name or (title if eval_results else None),
        base_model=summary.teacher_id,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=summary.license,
        datasets=summary.datasets,
        tags=list(TAGS),
        eval_results=eval_results or None,
    )
    evaluation_table = None
    if summary.evaluation:
        from .evaluation import format_comparison

        evaluation_table = format_comparison(summary.evaluation)
    models = (summary.evaluation or {}).get("models", {})
    context = {
        "card_data": card_data.to_yaml(),
        "title": title,
        "repo_id": summary.model_name or "<namespace>/<student>",
        "teacher_id": summary.teacher_id,
        "steps": _steps(summary),
        "teacher_correction_rows": _rows(summary.teacher_correction),
        "importance_rows": _importance_rows(summary.pruned_config),
        "pruning_rows": _pruning_rows(summary),
        "depth_description": _depth_description(summary),
        "layer_importance_plot": layer_importance_plot,
        "distillation_rows": _rows(summary.distillation),
        "loss_plot": loss_plot,
        "alignment_rows": _rows(summary.alignment),
        "evaluation_table": evaluation_table,
        "has_heldout": all("heldout" in m for m in models.values()) and bool(models),
    }
    template_str = Path(template_path or TEMPLATE_PATH).read_text(encoding="utf-8")
    # trim_blocks/lstrip_blocks: `{% if %}` lines leave no stray blank lines or indentation in the Markdown.
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    content = env.from_string(template_str).render(**context)
    return ModelCard(re.sub(r"\n{3,}", "\n\n", content))


# ------------------------------------------------------------------------------------------------------------ plots
def _save_figure(fig, path: Path) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_layer_importance(scores: list[float], path: str | os.PathLike, dropped_layers: list[int] | None = None):
    """Bar chart of per-layer importance; removed layers are highlighted. Written atomically to `path` (PNG)."""
    # Figure, not pyplot: no global state and no GUI backend, so it is safe in training jobs.
    from matplotlib.figure import Figure

    dropped = set(dropped_layers or [])
    fig = Figure(figsize=(max(4.0, 0.25 * len(scores) + 2), 3.2))
    ax = fig.add_subplot()
    colors = ["tab:red" if i in dropped else "tab:blue" for i in range(len(scores))]
    ax.bar(range(len(scores)), scores, color=colors)
    ax.set_xlabel("layer")
    ax.set_ylabel("importance")
    ax.set_title("Layer importance" + (" (red: removed)" if dropped else ""))
    _save_figure(fig, Path(path))


def plot_loss_curves(log_history: list[dict], path: str | os.PathLike) -> bool:
    """Training and evaluation losses of a `Trainer.state.log_history` against the step, written to `path` (PNG).

    Plots every key ending in `loss` that has at least one finite value (`loss`, `kd_loss`, `ce_loss`, `is_loss`,
    `eval_loss`, ...). Returns `False`, writing nothing, when there is none.
    """
    from matplotlib.figure import Figure

    series: dict[str, tuple[list, list]] = {}
    for entry in log_history:
        step = entry.get("step")
        for key, value in entry.items():
            # `train_loss` is the run's average, logged once at the end: not a point of the curve.
            if (
                key.endswith("loss")
                and key != "train_loss"
                and isinstance(value, (int, float))
                and math.isfinite(value)
                and step is not None
            ):
                series.setdefault(key, ([], []))
                series[key][0].append(step)
                series[key][1].append(value)
    if not series:
        return False
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    for key, (steps, values) in sorted(series.items()):
        ax.plot(steps, values, marker="o" if len(steps) < 20 else None, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Distillation losses")
    ax.legend()
    _save_figure(fig, Path(path))
    return True


def save_model_card(
    summary: PipelineSummary, output_dir: str | os.PathLike, template_path: str | os.PathLike | None = None
) -> Path | None:
    """Writes `README.md` and its plots into `output_dir` (the checkpoint folder) on the main process.

    Every file goes through a temporary file and `os.replace`, so a reader (or `push_to_hub`) never sees half a card.

    Returns:
        `Path` or `None`: the card's path on the main process, `None` elsewhere.
    """
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return None
    if isinstance(summary, dict):
        summary = PipelineSummary(**summary)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    importance_plot = loss_plot = None
    if summary.layer_importance:
        plot_layer_importance(summary.layer_importance, output_dir / LAYER_IMPORTANCE_PLOT, summary.dropped_layers)
        importance_plot = LAYER_IMPORTANCE_PLOT
    if summary.log_history and plot_loss_curves(summary.log_history, output_dir / LOSS_PLOT):
        loss_plot = LOSS_PLOT
    card = render_model_card(summary, importance_plot, loss_plot, template_path)
    path = output_dir / "README.md"
    atomic_write_text(path, str(card))
    return path
