"""Model card of a Minitron student: what was pruned, how it was distilled, and how it compares to its teacher.

`PipelineSummary` collects what the pipeline knows (every field optional); `render_model_card` turns it into a
`huggingface_hub.ModelCard` from the Jinja template `minitron_card.md.j2`, with YAML front matter built by
`ModelCardData` (base model, tags, datasets, license, `model-index` results); `save_model_card` writes the card and its
plots next to the checkpoint on the main process: what was pruned (head importance per layer with the kept heads, MLP
neuron and embedding-channel importance with the cut-off, layer importance when depth was pruned) and the losses.

The template ships inside the package (`hf_minitron/templates/`); `model_cards/minitron_card.md.j2` at the top of
the repository is the same file, kept for readers and for copying into a custom template (a test keeps them equal).

One module, past 500 lines: the card's metadata, its tables and the plots it links are rendered from one
`PipelineSummary`; the plots are a few small functions that only the card uses.
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
HEAD_IMPORTANCE_PLOT = "head_importance.png"
NEURON_IMPORTANCE_PLOT = "mlp_importance.png"
HIDDEN_IMPORTANCE_PLOT = "embedding_importance.png"
LOSS_PLOT = "loss_curves.png"

# The rows of the pruning table besides each structure's `CARD_ROWS`.
_OTHER_ROWS = {"vocab_size": "Vocabulary"}
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
            Name or Hub id of the student (title, `model-index`), e.g. `SmolLM2-135M-Instruct-Minitron-80M`.
        model_id (`str`, *optional*):
            Where the quick start loads the student from: its Hub repository or a local path. Defaults to
            `model_name`.
        teacher_id (`str`, *optional*):
            Hub id of the teacher (`base_model` in the front matter, linked).
        teacher_name (`str`, *optional*):
            What the card calls a teacher that has no Hub id (e.g. its local path); defaults to `teacher_id`.
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
            One importance score per teacher layer (higher is more important), plotted as a bar chart when depth
            pruning removed layers.
        dropped_layers (`list[int]`, *optional*):
            0-based indices of the teacher layers that depth pruning removed.
        head_importance (`list[list[float]]`, *optional*):
            `[layers][heads]` query-head importance of the teacher, plotted as a heatmap.
        kept_heads (`dict[str, list[int]]`, *optional*):
            Per teacher layer (as a string, as in `pruning_record.json`), the heads kept; marked on the heatmap.
        neuron_importance (`list[list[float]]`, *optional*):
            `[layers][intermediate_size]` MLP-neuron importance, plotted sorted per layer.
        kept_neurons (`int`, *optional*):
            MLP neurons kept per layer: the cut-off of that plot.
        hidden_importance (`list[float]`, *optional*):
            Embedding-channel importance (one ranking for the whole model), plotted sorted.
        kept_hidden (`int`, *optional*):
            Embedding channels kept: the cut-off of that plot.
        teacher_correction (`dict`, *optional*):
            Settings of teacher correction (dataset, steps, tokens, learning rate, ...).
        distillation (`dict`, *optional*):
            Settings of distillation (loss, temperature, tokens, steps, learning rate, ...).
        log_history (`list[dict]`, *optional*):
            `Trainer.state.log_history` of distillation, plotted as loss curves.
        evaluation (`dict`, *optional*):
            The output of `hf_minitron.evaluation.compare_models`.
        on_policy (`dict`, *optional*):
            Settings of on-policy distillation after KD (GKD: the student samples, the teacher scores).
        alignment (`dict`, *optional*):
            Settings of instruction tuning / alignment after distillation.
    """

    model_name: str | None = field(default=None, metadata={"help": "Name or Hub id of the student."})
    model_id: str | None = field(default=None, metadata={"help": "Hub id or local path for the quick start."})
    teacher_id: str | None = field(default=None, metadata={"help": "Hub id of the teacher (base_model)."})
    teacher_name: str | None = field(default=None, metadata={"help": "Name of a teacher without a Hub id."})
    license: str | None = field(default=None, metadata={"help": "License of the student."})
    datasets: list[str] | None = field(default=None, metadata={"help": "Hub ids of the datasets used."})
    teacher_config: dict | None = field(default=None, metadata={"help": "Architecture before pruning."})
    student_config: dict | None = field(default=None, metadata={"help": "Architecture after pruning."})
    pruned_config: dict | None = field(default=None, metadata={"help": "PrunedConfig used for pruning."})
    teacher_parameters: int | None = field(default=None, metadata={"help": "Parameter count of the teacher."})
    student_parameters: int | None = field(default=None, metadata={"help": "Parameter count of the student."})
    layer_importance: list[float] | None = field(default=None, metadata={"help": "Importance score per layer."})
    dropped_layers: list[int] | None = field(default=None, metadata={"help": "Indices of removed layers."})
    head_importance: list[list[float]] | None = field(default=None, metadata={"help": "[layers][heads] scores."})
    kept_heads: dict[str, list[int]] | None = field(default=None, metadata={"help": "Kept heads per layer."})
    neuron_importance: list[list[float]] | None = field(default=None, metadata={"help": "[layers][neurons]."})
    kept_neurons: int | None = field(default=None, metadata={"help": "MLP neurons kept per layer."})
    hidden_importance: list[float] | None = field(default=None, metadata={"help": "Embedding-channel scores."})
    kept_hidden: int | None = field(default=None, metadata={"help": "Embedding channels kept."})
    teacher_correction: dict | None = field(default=None, metadata={"help": "Teacher-correction settings."})
    distillation: dict | None = field(default=None, metadata={"help": "Distillation settings."})
    log_history: list[dict] | None = field(default=None, metadata={"help": "Trainer log_history."})
    evaluation: dict | None = field(default=None, metadata={"help": "compare_models output."})
    on_policy: dict | None = field(default=None, metadata={"help": "On-policy distillation settings."})
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


