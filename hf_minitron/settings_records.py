"""Records of what a result was made from, so that a rerun reuses (or resumes) it only under the same settings.

`hf-minitron run` keeps one per stage (`commands/run_records.py`); every training command keeps one next to its
resumable checkpoints (`io.resume_checkpoint`). A record holds the settings that change the result (not where or how
often it logs or saves) and content fingerprints of its local inputs; two records compare key by key, and the
differences are named in the refusal.
"""

import hashlib
import json
from dataclasses import fields, is_dataclass
from pathlib import Path


# Training arguments that change where, how often or on what hardware a run writes and logs, not the model it makes:
# left out of the records, so that e.g. another logging interval does not refuse a resume.
NEUTRAL_PREFIXES = ("logging_", "save_", "hub_", "eval_", "dataloader_", "ddp_", "log_", "trackio_", "torch_compile")


NEUTRAL_FIELDS = {
    "output_dir", "run_name", "report_to", "project", "push_to_hub", "resume_from_checkpoint", "disable_tqdm",
    "do_eval", "do_predict", "do_train", "debug", "skip_memory_metrics", "local_rank", "use_cpu", "accelerator_config",
    "per_device_eval_batch_size", "prediction_loss_only", "batch_eval_metrics", "include_for_metrics",
    "include_num_input_tokens_seen", "fp16_full_eval", "bf16_full_eval", "gradient_checkpointing",
    "gradient_checkpointing_kwargs", "activation_checkpointing", "activation_checkpointing_kwargs",
    "enable_jit_checkpoint", "restore_callback_states_from_checkpoint", "torch_empty_cache_steps", "deepspeed", "fsdp",
    "fsdp_config", "parallelism_config", "final_model_dir", "corrected_model_dir", "overwrite_output_dir",
}  # fmt: skip


def as_json(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def training_settings(config) -> dict:
    # to_dict() leaves tokens out; enums become their values.
    if hasattr(config, "to_dict"):
        values = config.to_dict()
    elif is_dataclass(config):
        values = {f.name: getattr(config, f.name) for f in fields(config)}
    else:  # any object with the training arguments as attributes
        values = dict(vars(config))
    return as_json({k: v for k, v in values.items() if k not in NEUTRAL_FIELDS and not k.startswith(NEUTRAL_PREFIXES)})


def digest(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


_UNSET = object()


def flatten(record: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changes(old: dict, new: dict) -> list[str]:
    old, new = flatten(old), flatten(new)
    changed = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, _UNSET) != new.get(key, _UNSET):
            before, after = (repr(v.get(key)) if key in v else "(unset)" for v in (old, new))
            changed.append(f"{key}: {before} -> {after}")
    return changed


def read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record.get("settings") if isinstance(record, dict) else None
