"""The whole Minitron chain, stage by stage, resumable:

    correct teacher (optional) -> estimate importance -> prune -> distill -> evaluate teacher and student
    -> model card -> push (optional)

Alignment (SFT, DPO/RPO) runs on the final checkpoint with `recipes/sft.py` and `recipes/dpo.py`.

Every stage writes one directory under `output_dir` atomically; a stage whose directory exists is finished and is
reused, not recomputed, so rerunning the same command after an interruption continues at the first unfinished stage.

The YAML config has top-level `MinitronArguments` keys and one section per stage whose keys are exactly the fields
of that stage's dataclass: `pruning` (`PrunedConfig`), `distillation` (`DistillationConfig`), `teacher_correction`
(`TeacherCorrectionConfig`). `output_dir` of the trainer sections is set by the pipeline.
"""

import json
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from .data import EMBEDDED_CORPUS, load_text_datasets
from .pruning_config import PrunedConfig
from .validation import check_field_types, check_sequence_length, load_model_config


logger = logging.getLogger(__name__)

STAGES = ("teacher_correction", "pruned", "distilled", "evaluation", "final")


@dataclass
class MinitronArguments:
    """Top-level options of the Minitron pipeline.

    Args:
        teacher (`str`, *optional*, defaults to `"embedded"`): teacher checkpoint, Hub id, or `embedded` (SmolLM2).
        output_dir (`str`, *optional*, defaults to `"outputs/minitron"`): one sub-directory per stage.
        dataset (`str`, *optional*, defaults to `"embedded"`): distillation/calibration text: `embedded`, local
            text/jsonl/parquet/csv files, or a Hub dataset.
        text_column (`str`, *optional*, defaults to `"text"`): column holding the text.
        seq_length (`int`, *optional*, defaults to `256`): packed sample length for distillation and evaluation.
        max_train_samples (`int`, *optional*): cap on packed training samples.
        max_eval_samples (`int`, *optional*, defaults to `64`): packed validation samples for held-out loss.
        correct_teacher (`bool`, *optional*, defaults to `False`): fine-tune the teacher on the data first (paper 2).
        eval_tasks (`str`, *optional*, defaults to `"pydoc_topics"`): comma-separated lm-eval tasks; `""` skips.
        eval_limit (`int`, *optional*): samples per lm-eval task.
        write_model_card (`bool`, *optional*, defaults to `True`): render README.md with the results.
        push_to_hub (`bool`, *optional*, defaults to `False`): upload the final folder.
        hub_model_id (`str`, *optional*): repository id for the upload.
        hub_private (`bool`, *optional*, defaults to `True`): create the repository as private.
    """

    teacher: str = field(default="embedded", metadata={"help": "Teacher checkpoint, Hub id, or 'embedded'."})
    output_dir: str = field(default="outputs/minitron", metadata={"help": "Root directory; one folder per stage."})
    dataset: str = field(default=EMBEDDED_CORPUS, metadata={"help": "'embedded', local files, or a Hub dataset."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    seq_length: int = field(default=256, metadata={"help": "Packed sample length (tokens)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on packed training samples."})
    max_eval_samples: int = field(default=64, metadata={"help": "Packed validation samples for held-out loss."})
    correct_teacher: bool = field(default=False, metadata={"help": "Fine-tune the teacher on the data first."})
    eval_tasks: str = field(default="pydoc_topics", metadata={"help": "Comma-separated lm-eval tasks ('' skips)."})
    eval_limit: int | None = field(default=None, metadata={"help": "Samples per lm-eval task."})
    write_model_card: bool = field(default=True, metadata={"help": "Render the model card (README.md)."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the final folder to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository id for the upload."})
    hub_private: bool = field(default=True, metadata={"help": "Create the Hub repository as private."})

    def __post_init__(self):
        if self.seq_length < 2:
            raise ValueError(f"MinitronArguments.seq_length={self.seq_length} is invalid: use at least 2 tokens.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("MinitronArguments.push_to_hub=True needs hub_model_id (e.g. 'me/my-minitron-80m').")


SECTIONS = ("pruning", "distillation", "teacher_correction")


def _build(cls, values: dict, where: str, **forced):
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(
            f"Unknown key(s) {unknown} in the {where!r} section: valid keys are the fields of {cls.__name__}."
        )
    # A quoted number or a list where a number belongs would otherwise fail deep inside training, or not at all.
    values = check_field_types(cls, values, f"the {where!r} section of the recipe")
    return cls(**{**values, **forced})


def load_pipeline_config(path: str | os.PathLike, overrides: dict | None = None):
    """`(MinitronArguments, PrunedConfig, DistillationConfig, TeacherCorrectionConfig)` from a YAML file.

    `overrides` maps `key` or `section.key` to values (the CLI's `--section.key value`).
    """
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    for key, value in (overrides or {}).items():
        section, _, name = key.rpartition(".")
        (data.setdefault(section, {}) if section else data)[name] = value
    return build_pipeline_config(data)


def build_pipeline_config(data: dict):
    from .distillation_config import DistillationConfig
    from .teacher_correction import TeacherCorrectionConfig

    top = {k: v for k, v in data.items() if k not in SECTIONS}
    args = _build(MinitronArguments, top, "top level")
    root = Path(args.output_dir)
    pruning = _build(PrunedConfig, data.get("pruning") or {}, "pruning")
    distillation = _build(
        DistillationConfig,
        data.get("distillation") or {},
        "distillation",
        output_dir=str(root / "distill_checkpoints"),
    )
    correction = _build(
        TeacherCorrectionConfig,
        data.get("teacher_correction") or {},
        "teacher_correction",
        output_dir=str(root / "teacher_correction_checkpoints"),
        corrected_model_dir=str(root / "teacher_correction"),
    )
    return args, pruning, distillation, correction


def _done(directory: Path) -> bool:
    return (directory / "config.json").is_file()


def _datasets(args: MinitronArguments, tokenizer):
    data = load_text_datasets(
        args.dataset,
        tokenizer,
        args.seq_length,
        args.text_column,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
    )
    return data["train"], data.get("validation")


def run_pipeline(args: MinitronArguments, pruning: PrunedConfig, distillation, correction, show_progress=True) -> dict:
    """Runs (or resumes) the chain; returns the summary dict that also goes into the model card."""
    import torch
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checkpoint_pruning import PruneArguments, prune_checkpoint
    from .distillation_trainer import DistillationTrainer
    from .embedded import resolve_model_path
    from .evaluation import compare_models
    from .io import atomic_directory, atomic_save_model, resume_checkpoint

    state = PartialState()
    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    teacher_path = resolve_model_path(args.teacher)
    # Bad checkpoints and lengths fail here, in seconds, not after teacher correction or the importance pass.
    teacher_config = load_model_config(teacher_path)
    check_sequence_length(teacher_config, args.seq_length, "MinitronArguments.seq_length")
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    train, validation = _datasets(args, tokenizer)
    summary: dict = {
        "teacher": args.teacher,
        # The card's base_model: a Hub id, or the embedded teacher's upstream id.
        "teacher_hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct"
        if args.teacher in ("embedded", "smollm2")
        else (None if Path(args.teacher).exists() else args.teacher),
        "datasets": None
        if args.dataset == EMBEDDED_CORPUS or Path(args.dataset.split(",")[0]).exists()
        else [args.dataset],
        "hub_model_id": args.hub_model_id,
        "stages": {},
    }

    # 1. Teacher correction (paper 2): fine-tune the teacher on the distillation data before pruning.
    if args.correct_teacher:
        corrected = root / "teacher_correction"
        if not _done(corrected):
            from .teacher_correction import correct_teacher

            correct_teacher(teacher_path, correction, train_dataset=train, processing_class=tokenizer)
        teacher_path = str(corrected)
        summary["stages"]["teacher_correction"] = {"path": str(corrected), "max_steps": correction.max_steps}

    # 2. Importance estimation + pruning (one pass of forward hooks; scores saved next to the student).
    pruned_dir = root / "pruned"
    if not _done(pruned_dir):
        prune_checkpoint(
            PruneArguments(
                model=teacher_path,
                output=str(pruned_dir),
                calibration_data=args.dataset,
                text_column=args.text_column,
                overwrite=True,
            ),
            pruning,
            show_progress=show_progress,
        )
    summary["stages"]["pruning"] = json.loads((pruned_dir / "pruning_summary.json").read_text())
    summary["stages"]["pruning"]["pruned_config"] = pruning.to_dict()

    # 3. Distillation of the pruned student from the (corrected) teacher.
    distilled_dir = root / "distilled"
    if not _done(distilled_dir):
        student = AutoModelForCausalLM.from_pretrained(pruned_dir)
        teacher = AutoModelForCausalLM.from_pretrained(teacher_path)
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=distillation,
            train_dataset=train,
            eval_dataset=validation,
            processing_class=tokenizer,
        )
        # An interrupted distillation continues from its newest complete checkpoint.
        trainer.train(resume_from_checkpoint=resume_checkpoint(distillation))
        history = json.dumps(trainer.state.log_history, indent=1)
        atomic_save_model(
            trainer, distilled_dir, write_extra=lambda tmp: (tmp / "log_history.json").write_text(history)
        )
        del trainer, student, teacher
    log_history = json.loads((distilled_dir / "log_history.json").read_text())
    summary["stages"]["distillation"] = {
        "kd_loss": distillation.kd_loss,
        "kd_temperature": distillation.kd_temperature,
        "max_steps": distillation.max_steps,
        "learning_rate": distillation.learning_rate,
        "tokens": _tokens_seen(log_history, distillation, args.seq_length, state.num_processes),
        "log_history": log_history,
    }

    # 4. Evaluation: held-out loss + lm-eval tasks, teacher and student side by side.
    eval_path = root / "evaluation.json"
    if not eval_path.is_file():
        teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32)
        student = AutoModelForCausalLM.from_pretrained(distilled_dir, dtype=torch.float32)
        compare_models(
            teacher,
            student,
            tokenizer,
            tasks=[t for t in args.eval_tasks.split(",") if t],
            limit=args.eval_limit,
            heldout_dataset=validation,
            teacher_name=args.teacher,
            student_name=f"{args.teacher} (Minitron-pruned + distilled)",
            output_file=eval_path,  # written atomically, main process only
        )
        state.wait_for_everyone()
    summary["evaluation"] = json.loads(eval_path.read_text())

    # 5. Final folder: the distilled checkpoint + model card + plots.
    final_dir = root / "final"
    if state.is_main_process and not _done(final_dir):
        import shutil

        with atomic_directory(final_dir, overwrite=True) as tmp:
            for item in distilled_dir.iterdir():
                # training_args.bin is a pickle: the published folder holds safetensors and JSON only.
                if item.name not in ("log_history.json", "training_args.bin"):
                    shutil.copy2(item, tmp / item.name)
            for name in ("pruned_config.json", "pruning_record.json"):
                if (pruned_dir / name).is_file():
                    shutil.copy2(pruned_dir / name, tmp / name)
            if args.write_model_card:
                _write_card(tmp, summary, pruned_dir, name=final_dir.parent.name)
    state.wait_for_everyone()
    summary["final_dir"] = str(final_dir)

    # 6. Optional upload (main process only; token from the environment or login, never logged).
    if args.push_to_hub and state.is_main_process:
        from .hub import push_to_hub

        push_to_hub(str(final_dir), args.hub_model_id, private=args.hub_private)
    return summary


def _last_checkpoint(directory: str) -> str | None:
    from .io import last_checkpoint

    # Skips a checkpoint that a kill interrupted mid-save (transformers' get_last_checkpoint would return it).
    return last_checkpoint(directory)


def _tokens_seen(log_history, config, seq_length: int, processes: int) -> int:
    steps = max((entry.get("step", 0) for entry in log_history), default=0)
    return int(
        steps * config.per_device_train_batch_size * config.gradient_accumulation_steps * processes * seq_length
    )


def _write_card(directory: Path, summary: dict, pruned_dir: Path, name: str) -> None:
    """Model card + plots from what the stages recorded (layer importance from the saved scores)."""
    from .importance import ImportanceScores
    from .model_card import PipelineSummary, save_model_card

    pruning = summary["stages"]["pruning"]
    layer_importance = None
    if (pruned_dir / "importance" / "importance.json").is_file():
        scores = ImportanceScores.load(pruned_dir / "importance")
        if scores.block_influence is not None:
            layer_importance = scores.block_influence.tolist()
    record = json.loads((pruned_dir / "pruning_record.json").read_text())
    distillation = {k: v for k, v in summary["stages"]["distillation"].items() if k != "log_history"}
    card = PipelineSummary(
        model_name=summary.get("hub_model_id") or name,
        teacher_id=summary.get("teacher_hub_id"),
        datasets=summary.get("datasets"),
        teacher_config={k: v for k, v in pruning["before"].items() if k != "parameters"},
        student_config={k: v for k, v in pruning["after"].items() if k != "parameters"},
        pruned_config=pruning["pruned_config"],
        teacher_parameters=pruning["before"]["parameters"]["total"],
        student_parameters=pruning["after"]["parameters"]["total"],
        layer_importance=layer_importance,
        dropped_layers=record.get("dropped_layers") or None,
        teacher_correction=summary["stages"].get("teacher_correction"),
        distillation=distillation,
        log_history=summary["stages"]["distillation"]["log_history"],
        evaluation=summary.get("evaluation"),
    )
    save_model_card(card, directory)


def parse_overrides(argv: list[str]) -> tuple[str, dict]:
    """`--config FILE` plus `--key value` / `--section.key value` pairs; values are parsed as YAML scalars."""
    import yaml

    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        raise ValueError("Pass the recipe with --config FILE (e.g. recipes/smollm2-135m/minitron.yaml).")
    argv = list(argv)
    index = argv.index("--config")
    config_path = argv[index + 1]
    del argv[index : index + 2]
    overrides = {}
    while argv:
        key = argv.pop(0)
        if not key.startswith("--") or not argv:
            raise ValueError(f"Expected `--key value` pairs after --config, got {key!r}.")
        overrides[key[2:]] = yaml.safe_load(argv.pop(0))
    return config_path, overrides
