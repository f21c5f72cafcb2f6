"""The whole Minitron chain, stage by stage, resumable:

    correct teacher (optional) -> estimate importance -> prune -> distill -> SFT (optional) -> DPO / RPO (optional)
    -> evaluate teacher and student -> model card -> push (optional)

Every stage writes one directory under `output_dir` atomically, and records the settings and inputs it is made from
in `{stage}.settings.json` next to it. A finished stage whose record matches this run is reused, not recomputed, so
rerunning the same command after an interruption continues at the first unfinished stage. A rerun with other
settings is refused before any stage runs, naming the settings that changed (a model is never reused under settings
it was not made with): rerun with the original settings, or start afresh in a new `output_dir`. The evaluation and the
final folder (card) are redone instead when only their own settings changed.

The YAML config has top-level `MinitronArguments` keys and one section per stage whose keys are exactly the fields
of that stage's dataclass: `pruning` (`PrunedConfig`), `distillation` (`DistillationConfig`), `teacher_correction`
(`TeacherCorrectionConfig`), and the alignment stages (paper 2, §4) `sft` (`AlignmentArguments` + `trl.SFTConfig` +
the LoRA fields of `trl.ModelConfig`) and `dpo` (the same with `RPOConfig`). An alignment stage runs when its section
is present (`--sft null` drops it); SFT starts from the distilled student and DPO from the SFT result (or the distilled
student without SFT). `output_dir` of the trainer sections, `final_model_dir` and the model path are set by the
pipeline.
"""

import difflib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path

from ..data import EMBEDDED_CORPUS, STDLIB_CORPUS, load_text_datasets
from ..pruning.config import PrunedConfig
from ..validation import (
    check_field_types,
    check_finite_weights,
    check_process_group,
    check_sequence_length,
    load_model_config,
    read_config_file,
)


logger = logging.getLogger(__name__)

STAGES = ("teacher_correction", "pruned", "distilled", "sft", "dpo", "evaluation", "final")