def _sizes(config: dict) -> dict:
    """The sizes the pruning table compares. A shape summary (`pruning.summary.shape_summary`, keyed by `PrunedConfig`'s
    names) is taken as it is. A full config of a supported family is read as the pruner reads it: each structure the
    model has (`structures_in`) gives its sizes under `PrunedConfig`'s names (Mixtral's `intermediate_size` is its experts' width,
    `moe_intermediate_size`; Llama 4's `intermediate_size_mlp` is its dense MLPs' width, `intermediate_size`), a family
    whose layers differ (hybrids, Llama 4's `moe_layers`, DeepSeek-V3's dense first layers) its layers of each block
    type, and the vocabulary."""
    from .architectures import ARCHITECTURES, model_shape

    spec = ARCHITECTURES.get(config.get("model_type"))
    if spec is None:
        return config
    from transformers import CONFIG_MAPPING

    from .pruning.structures import depth, structures_in

    model_config = CONFIG_MAPPING[config["model_type"]].from_dict(config)
    names = {key for structure in structures_in(model_config, spec) for key in structure.CARD_ROWS}
    sizes = {key: config[key] for key in _OTHER_ROWS if key in config}
    sizes |= {key: value for key, value in model_shape(model_config).items() if key in names}
    by_type = depth.layer_counts_by_type(model_config)
    return sizes | ({"num_layers_by_type": by_type} if by_type else {})


def _pruning_rows(summary: PipelineSummary) -> list[tuple[str, str, str, str]]:
    from .pruning.structures import STRUCTURES, depth  # here: they import torch, and this module does not

    # Each structure's rows, in the order of the structures (paper 1, Table 1: depth, width: embedding, MLP,
    # attention heads; then experts and Mamba), each config key once.
    labels = {key: label for structure in STRUCTURES for key, label in structure.CARD_ROWS.items()} | _OTHER_ROWS
    rows = []
    before, after = summary.teacher_config or {}, summary.student_config or {}
    if before and after:
        before, after = _sizes(before), _sizes(after)
        by_type = before.get("num_layers_by_type"), after.get("num_layers_by_type")
        for key, label in labels.items():
            if before.get(key) is not None and after.get(key) is not None:
                b, a = before[key], after[key]
                rows.append((label, _fmt(b), _fmt(a), f"{a / b:.0%}" if b else "-"))
            if key in depth.CARD_ROWS and all(by_type):  # the layers of each block type, under the depth
                kept = by_type[1]
                for block, b in by_type[0].items():
                    a, name = kept.get(block, 0), depth.CARD_BLOCK_ROWS.get(block, f"{block} layers")
                    rows.append((name, _fmt(b), _fmt(a), f"{a / b:.0%}"))
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
    if pruned.get("num_layers_by_type"):
        targets = ", ".join(f"{block}: {count}" for block, count in pruned["num_layers_by_type"].items())
        rows.append(("Layers kept per block type", targets))
    if pruned.get("mamba_num_heads") is not None:
        aware = pruned.get("mamba_group_aware", True)
        rows.append(("Mamba heads", "ranked within each B/C group" if aware else "group-blind (baseline)"))
    merge = pruned.get("head_merge")
    if merge not in (None, False, "none"):  # a boolean in configs of earlier versions
        rows.append(("Head merging", f"{'o_proj' if merge is True else merge} (paper 1, §2.3)"))
    return [(k, _fmt(v)) for k, v in rows if v]


