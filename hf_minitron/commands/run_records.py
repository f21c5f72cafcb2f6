"""Which stages of `hf-minitron run` can be reused: each stage's settings and inputs are recorded in
`{stage}.settings.json` next to its folder; a finished stage whose record matches this run is reused, a changed one is
refused before any stage runs, naming what changed."""

from pathlib import Path

from ..fingerprints import files_fingerprint
from ..pruning.config import PrunedConfig
from ..settings_records import as_json, changes, digest, read_record, training_settings


STAGES = ("teacher_correction", "pruned", "distilled", "on_policy", "sft", "dpo", "evaluation", "final")


def _done(directory: Path) -> bool:
    return (directory / "config.json").is_file()


# ---------------------------------------------------------------------------------------------- stage records
SETTINGS_SUFFIX = ".settings.json"


# PrunedConfig fields added after runs were recorded, with the defaults that do what those runs did: left out of the
# record at these values, so that such a run still resumes.
_LATER_PRUNING_FIELDS = {
    "contiguous_score": "lm_loss",
    "depth_scorer": None,
    "depth_scorer_num_fewshot": 0,
    "depth_scorer_limit": None,
}


def _pruning_settings(pruning: PrunedConfig) -> dict:
    values = pruning.to_dict()
    return as_json(
        {k: v for k, v in values.items() if k not in _LATER_PRUNING_FIELDS or v != _LATER_PRUNING_FIELDS[k]}
    )


def stage_records(args, pruning, distillation, correction, alignment, teacher_path) -> dict[str, dict]:
    """What each stage is made from: its own settings and a digest of the record of the stage it starts from."""
    # What each stage reads of the data: the source (calibration), the packed training or held-out samples.
    source = {
        "dataset": args.dataset,
        "dataset_files": files_fingerprint(args.dataset.split(",")),
        "text_column": args.text_column,
    }
    train = {**source, "seq_length": args.seq_length, "max_train_samples": args.max_train_samples}
    heldout = {**source, "seq_length": args.seq_length, "max_eval_samples": args.max_eval_samples}
    teacher = {"teacher": args.teacher, "teacher_files": files_fingerprint([teacher_path])}
    records = {}
    if args.correct_teacher:
        records["teacher_correction"] = {**teacher, **train, "teacher_correction": training_settings(correction)}
        teacher = {"teacher_correction": digest(records["teacher_correction"])}
    records["pruned"] = {**teacher, **source, "pruning": _pruning_settings(pruning)}
    records["distilled"] = {
        **teacher,
        **train,
        "pruned": digest(records["pruned"]),
        "distillation": training_settings(distillation),
    }
    model = "distilled"
    for stage in alignment or []:
        # On-policy distillation also reads the teacher (it scores the samples) and the training samples (prompts).
        inputs = {**teacher, **train} if stage.name == "on_policy" else {}
        records[stage.name] = {model: digest(records[model]), **inputs, stage.name: as_json(stage.settings())}
        model = stage.name
    records["evaluation"] = {
        "student": digest(records[model]),
        **teacher,
        **heldout,
        "eval_tasks": args.eval_tasks,
        "eval_limit": args.eval_limit,
    }
    records["final"] = {
        "evaluation": digest(records["evaluation"]),
        "pruned": digest(records["pruned"]),
        "write_model_card": args.write_model_card,
        "hub_model_id": args.hub_model_id,
    }
    return records


# Training stages and where they keep their resumable checkpoints (relative to output_dir).
CHECKPOINTS = {
    "teacher_correction": "teacher_correction_checkpoints",
    "distilled": "distill_checkpoints",
    "on_policy": "on_policy_checkpoints",
    "sft": "sft_checkpoints",
    "dpo": "dpo_checkpoints",
}


def plan_stages(root: Path, records: dict[str, dict]) -> dict[str, bool]:
    """Checks each stage's record in `root` against this run's, before any stage runs; returns which finished stages
    are reused. A training stage that holds results (its folder or a checkpoint) made with other settings or from other
    inputs is refused; the evaluation and the final folder are redone instead."""
    from ..io import last_checkpoint

    reuse, upstream_redone = {}, None
    for stage, record in records.items():
        output = root / ("evaluation.json" if stage == "evaluation" else stage)
        done = output.is_file() if stage == "evaluation" else _done(output)
        checkpoints = CHECKPOINTS.get(stage)
        produced = output.exists() or (checkpoints is not None and last_checkpoint(root / checkpoints) is not None)
        previous = read_record(root / f"{stage}{SETTINGS_SUFFIX}")
        derived = stage in ("evaluation", "final")
        if produced and not derived:
            if previous is None:
                raise ValueError(
                    f"{str(output)!r} exists but {stage}{SETTINGS_SUFFIX} (the settings it was made with) is missing, so "
                    "it cannot be reused safely (it may come from an older hf-minitron or another tool). Use a new "
                    f"output_dir to start afresh, or remove {str(output)!r} and the stages after it to redo them."
                )
            changed = changes(previous, record)
            if changed:
                raise ValueError(
                    f"{str(root)!r} was made with other settings: the {stage!r} stage there (made with the earlier "
                    f"settings) would be reused with these. Changed: {'; '.join(changed)}. Rerun with the earlier "
                    "settings to reuse (or resume) it, or start afresh with a new output_dir."
                )
            if upstream_redone is not None:
                raise ValueError(
                    f"The {upstream_redone!r} stage in {str(root)!r} is missing and must be redone, but {str(output)!r} "
                    f"was made from the earlier {upstream_redone!r}: remove it (and the stages after it) to redo them, "
                    "or start afresh with a new output_dir."
                )
        reuse[stage] = done and previous == record and upstream_redone is None
        if not reuse[stage] and upstream_redone is None:
            upstream_redone = stage
    return reuse


def write_records(root: Path, records: dict[str, dict]) -> None:
    from ..io import atomic_write_json

    for stage, record in records.items():
        path = root / f"{stage}{SETTINGS_SUFFIX}"
        if read_record(path) != record:
            atomic_write_json(path, {"stage": stage, "settings": record})