@dataclass
class MinitronArguments:
    """Top-level options of the Minitron pipeline.

    Args:
        teacher (`str`, *optional*, defaults to `"embedded"`): teacher checkpoint, Hub id, or `embedded` (SmolLM2).
        output_dir (`str`, *optional*, defaults to `"outputs/minitron"`): one sub-directory per stage.
        dataset (`str`, *optional*, defaults to `"embedded"`): distillation/calibration text: `embedded` (CPython's
            reference documentation), `stdlib` (the standard library's source code), local text/jsonl/parquet/csv
            files, or a Hub dataset.
        text_column (`str`, *optional*, defaults to `"text"`): column holding the text.
        seq_length (`int`, *optional*, defaults to `256`): packed sample length for distillation and evaluation.
        max_train_samples (`int`, *optional*): cap on packed training samples.
        max_eval_samples (`int`, *optional*, defaults to `64`): packed validation samples for held-out loss.
        correct_teacher (`bool`, *optional*, defaults to `False`): fine-tune the teacher on the data first (paper 2).
        eval_tasks (`str`, *optional*, defaults to `"pydoc_topics"`): comma-separated lm-eval tasks; `""` skips.
        eval_limit (`int`, *optional*): samples per lm-eval task.
        write_model_card (`bool`, *optional*, defaults to `True`): render README.md with the results.
        keep_checkpoints (`bool`, *optional*, defaults to `False`): keep a training stage's resumable `checkpoint-N`
            folders (model, optimizer and scheduler states) once the stage has saved its result; they serve only to
            resume that stage (about 1 GB each for SmolLM2-135M).
        push_to_hub (`bool`, *optional*, defaults to `False`): upload the final folder.
        hub_model_id (`str`, *optional*): repository id for the upload.
        hub_private (`bool`, *optional*, defaults to `True`): create the repository as private.
    """

    teacher: str = field(default="embedded", metadata={"help": "Teacher checkpoint, Hub id, or 'embedded'."})
    output_dir: str = field(default="outputs/minitron", metadata={"help": "Root directory; one folder per stage."})
    dataset: str = field(
        default=EMBEDDED_CORPUS, metadata={"help": "'embedded', 'stdlib', local files, or a Hub dataset."}
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    seq_length: int = field(default=256, metadata={"help": "Packed sample length (tokens)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on packed training samples."})
    max_eval_samples: int = field(default=64, metadata={"help": "Packed validation samples for held-out loss."})
    correct_teacher: bool = field(default=False, metadata={"help": "Fine-tune the teacher on the data first."})
    eval_tasks: str = field(default="pydoc_topics", metadata={"help": "Comma-separated lm-eval tasks ('' skips)."})
    eval_limit: int | None = field(default=None, metadata={"help": "Samples per lm-eval task."})
    write_model_card: bool = field(default=True, metadata={"help": "Render the model card (README.md)."})
    keep_checkpoints: bool = field(
        default=False, metadata={"help": "Keep each training stage's checkpoint-N folders after the stage finished."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the final folder to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository id for the upload."})
    hub_private: bool = field(default=True, metadata={"help": "Create the Hub repository as private."})

    def __post_init__(self):
        self.output_dir = os.path.expanduser(self.output_dir)  # as model paths: `~/runs/x`, not `./~/runs/x`
        if self.seq_length < 2:
            raise ValueError(f"MinitronArguments.seq_length={self.seq_length} is invalid: use at least 2 tokens.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("MinitronArguments.push_to_hub=True needs hub_model_id (e.g. 'me/my-minitron-80m').")


SECTIONS = ("pruning", "distillation", "teacher_correction", "sft", "dpo")
ALIGNMENT_STAGES = ("sft", "dpo")


def _build(cls, values: dict, where: str, **forced):
    if not isinstance(values, dict):
        # e.g. `sft: 5` or `pruning: [1, 2]` in the YAML: a section is a mapping of field names to values.
        raise ValueError(
            f"The {where!r} section of the recipe is a {type(values).__name__} ({values!r}): it must be a mapping of "
            f"{cls.__name__} fields (`{where}:` followed by indented `field: value` lines), empty for the defaults, "
            "or null to skip the stage."
        )
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        guesses = {key: difflib.get_close_matches(key, valid, n=1) for key in unknown}
        hint = "; ".join(f"{key!r}: did you mean {match[0]!r}?" for key, match in guesses.items() if match)
        raise ValueError(
            f"Unknown key(s) {unknown} in the {where!r} section: valid keys are the fields of {cls.__name__}."
            + (f" {hint}" if hint else "")
        )
    # A quoted number or a list where a number belongs would otherwise fail deep inside training, or not at all.
    location = "the top level of the recipe" if where == "top level" else f"the {where!r} section of the recipe"
    values = check_field_types(cls, values, location)
    return cls(**{**values, **forced})


def _lora_fields() -> set[str]:
    # The ModelConfig fields that `trl.get_peft_config` reads; the model itself is the previous stage's output.
    from trl import ModelConfig

    return {f.name for f in fields(ModelConfig) if f.name.startswith("lora_") or f.name in _PEFT_SWITCHES}


_PEFT_SWITCHES = ("use_peft", "use_dora", "use_rslora")


@dataclass
class AlignmentStage:
    """One alignment stage of the chain (paper 2, §4): `"sft"` ([`~trl.SFTTrainer`]) or `"dpo"` (DPO / RPO with
    [`~trl.DPOTrainer`]), run by `hf_minitron.alignment.run_sft` / `run_dpo` as `recipes/sft.py` / `recipes/dpo.py`
    do.

    Args:
        name (`str`): `"sft"` or `"dpo"`; also the stage's folder under `output_dir`.
        script_args (`AlignmentArguments`): the data and `final_model_dir`.
        training_args (`trl.SFTConfig` or `RPOConfig`): the trainer's arguments.
        model_args (`trl.ModelConfig`): its LoRA fields (`use_peft`, `lora_r`, ...); the model is the previous stage's.
    """

    name: str
    script_args: object
    training_args: object
    model_args: object

    def run(self, model_dir: str | os.PathLike) -> None:
        """Trains on the checkpoint at `model_dir` and writes the stock result to `script_args.final_model_dir`."""
        from trl import get_peft_config

        from ..alignment import build_preference_dataset, build_sft_dataset, run_dpo, run_sft
        from .align import load_alignment_data

        build, train_stage = (
            (build_sft_dataset, run_sft) if self.name == "sft" else (build_preference_dataset, run_dpo)
        )
        train, evaluation = load_alignment_data(self.script_args, build)
        train_stage(
            str(model_dir),
            None,  # the tokenizer (and its chat template) comes with the previous stage's checkpoint
            train,
            self.training_args,
            peft_config=get_peft_config(self.model_args),
            eval_dataset=evaluation,
            chat_template=self.script_args.chat_template,
            final_model_dir=self.script_args.final_model_dir,
        )

    def describe(self) -> dict:
        """What the summary and the model card record about this stage."""
        args = self.training_args
        described = {
            "dataset": self.script_args.dataset_name,
            "max_steps": args.max_steps,
            "learning_rate": args.learning_rate,
            "batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps,
            "lora_r": self.model_args.lora_r if self.model_args.use_peft else None,
            "path": self.script_args.final_model_dir,
        }
        if self.name == "dpo":
            described.update(beta=args.beta, rpo_alpha=getattr(args, "rpo_alpha", None), loss_type=args.loss_type)
        return described


def _build_alignment_stage(name: str, values: dict, root: Path) -> AlignmentStage:
    from trl import ModelConfig, SFTConfig

    from ..alignment import RPOConfig
    from .align import AlignmentArguments

    if not isinstance(values, dict):
        raise ValueError(f"The {name!r} section must be a mapping of field names to values, got {values!r}.")
    classes = (AlignmentArguments, SFTConfig if name == "sft" else RPOConfig)
    forced = {
        "output_dir": str(root / f"{name}_checkpoints"),
        "final_model_dir": str(root / name),
        "model_name_or_path": None,
    }
    for key in forced:
        if key in values:
            raise ValueError(
                f"{name}.{key} is set by the pipeline ({forced[key] or 'the previous stage output'}): remove it."
            )
    valid = {f.name for cls in classes for f in fields(cls)} | _lora_fields()
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(
            f"Unknown key(s) {unknown} in the {name!r} section: valid keys are the fields of "
            f"{' / '.join(cls.__name__ for cls in classes)} and the LoRA fields of ModelConfig "
            f"({sorted(_lora_fields())})."
        )
    built = []
    for cls in (*classes, ModelConfig):
        own = {f.name for f in fields(cls)}
        mine, fixed = {k: v for k, v in values.items() if k in own}, {k: v for k, v in forced.items() if k in own}
        try:
            built.append(_build(cls, mine, name, **fixed))
        except ValueError as error:
            # TRL's own checks (e.g. its bf16 default on a CPU-only machine) do not say which section they come from.
            raise ValueError(f"In the {name!r} section of the recipe: {error}") from error
    return AlignmentStage(name, *built)


def load_pipeline_config(path: str | os.PathLike, overrides: dict | None = None):
    """`(MinitronArguments, PrunedConfig, DistillationConfig, TeacherCorrectionConfig, list[AlignmentStage])` from a
    YAML file.

    `overrides` maps `key` or `section.key` to values (the CLI's `--section.key value`).
    """
    data = read_config_file(path, "recipe")
    for key, value in (overrides or {}).items():
        section, _, name = key.rpartition(".")
        (data.setdefault(section, {}) if section else data)[name] = value
    return build_pipeline_config(data)


def build_pipeline_config(data: dict):
    from ..distillation.config import DistillationConfig
    from ..distillation.teacher_correction import TeacherCorrectionConfig

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
    # Each trainer's arguments set up the process group anew: with `distillation.use_cpu` the other trainers must use
    # the CPU too, or they would re-create a single-process state under a multi-process launch (every process writing).
    device = {"use_cpu": True} if distillation.use_cpu else {}
    correction = _build(
        TeacherCorrectionConfig,
        {**device, **(data.get("teacher_correction") or {})},
        "teacher_correction",
        output_dir=str(root / "teacher_correction_checkpoints"),
        corrected_model_dir=str(root / "teacher_correction"),
    )
    # A present section (even empty: all defaults) enables its stage; absent or null skips it.
    for name in ALIGNMENT_STAGES:
        if data.get(name) is not None and not isinstance(data[name], dict):
            _build(dict, data[name], name)  # refuses a section that is not a mapping, naming it
    alignment = [
        _build_alignment_stage(name, {**device, **(data[name] or {})}, root)
        for name in ALIGNMENT_STAGES
        if name in data and data[name] is not None
    ]
    return args, pruning, distillation, correction, alignment


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


def _stage_records(args, pruning, distillation, correction, alignment, teacher_path) -> dict[str, dict]:
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
            **{name: getattr(stage.model_args, name) for name in sorted(_lora_fields())},
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
_CHECKPOINTS = {
    "teacher_correction": "teacher_correction_checkpoints",
    "distilled": "distill_checkpoints",
    "sft": "sft_checkpoints",
    "dpo": "dpo_checkpoints",
}


def _plan_stages(root: Path, records: dict[str, dict]) -> dict[str, bool]:
    """Checks each stage's record in `root` against this run's, before any stage runs; returns which finished stages
    are reused. A training stage that holds results (its folder or a checkpoint) made with other settings or from other
    inputs is refused; the evaluation and the final folder are redone instead."""
    from ..io import last_checkpoint

    reuse, upstream_redone = {}, None
    for stage, record in records.items():
        output = root / ("evaluation.json" if stage == "evaluation" else stage)
        done = output.is_file() if stage == "evaluation" else _done(output)
        checkpoints = _CHECKPOINTS.get(stage)
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


def _write_records(root: Path, records: dict[str, dict]) -> None:
    from ..io import atomic_write_json

    for stage, record in records.items():
        path = root / f"{stage}{SETTINGS_SUFFIX}"
        if _read_record(path) != record:
            atomic_write_json(path, {"stage": stage, "settings": record})


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


def run_pipeline(
    args: MinitronArguments,
    pruning: PrunedConfig,
    distillation,
    correction,
    alignment: list[AlignmentStage] | None = None,
    show_progress: bool = True,
    report: bool = True,
) -> dict:
    """Runs (or resumes) the chain; returns the summary dict that also goes into the model card.

    `alignment` lists the alignment stages to run after distillation, in order (see [`build_pipeline_config`]).
    `show_progress` shows the progress bars; `report` prints (on the main process) a heading with the time as each
    stage starts (or says that it was reused), and at the end the teacher-vs-student table and each stage's wall time.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..distillation.trainer import DistillationTrainer
    from ..embedded import resolve_model_path
    from ..evaluation import compare_models
    from ..io import atomic_directory, atomic_save_model, check_not_overlapping, resume_checkpoint
    from .prune import PruneArguments, prune_checkpoint

    state = _process_group(distillation)
    root = Path(args.output_dir)
    teacher_path = resolve_model_path(args.teacher)
    # Bad checkpoints, lengths, outputs and credentials fail here, in seconds, not after hours of training.
    teacher_config = load_model_config(teacher_path)
    check_sequence_length(teacher_config, args.seq_length, "MinitronArguments.seq_length")
    for name in (*STAGES, *_CHECKPOINTS.values(), "evaluation.json"):
        check_not_overlapping(root / name, teacher_path, "the teacher")
    if args.push_to_hub:
        from ..hub import check_push_ready

        check_push_ready(args.hub_model_id)
    if [t for t in args.eval_tasks.split(",") if t]:
        from ..evaluation import check_task_names

        check_task_names([t for t in args.eval_tasks.split(",") if t])
    if pruning.depth_scorer is not None:  # before teacher correction, not hours later when pruning starts
        from ..evaluation import check_task_names

        check_task_names(pruning.depth_scorer_tasks())
    # Each stage is reused only if its record (settings + inputs) matches this run: checked for every stage first.
    records = _stage_records(args, pruning, distillation, correction, alignment, teacher_path)
    reuse = _plan_stages(root, records)
    state.wait_for_everyone()  # every process has read the records before the main one rewrites them
    if state.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        _write_records(root, records)
    state.wait_for_everyone()
    # trust_remote_code=False throughout: a checkpoint's own modeling code is never run (nor asked about on stdin).
    tokenizer = AutoTokenizer.from_pretrained(teacher_path, trust_remote_code=False)
    train, validation = _datasets(args, tokenizer)
    stages = _StageLog(root, _stage_titles(args, alignment), report=report and state.is_main_process)
    stages.keep_times = state.is_main_process
    teacher_hub_id = _teacher_hub_id(args.teacher)
    summary: dict = {
        "teacher": args.teacher,
        # The card's base_model: a Hub id, or the embedded teacher's upstream id.
        "teacher_hub_id": teacher_hub_id,
        # What tables and cards call the teacher: its Hub id, else the path it was given as.
        "teacher_name": teacher_hub_id or args.teacher,
        "datasets": None
        if args.dataset in (EMBEDDED_CORPUS, STDLIB_CORPUS) or Path(args.dataset.split(",")[0]).exists()
        else [args.dataset],
        "hub_model_id": args.hub_model_id,
        "stages": {},
    }

    # 1. Teacher correction (paper 2): fine-tune the teacher on the distillation data before pruning.
    if args.correct_teacher:
        corrected = root / "teacher_correction"
        stages.begin("teacher_correction", reuse["teacher_correction"], corrected)
        if not reuse["teacher_correction"]:
            from ..distillation.teacher_correction import correct_teacher

            correct_teacher(teacher_path, correction, train_dataset=train, processing_class=tokenizer)
        stages.end("teacher_correction")
        _drop_checkpoints(root, "teacher_correction", args.keep_checkpoints or not state.is_main_process)
        teacher_path = str(corrected)
        summary["stages"]["teacher_correction"] = {"path": str(corrected), "max_steps": correction.max_steps}

    # 2. Importance estimation + pruning (one pass of forward hooks; scores saved next to the student).
    pruned_dir = root / "pruned"
    stages.begin("pruned", reuse["pruned"], pruned_dir)
    if not reuse["pruned"]:
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
    stages.end("pruned")
    summary["stages"]["pruning"] = json.loads((pruned_dir / "pruning_summary.json").read_text())
    summary["stages"]["pruning"]["pruned_config"] = pruning.to_dict()

    # 3. Distillation of the pruned student from the (corrected) teacher.
    distilled_dir = root / "distilled"
    stages.begin("distilled", reuse["distilled"], distilled_dir)
    if not reuse["distilled"]:
        student = AutoModelForCausalLM.from_pretrained(pruned_dir, trust_remote_code=False)
        teacher = AutoModelForCausalLM.from_pretrained(teacher_path, trust_remote_code=False)
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
    stages.end("distilled")
    _drop_checkpoints(root, "distilled", args.keep_checkpoints or not state.is_main_process)
    log_history = json.loads((distilled_dir / "log_history.json").read_text())
    summary["stages"]["distillation"] = {
        "kd_loss": distillation.kd_loss,
        "kd_temperature": distillation.kd_temperature,
        "max_steps": distillation.max_steps,
        "learning_rate": distillation.learning_rate,
        "tokens": _tokens_seen(log_history, distillation, args.seq_length, state.num_processes),
        "log_history": log_history,
    }

    # 4. Alignment (paper 2, §4): SFT, then DPO / RPO, each on the previous stage's checkpoint.
    model_dir = distilled_dir
    for stage in alignment or []:
        stage_dir = root / stage.name
        stages.begin(stage.name, reuse[stage.name], stage_dir)
        if not reuse[stage.name]:
            # An interrupted stage continues from its newest complete checkpoint (if it saved any).
            stage.training_args.resume_from_checkpoint = resume_checkpoint(stage.training_args)
            stage.run(model_dir)
        stages.end(stage.name)
        _drop_checkpoints(root, stage.name, args.keep_checkpoints or not state.is_main_process)
        summary["stages"][stage.name] = stage.describe()
        model_dir = stage_dir
    made = " + ".join(["Minitron-pruned", "distilled", *(stage.name.upper() for stage in alignment or [])])
    model_name = args.hub_model_id or _student_name(
        summary["teacher_name"], summary["stages"]["pruning"]["after"]["parameters"]["total"]
    )
    summary["model_name"] = model_name
    student_name = f"{model_name} ({made})"

    # 5. Evaluation: held-out loss + lm-eval tasks, teacher and student side by side.
    eval_path = root / "evaluation.json"
    stages.begin("evaluation", reuse["evaluation"], eval_path)
    # A reused evaluation must be of this chain's student and settings: one made before a stage was added is redone.
    if not reuse["evaluation"]:
        # lm-eval runs an in-memory model in a single process (elsewhere it returns no results): the main process
        # evaluates while the others wait (within the process group's timeout, `distillation.ddp_timeout`).
        if state.is_main_process:
            teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32, trust_remote_code=False)
            student = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False)
            compare_models(
                teacher,
                student,
                tokenizer,
                tasks=[t for t in args.eval_tasks.split(",") if t],
                limit=args.eval_limit,
                heldout_dataset=validation,
                teacher_name=summary["teacher_name"],
                student_name=student_name,
                output_file=eval_path,  # written atomically
            )
        state.wait_for_everyone()
    stages.end("evaluation")
    summary["evaluation"] = json.loads(eval_path.read_text())

    # 6. Final folder: the last stage's checkpoint + model card + plots (rebuilt with a new evaluation).
    final_dir = root / "final"
    stages.begin("final", reuse["final"], final_dir)
    if state.is_main_process and not reuse["final"]:
        import shutil

        with atomic_directory(final_dir, overwrite=True) as tmp:
            for item in model_dir.iterdir():
                # training_args.bin is a pickle: the published folder holds safetensors and JSON only.
                if item.name not in ("log_history.json", "training_args.bin"):
                    shutil.copy2(item, tmp / item.name)
            for name in ("pruned_config.json", "pruning_record.json"):
                if (pruned_dir / name).is_file():
                    shutil.copy2(pruned_dir / name, tmp / name)
            _enable_cache(tmp / "config.json")
            check_finite_weights(tmp)  # never card (or push) a model with NaN/inf weights
            if args.write_model_card:
                # The quick start loads the model from where it is going to be: its Hub repository, else this folder.
                model_id = args.hub_model_id or str(final_dir.resolve())
                _write_card(tmp, summary, pruned_dir, model_id=model_id)
    state.wait_for_everyone()
    stages.end("final")
    summary["final_dir"] = str(final_dir)

    # 7. Optional upload (main process only; token from the environment or login, never logged).
    if args.push_to_hub:
        stages.begin("push", False, args.hub_model_id)
        if state.is_main_process:
            from ..hub import push_to_hub

            push_to_hub(str(final_dir), args.hub_model_id, private=args.hub_private)
        stages.end("push")
    summary["stage_times"] = stages.times
    if stages.report:
        print_run_summary(summary)
    return summary


def _drop_checkpoints(root: Path, stage: str, keep: bool) -> None:
    """Removes the `checkpoint-N` folders the Trainer wrote for `stage` once the stage's result is saved: they only
    serve to resume it. Anything else in the folder (ours or not) stays."""
    import shutil

    folder = root / _CHECKPOINTS[stage]
    if keep or not (root / stage / "config.json").is_file() or not folder.is_dir():
        return
    for checkpoint in folder.glob("checkpoint-*"):
        if checkpoint.is_dir() and not checkpoint.is_symlink():
            shutil.rmtree(checkpoint)
    if not any(folder.iterdir()):
        folder.rmdir()


def _enable_cache(config_path: Path) -> None:
    # Training saves `use_cache: false` (TrainingArguments.use_cache defaults to False, and the Trainer copies it into
    # the model's config): the published model should generate with its KV cache, as the teacher does.
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("use_cache") is False:
        config["use_cache"] = True
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _teacher_hub_id(teacher: str) -> str | None:
    """The Hub id of the teacher: the upstream id of the embedded one, the name itself when it is not a local path."""
    from ..embedded import EMBEDDED_ALIASES

    if teacher in EMBEDDED_ALIASES:
        return "HuggingFaceTB/SmolLM2-135M-Instruct"
    return None if Path(os.path.expanduser(teacher)).exists() else teacher


def _student_name(teacher_name: str, parameters: int) -> str:
    """`SmolLM2-135M-Instruct-Minitron-80M`: the teacher's name and the student's size (NVIDIA's Minitron naming)."""
    base = Path(teacher_name.rstrip("/")).name or "model"
    if parameters >= 1e9:
        size = f"{parameters / 1e9:.1f}B"
    else:
        size = f"{round(parameters / 1e6)}M" if parameters >= 1e6 else f"{round(parameters / 1e3)}K"
    return f"{base}-Minitron-{size}"


# ---------------------------------------------------------------------------------------------- what the run prints
_STAGE_TITLES = {
    "teacher_correction": "Teacher correction (fine-tuning on the data)",
    "pruned": "Importance estimation and pruning",
    "distilled": "Distillation from the teacher",
    "sft": "SFT (supervised fine-tuning)",
    "dpo": "DPO / RPO (preference optimisation)",
    "evaluation": "Evaluation of teacher and student",
    "final": "Final folder: checkpoint, model card and plots",
    "push": "Upload to the Hub",
}
STAGE_TIMES = "stage_times.json"


def _stage_titles(args: MinitronArguments, alignment) -> dict[str, str]:
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


class _StageLog:
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
        table.add_column("")
        for name, entry in times.items():
            table.add_row(
                _STAGE_TITLES.get(name, name), _duration(entry["seconds"]), "reused" if entry["reused"] else ""
            )
        total = sum(entry["seconds"] or 0 for entry in times.values() if not entry["reused"])
        table.add_row("this run", _duration(total), "")
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


def _process_group(distillation):
    """The processes' shared state, set up as the trainers set it up, before pruning splits its calibration data."""
    from accelerate import PartialState

    # TrainingArguments initialises the distributed state (gloo on CPU with use_cpu or $ACCELERATE_USE_CPU, NCCL on
    # GPUs); a bare PartialState() would see one process per CPU worker and let every one of them write.
    check_process_group(distillation, "distillation.use_cpu")
    return PartialState()


def _tokens_seen(log_history, config, seq_length: int, processes: int) -> int:
    steps = max((entry.get("step", 0) for entry in log_history), default=0)
    return int(
        steps * config.per_device_train_batch_size * config.gradient_accumulation_steps * processes * seq_length
    )


def _write_card(directory: Path, summary: dict, pruned_dir: Path, model_id: str) -> None:
    """Model card + plots from what the stages recorded (importance from the scores saved with the pruned model)."""
    from ..model_card import PipelineSummary, save_model_card
    from ..pruning.importance import ImportanceScores

    pruning = summary["stages"]["pruning"]
    before, after = pruning["before"], pruning["after"]
    record = json.loads((pruned_dir / "pruning_record.json").read_text())
    # The plots show the axes that were pruned, from the scores saved next to the pruned model.
    plots = {}

    def pruned(axis: str) -> bool:
        return bool(before.get(axis) and after.get(axis) and after[axis] < before[axis])

    if (pruned_dir / "importance" / "importance.json").is_file():
        scores = ImportanceScores.load(pruned_dir / "importance")
        if scores.block_influence is not None:
            plots["layer_importance"] = scores.block_influence.tolist()
        if scores.heads and pruned("num_attention_heads"):
            plots.update(head_importance=scores.head_scores().tolist(), kept_heads=record.get("heads"))
        if scores.neurons and pruned("intermediate_size"):
            plots.update(neuron_importance=scores.neuron_scores().tolist(), kept_neurons=after["intermediate_size"])
        if scores.hidden and pruned("hidden_size"):
            plots.update(hidden_importance=scores.hidden_scores().tolist(), kept_hidden=after["hidden_size"])
    distillation = {k: v for k, v in summary["stages"]["distillation"].items() if k != "log_history"}
    card = PipelineSummary(
        model_name=summary["model_name"],
        model_id=model_id,
        teacher_id=summary.get("teacher_hub_id"),
        teacher_name=summary.get("teacher_name"),
        datasets=summary.get("datasets"),
        teacher_config={k: v for k, v in pruning["before"].items() if k != "parameters"},
        student_config={k: v for k, v in pruning["after"].items() if k != "parameters"},
        pruned_config=pruning["pruned_config"],
        teacher_parameters=pruning["before"]["parameters"]["total"],
        student_parameters=pruning["after"]["parameters"]["total"],
        dropped_layers=record.get("dropped_layers") or None,
        **plots,
        teacher_correction=summary["stages"].get("teacher_correction"),
        distillation=distillation,
        log_history=summary["stages"]["distillation"]["log_history"],
        evaluation=summary.get("evaluation"),
        alignment=_alignment_rows(summary["stages"]),
    )
    save_model_card(card, directory)


def _alignment_rows(stages: dict) -> dict | None:
    """The card's alignment table: one `"SFT max_steps"`-style row per recorded setting of each alignment stage."""
    ran = [name for name in ALIGNMENT_STAGES if name in stages]
    if not ran:
        return None
    rows = {"Stages": " → ".join(name.upper() for name in ran)}
    for name in ran:
        for key, value in stages[name].items():
            if key != "path":
                rows[f"{name.upper()} {key}"] = value
    return rows


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