def _depth_description(summary: PipelineSummary) -> str | None:
    if not summary.dropped_layers:
        return None
    layers = ", ".join(str(i) for i in summary.dropped_layers)
    pruned = summary.pruned_config or {}
    method = pruned.get("depth_method")
    if pruned.get("depth_scorer"):
        contiguous = f"the contiguous block whose removal scored best on {pruned['depth_scorer']} (paper 2, §2.2)"
    elif pruned.get("contiguous_score") == "block_influence":
        contiguous = "the contiguous block of lowest block influence (1 - cosine of its input and output, paper 1)"
    else:
        contiguous = "the contiguous block whose removal raises the LM loss least (paper 2, §2.2)"
    how = {
        "contiguous": contiguous,
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
        ranked = "heads, MLP neurons, embedding channels and layers"
        if (summary.teacher_config or {}).get("mamba_num_heads"):
            ranked = (
                "Mamba heads (within each B/C group, as in [Minitron-SSM](https://arxiv.org/abs/2504.11409)) and head "
                f"channels, attention {ranked}"
            )
        steps.append(f"**Pruning**: {method} importance ranked {ranked}.")
    if summary.distillation is not None or summary.log_history:
        loss = (summary.distillation or {}).get("loss") or (summary.distillation or {}).get("kd_loss")
        steps.append(f"**Distillation** from the teacher's logits{f' ({loss})' if loss else ''}.")
    if summary.on_policy is not None:
        beta = summary.on_policy.get("beta")
        loss = {1.0: "reverse KL", 0.0: "forward KL"}.get(beta, f"generalised JSD, beta {beta}")
        steps.append(
            "**On-policy distillation** ([GKD](https://arxiv.org/abs/2306.13649)): the student continued prompts from "
            f"the training text and learned the teacher's distribution on its own samples ({loss})."
        )
    if summary.alignment is not None:
        steps.append("**Alignment** of the distilled model.")
    if summary.evaluation is not None:
        steps.append("**Evaluation** of teacher and student on the same benchmarks.")
    return steps


def _placeholder_id(model_name: str | None) -> str:
    name = model_name or "<student>"
    return name if "/" in name else f"<namespace>/{name}"


# The papers distil on ~94-100B tokens; far below this a student shows that the chain runs, not what it can do.
_SMOKE_TEST_TOKENS = 10**8


def _limitations(summary: PipelineSummary) -> list[str]:
    tokens = (summary.distillation or {}).get("tokens")
    lines = []
    if tokens is not None and tokens < _SMOKE_TEST_TOKENS:
        lines.append(
            f"**A smoke test, not a model to use.** It was distilled on {tokens:,} tokens; the Minitron papers distil "
            "on about 100 billion. At this budget the run shows that pruning and distillation work end to end: expect "
            "the student to be far worse than its teacher."
        )
    lines += [
        "It inherits its teacher's limitations and biases, its tokenizer, chat template and context length.",
        "Pruning removes capacity that distillation recovers only in part: check it on your own task before use; the "
        "numbers above cover only the benchmarks listed.",
    ]
    return lines


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
    pruning_plots: list[tuple[str, str]] | None = None,
):
    """The model card of `summary` as a `huggingface_hub.ModelCard` (no file is written).

    Args:
        summary (`PipelineSummary`):
            What to report; sections without data are left out.
        layer_importance_plot, loss_plot (`str`, *optional*):
            Paths of the plots relative to the card, shown as images when given.
        pruning_plots (`list[tuple[str, str]]`, *optional*):
            `(caption, path)` of the width-pruning plots (heads, MLP neurons, embedding channels).
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
        # A placeholder until `push` writes the repository's id (a local path would not load anywhere else).
        "repo_id": summary.model_id or _placeholder_id(summary.model_name),
        "teacher_id": summary.teacher_id,
        "teacher_name": summary.teacher_name,
        "steps": _steps(summary),
        "teacher_correction_rows": _rows(summary.teacher_correction),
        "importance_rows": _importance_rows(summary.pruned_config),
        "pruning_rows": _pruning_rows(summary),
        "depth_description": _depth_description(summary),
        "layer_importance_plot": layer_importance_plot,
        "pruning_plots": pruning_plots or [],
        "distillation_rows": _rows(summary.distillation),
        "loss_plot": loss_plot,
        "on_policy_rows": _rows(summary.on_policy),
        "alignment_rows": _rows(summary.alignment),
        "evaluation_table": evaluation_table,
        "has_heldout": all("heldout" in m for m in models.values()) and bool(models),
        "limitations": _limitations(summary),
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


def plot_head_importance(scores: list[list[float]], path: str | os.PathLike, kept: dict[str, list[int]] | None = None):
    """Heatmap of query-head importance, one column per layer and one row per head, with the kept heads marked by a
    dot. Written atomically to `path` (PNG)."""
    from matplotlib.figure import Figure

    num_layers, num_heads = len(scores), len(scores[0])
    fig = Figure(figsize=(max(5.0, 0.28 * num_layers + 2.5), max(2.5, 0.35 * num_heads + 1.2)))
    ax = fig.add_subplot()
    image = ax.imshow([list(row) for row in zip(*scores)], aspect="auto", cmap="viridis", origin="lower")
    fig.colorbar(image, ax=ax, label="importance")
    if kept:
        points = [(int(layer), head) for layer, heads in kept.items() for head in heads]
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=14, c="white", edgecolors="black", linewidths=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("query head")
    ax.set_title("Attention-head importance" + (" (dots: kept heads)" if kept else ""))
    _save_figure(fig, Path(path))


def plot_sorted_importance(
    scores: list[float] | list[list[float]], path: str | os.PathLike, kept: int | None, title: str, unit: str
):
    """Importance sorted from the most to the least important, with the cut-off at `kept` (a dashed line: what is on
    its right was pruned). `scores` is one ranking (`[n]`) or one per layer (`[layers][n]`: a line per layer, each
    scaled to its own maximum, as each layer is ranked on its own). Written atomically to `path` (PNG)."""
    from matplotlib import cm
    from matplotlib.figure import Figure

    rows = scores if scores and isinstance(scores[0], (list, tuple)) else [scores]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    for i, row in enumerate(rows):
        values = sorted((float(v) for v in row), reverse=True)
        top = values[0] if len(rows) > 1 and values[0] > 0 else 1.0
        color = cm.viridis(i / max(1, len(rows) - 1)) if len(rows) > 1 else "tab:blue"
        ax.plot(range(len(values)), [v / top for v in values], color=color, linewidth=0.8)
    if kept is not None:
        total = len(rows[0])
        ax.axvline(kept, color="tab:red", linestyle="--", label=f"cut-off: {kept:,} of {total:,} kept")
        ax.axvspan(kept, total, color="tab:red", alpha=0.08)
        ax.legend(loc="upper right")
    positive = all(float(v) > 0 for row in rows for v in row)
    if positive:
        ax.set_yscale("log")  # importance spans orders of magnitude; the tail is what pruning removes
    ax.set_xlabel(f"{unit} rank (most important first)")
    ax.set_ylabel("importance" + (" / layer maximum" if len(rows) > 1 else ""))
    ax.set_title(title + (" (one line per layer, dark = first)" if len(rows) > 1 else ""))
    _save_figure(fig, Path(path))


# Loss panels: what distillation minimises, and the student's cross-entropy on the data (a different scale).
_KD_KEYS = ("kd_loss", "eval_kd_loss")
_CE_KEYS = ("ce_loss", "eval_loss", "eval_ce_loss")
_LABELS = {
    "loss": "loss (total, train)",
    "kd_loss": "KD loss (train)",
    "eval_kd_loss": "KD loss (held-out)",
    "ce_loss": "cross-entropy (train)",
    "eval_loss": "cross-entropy (held-out)",
    "eval_ce_loss": "cross-entropy (held-out)",
    "is_loss": "intermediate-state loss (train)",
}


def _same_curve(a: tuple[list, list], b: tuple[list, list]) -> bool:
    # The Trainer logs `loss` and our `kd_loss` from different accumulators: equal up to rounding.
    return a[0] == b[0] and all(math.isclose(x, y, rel_tol=1e-3, abs_tol=1e-6) for x, y in zip(a[1], b[1]))


def loss_panels(log_history: list[dict]) -> dict[str, dict[str, tuple[list, list]]]:
    """The curves of [`plot_loss_curves`]: `{panel title: {label: (steps, values)}}`, panels without data left out."""
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
    for duplicate, kept in (("loss", "kd_loss"), ("eval_ce_loss", "eval_loss")):
        if duplicate in series and kept in series and _same_curve(series[duplicate], series[kept]):
            del series[duplicate]
    panels = {
        "Distillation loss (KL to the teacher)": [k for k in ("loss", *_KD_KEYS) if k in series],
        "Cross-entropy on the data (nats/token)": [k for k in _CE_KEYS if k in series],
    }
    panels["Other loss terms"] = [k for k in sorted(series) if not any(k in keys for keys in panels.values())]
    return {title: {key: series[key] for key in keys} for title, keys in panels.items() if keys}


def plot_loss_curves(log_history: list[dict], path: str | os.PathLike) -> bool:
    """Losses of a `Trainer.state.log_history` against the step, written to `path` (PNG): the KD loss (train and
    held-out) in one panel, the student's cross-entropy on the data (train and held-out `eval_loss`) in a second, and
    any other loss term (`is_loss`, `router_aux_loss`, ...) in a third, each on its own scale. `loss` is drawn only
    where it differs from `kd_loss` (with a KD-only objective the two are the same curve).

    Returns `False`, writing nothing, when no key ending in `loss` has a finite value.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = loss_panels(log_history)
    if not panels:
        return False
    fig = Figure(figsize=(5 * len(panels), 3.5))
    for i, (title, curves) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for key, (steps, values) in curves.items():
            held_out = key.startswith("eval_")
            ax.plot(
                steps,
                values,
                marker="o" if len(steps) < 20 or held_out else None,
                linestyle="--" if held_out else "-",
                label=_LABELS.get(key, key),
            )
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
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
    # Layer importance says what depth pruning removed: without removed layers it shows nothing that was pruned.
    if summary.layer_importance and summary.dropped_layers:
        plot_layer_importance(summary.layer_importance, output_dir / LAYER_IMPORTANCE_PLOT, summary.dropped_layers)
        importance_plot = LAYER_IMPORTANCE_PLOT
    pruning_plots = []
    if summary.head_importance:
        plot_head_importance(summary.head_importance, output_dir / HEAD_IMPORTANCE_PLOT, summary.kept_heads)
        pruning_plots.append(("Attention-head importance per layer, kept heads marked", HEAD_IMPORTANCE_PLOT))
    if summary.neuron_importance:
        plot_sorted_importance(
            summary.neuron_importance,
            output_dir / NEURON_IMPORTANCE_PLOT,
            summary.kept_neurons,
            "MLP-neuron importance",
            "neuron",
        )
        pruning_plots.append(("MLP-neuron importance with the cut-off", NEURON_IMPORTANCE_PLOT))
    if summary.hidden_importance:
        plot_sorted_importance(
            summary.hidden_importance,
            output_dir / HIDDEN_IMPORTANCE_PLOT,
            summary.kept_hidden,
            "Embedding-channel importance",
            "channel",
        )
        pruning_plots.append(("Embedding-channel importance with the cut-off", HIDDEN_IMPORTANCE_PLOT))
    if summary.log_history and plot_loss_curves(summary.log_history, output_dir / LOSS_PLOT):
        loss_plot = LOSS_PLOT
    card = render_model_card(summary, importance_plot, loss_plot, template_path, pruning_plots=pruning_plots)
    path = output_dir / "README.md"
    atomic_write_text(path, str(card))
    return path
