"""Which stages of `hf-minitron run` can be reused: each stage's settings and inputs are recorded in
`{stage}.settings.json` next to its folder; a finished stage whose record matches this run is reused, a changed one is
refused before any stage runs, naming what changed."""

import hashlib
import json
import os
from dataclasses import fields
from pathlib import Path

from ..pruning.config import PrunedConfig
from .run_config import lora_fields


STAGES = ("teacher_correction", "pruned", "distilled", "sft", "dpo", "evaluation", "final")


def _done(directory: Path) -> bool:
    return (directory / "config.json").is_file()


# ---------------------------------------------------------------------------------------------- stage records
SETTINGS_SUFFIX = ".settings.json"


# Training arguments that change where, how often or on what hardware a run writes and logs, not the model it makes:
# left out of the records, so that e.g. another logging interval does not refuse a resume.
_NEUTRAL_PREFIXES = ("logging_", "save_", "hub_", "eval_", "dataloader_", "ddp_", "log_", "trackio_", "torch_compile")


_NEUTRAL_FIELDS = {
    "output_dir", "run_name", "report_to", "project", "push_to_hub", "resume_from_checkpoint", "disable_tqdm",
    "do_eval", "do_predict", "do_train", "debug", "skip_memory_metrics", "local_rank", "use_cpu", "accelerator_config",
    "per_device_eval_batch_size", "prediction_loss_only", "batch_eval_metrics", "include_for_metrics",
    "include_num_input_tokens_seen", "fp16_full_eval", "bf16_full_eval", "gradient_checkpointing",
    "gradient_checkpointing_kwargs", "activation_checkpointing", "activation_checkpointing_kwargs",
    "enable_jit_checkpoint", "restore_callback_states_from_checkpoint", "torch_empty_cache_steps", "deepspeed", "fsdp",
    "fsdp_config", "parallelism_config", "final_model_dir", "corrected_model_dir", "overwrite_output_dir",
}  # fmt: skip


def _json(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _training_settings(config) -> dict:
    # to_dict() leaves tokens out; enums become their values.
    values = (
        config.to_dict() if hasattr(config, "to_dict") else {f.name: getattr(config, f.name) for f in fields(config)}
    )
    return _json({k: v for k, v in values.items() if k not in _NEUTRAL_FIELDS and not k.startswith(_NEUTRAL_PREFIXES)})


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
    return _json({k: v for k, v in values.items() if k not in _LATER_PRUNING_FIELDS or v != _LATER_PRUNING_FIELDS[k]})


def _digest(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def _files_fingerprint(paths) -> dict | None:
    """Names and sizes of local input files (a checkpoint's config and weights, data files): cheap, and changed by any
    replacement of the files that matters here."""
    found = {}
    for path in paths:
        path = Path(os.path.expanduser(str(path)))
        if path.is_file():
            found[path.name] = path.stat().st_size
        elif path.is_dir():
            for file in sorted(path.iterdir()):
                if file.suffix in (".json", ".safetensors") and file.is_file() and not file.name.startswith("."):
                    found[file.name] = file.stat().st_size
    return found or None


def stage_records(args, pruning, distillation, correction, alignment, teacher_path) -> dict[str, dict]:
    """What each stage is made from: its own settings and a digest of the record of the stage it starts from."""
    # What each stage reads of the data: the source (calibration), the packed training or held-out samples.
    source = {
        "dataset": args.dataset,
        "dataset_files": _files_fingerprint(args.dataset.split(",")),
        "text_column": args.text_column,
    }
    train = {**source, "seq_length": args.seq_length, "max_train_samples": args.max_train_samples}
    heldout = {**source, "seq_length": args.seq_length, "max_eval_samples": args.max_eval_samples}
    teacher = {"teacher": args.teacher, "teacher_files": _files_fingerprint([teacher_path])}
    records = {}
    if args.correct_teacher:
        records["teacher_correction"] = {**teacher, **train, "teacher_correction": _training_settings(correction)}
        teacher = {"teacher_correction": _digest(records["teacher_correction"])}
    records["pruned"] = {**teacher, **source, "pruning": _pruning_settings(pruning)}
    records["distilled"] = {
        **teacher,
        **train,
        "pruned": _digest(records["pruned"]),
        "distillation": _training_settings(distillation),
    }
    model = "distilled"
    for stage in alignment or []:
        settings = {
            **_training_settings(stage.script_args),
            **_training_settings(stage.training_args),
            **{name: getattr(stage.model_args, name) for name in sorted(lora_fields())},
        }
        records[stage.name] = {model: _digest(records[model]), stage.name: _json(settings)}
        model = stage.name
    records["evaluation"] = {
        "student": _digest(records[model]),
        **teacher,
        **heldout,
        "eval_tasks": args.eval_tasks,
        "eval_limit": args.eval_limit,
    }
    records["final"] = {
        "evaluation": _digest(records["evaluation"]),
        "pruned": _digest(records["pruned"]),
        "write_model_card": args.write_model_card,
        "hub_model_id": args.hub_model_id,
    }
    return records


_UNSET = object()


def _flatten(record: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _changes(old: dict, new: dict) -> list[str]:
    old, new = _flatten(old), _flatten(new)
    changed = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, _UNSET) != new.get(key, _UNSET):
            before, after = (repr(v.get(key)) if key in v else "(unset)" for v in (old, new))
            changed.append(f"{key}: {before} -> {after}")
    return changed


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record.get("settings") if isinstance(record, dict) else None


# Training stages and where they keep their resumable checkpoints (relative to output_dir).
CHECKPOINTS = {
    "teacher_correction": "teacher_correction_checkpoints",
    "distilled": "distill_checkpoints",
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
        previous = _read_record(root / f"{stage}{SETTINGS_SUFFIX}")
        derived = stage in ("evaluation", "final")
        if produced and not derived:
            if previous is None:
                raise ValueError(
                    f"{str(output)!r} exists but {stage}{SETTINGS_SUFFIX} (the settings it was made with) is missing, so "
                    "it cannot be reused safely (it may come from an older hf-minitron or another tool). Use a new "
                    f"output_dir to start afresh, or remove {str(output)!r} and the stages after it to redo them."
                )
            changed = _changes(previous, record)
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
        if _read_record(path) != record:
            atomic_write_json(path, {"stage": stage, "settings": record})
