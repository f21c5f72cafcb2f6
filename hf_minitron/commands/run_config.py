"""The recipe of `hf-minitron run`: its top-level `MinitronArguments`, one section per stage, and how a YAML file
plus `--key value` / `--section.key value` overrides become the configs of every stage (unknown keys and wrong types
refused before any work)."""

import difflib
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..data import EMBEDDED_CORPUS
from ..pruning.config import PrunedConfig, shape_fields, target_fields
from ..settings_records import training_settings
from ..validation import (
    check_field_types,
    check_numbers,
    read_config_file,
)


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
        check_numbers(self)
        if not self.output_dir or not str(self.output_dir).strip():
            # Path("") is the current directory: every stage folder would land there.
            raise ValueError("MinitronArguments.output_dir is empty: pass the run's folder, e.g. outputs/my-run.")
        self.output_dir = os.path.expanduser(self.output_dir)  # as model paths: `~/runs/x`, not `./~/runs/x`
        if self.seq_length < 2:
            raise ValueError(f"MinitronArguments.seq_length={self.seq_length} is invalid: use at least 2 tokens.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("MinitronArguments.push_to_hub=True needs hub_model_id (e.g. 'me/my-minitron-80m').")


SECTIONS = ("pruning", "distillation", "teacher_correction", "on_policy", "sft", "dpo")


ALIGNMENT_STAGES = ("sft", "dpo")
# The sections whose stage runs only when present (the others always run: pruning and distillation are the method).
_OPTIONAL_SECTIONS = ("on_policy", *ALIGNMENT_STAGES)


def _build(cls, values: dict, where: str, **forced):
    if not isinstance(values, dict):
        # e.g. `sft: 5` or `pruning: [1, 2]` in the YAML: a section is a mapping of field names to values.
        raise ValueError(
            f"The {where!r} section of the recipe is a {type(values).__name__} ({values!r}): it must be a mapping of "
            f"{cls.__name__} fields (`{where}:` followed by indented `field: value` lines)"
            + (", empty for the defaults, or null to skip the stage." if where in _OPTIONAL_SECTIONS else ".")
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


def lora_fields() -> set[str]:
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

    def settings(self) -> dict:
        """What the stage's record holds of its own settings (a changed one is refused on a rerun)."""
        return {
            **training_settings(self.script_args),
            **training_settings(self.training_args),
            **{name: getattr(self.model_args, name) for name in sorted(lora_fields())},
        }

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


@dataclass
class OnPolicyStage:
    """The on-policy distillation stage after KD ([GKD](https://arxiv.org/abs/2306.13649)): the distilled student
    samples continuations of prompts cut from the run's training samples, the live (corrected) teacher scores them
    (`hf_minitron.distillation.on_policy`). Its result is the model the alignment stages start from.

    Args:
        training_args (`OnPolicyConfig`): the trainer's arguments (`output_dir` set by the pipeline).
        final_model_dir (`str`): where the trained student is written (`{output_dir}/on_policy`).
    """

    training_args: object
    final_model_dir: str
    name: str = "on_policy"

    def settings(self) -> dict:
        """What the stage's record holds of its own settings (a changed one is refused on a rerun)."""
        return training_settings(self.training_args)

    def run(self, model_dir: str | os.PathLike, teacher_path: str, train_dataset, tokenizer) -> None:
        """Trains the checkpoint at `model_dir` on its own samples scored by the teacher at `teacher_path`; writes the
        stock result (with `log_history.json`) to `final_model_dir`."""
        import json

        from transformers import AutoModelForCausalLM

        from ..distillation.on_policy import build_on_policy_trainer
        from ..io import atomic_save_model, resume_checkpoint

        trainer = build_on_policy_trainer(
            AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False),
            AutoModelForCausalLM.from_pretrained(teacher_path, trust_remote_code=False),
            self.training_args,
            train_dataset,
            tokenizer,
        )
        # An interrupted stage continues from its newest complete checkpoint.
        trainer.train(resume_from_checkpoint=resume_checkpoint(self.training_args))
        if trainer.state.global_step == 0:
            raise ValueError(
                f"The on_policy stage trained 0 steps (max_steps={self.training_args.max_steps}, num_train_epochs="
                f"{self.training_args.num_train_epochs}): raise max_train_samples or on_policy.max_steps. Nothing was "
                "written for this stage."
            )
        history = json.dumps(trainer.state.log_history, indent=1)
        atomic_save_model(
            trainer, self.final_model_dir, write_extra=lambda tmp: (tmp / "log_history.json").write_text(history)
        )

    def describe(self) -> dict:
        """What the summary and the model card record about this stage."""
        args = self.training_args
        return {
            "beta": args.beta,
            "temperature": args.temperature,
            "prompt_length": args.prompt_length,
            "max_completion_length": args.max_completion_length,
            "max_steps": args.max_steps,
            "learning_rate": args.learning_rate,
            "batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps,
            "path": self.final_model_dir,
        }


def _build_on_policy_stage(values: dict, root: Path, seq_length: int) -> OnPolicyStage:
    from ..distillation.on_policy import OnPolicyConfig

    if "output_dir" in values:
        raise ValueError(f"on_policy.output_dir is set by the pipeline ({root / 'on_policy_checkpoints'}): remove it.")
    try:
        config = _build(OnPolicyConfig, values, "on_policy", output_dir=str(root / "on_policy_checkpoints"))
    except ValueError as error:
        # TRL's own checks (e.g. its bf16 default on a CPU-only machine) do not say which section they come from.
        raise ValueError(f"In the 'on_policy' section of the recipe: {error}") from error
    if config.prompt_length > seq_length:
        raise ValueError(
            f"on_policy.prompt_length={config.prompt_length} is longer than the packed training samples it is cut "
            f"from (seq_length={seq_length}): use on_policy.prompt_length <= seq_length."
        )
    return OnPolicyStage(config, str(root / "on_policy"))


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
    valid = {f.name for cls in classes for f in fields(cls)} | lora_fields()
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(
            f"Unknown key(s) {unknown} in the {name!r} section: valid keys are the fields of "
            f"{' / '.join(cls.__name__ for cls in classes)} and the LoRA fields of ModelConfig "
            f"({sorted(lora_fields())})."
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
    """`(MinitronArguments, PrunedConfig, DistillationConfig, TeacherCorrectionConfig, stages after distillation)` from
    a YAML file: the last item lists the `OnPolicyStage` and `AlignmentStage`s to run after distillation, in order.

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
    for key, value in top.items():
        # `--distilation.max_steps 5` lands here as a top-level key holding a mapping: a misspelt section.
        guess = difflib.get_close_matches(key, SECTIONS, n=1)
        if isinstance(value, dict) and guess and key not in {f.name for f in fields(MinitronArguments)}:
            raise ValueError(
                f"Unknown section {key!r} in the recipe: did you mean {guess[0]!r}? Sections: {SECTIONS}."
            )
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
    for name in ("on_policy", *ALIGNMENT_STAGES):
        if data.get(name) is not None and not isinstance(data[name], dict):
            _build(dict, data[name], name)  # refuses a section that is not a mapping, naming it
    # The stages after distillation, in the order they run, each on the previous one's result.
    after = []
    if data.get("on_policy") is not None:
        after.append(_build_on_policy_stage({**device, **data["on_policy"]}, root, args.seq_length))
    after += [
        _build_alignment_stage(name, {**device, **(data[name] or {})}, root)
        for name in ALIGNMENT_STAGES
        if name in data and data[name] is not None
    ]
    return args, pruning, distillation, correction, after


def check_prunes_something(pruning: PrunedConfig) -> None:
    """Refuses a run whose `pruning` sets no target: the importance pass would run for minutes and the "student" be
    the teacher itself."""
    if not any(getattr(pruning, name) is not None for name in shape_fields()):
        raise ValueError(
            "The recipe's 'pruning' section sets no target, so the student would be the teacher itself: set at least "
            f"one of {list(target_fields())} (e.g. `hidden_size: 456`), layers_to_drop or num_layers_by_type. To "
            "distill into a model you already have, use `hf-minitron distill`."
        )


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
