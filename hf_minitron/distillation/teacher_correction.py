"""Teacher correction (paper 2, §2, https://arxiv.org/abs/2408.11796).

The distillation data usually differs from the teacher's (unknown) pre-training data. Paper 2 first fine-tunes the
teacher lightly on the distillation data (~100B tokens for Llama-3.1 8B, at a reduced learning rate), then prunes and
distils from the corrected teacher. `correct_teacher` does that with a stock `transformers.Trainer` (full fine-tuning,
or LoRA merged back into the weights) and writes an ordinary checkpoint.
"""

import os
from dataclasses import dataclass, field

from torch import nn
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from ..fingerprints import model_fingerprint
from ..hub import keep_token_out_of_pickles
from ..io import atomic_directory, atomic_save_model, resume_checkpoint
from ..output_lock import output_locks
from ..validation import check_finite_weights, check_numbers
from .trainer import DataCollatorForDistillation, StopOnNonFinite


class _CorrectionTrainer(StopOnNonFinite, Trainer):
    """The stock Trainer, stopped at the first NaN/inf loss or gradient (a diverged teacher must not be saved)."""


@dataclass
class TeacherCorrectionConfig(TrainingArguments):
    r"""Arguments of [`correct_teacher`]: every [`~transformers.TrainingArguments`] field, plus:

    Args:
        original_learning_rate (`float`, *optional*):
            Peak learning rate of the teacher's original training. When set, `learning_rate` becomes
            `learning_rate_fraction * original_learning_rate` (paper 2 fine-tunes the teacher at a reduced LR).
        learning_rate_fraction (`float`, *optional*, defaults to `0.2`):
            Fraction of `original_learning_rate` used (1/5 by default).
        use_lora (`bool`, *optional*, defaults to `False`):
            Fine-tune LoRA adapters instead of all weights; they are merged into the weights before saving, so the
            output is a standard checkpoint either way.
        lora_r (`int`, *optional*, defaults to `16`): LoRA rank.
        lora_alpha (`int`, *optional*, defaults to `32`): LoRA scaling numerator.
        lora_dropout (`float`, *optional*, defaults to `0.0`): LoRA dropout.
        lora_target_modules (`list[str]`, *optional*): Modules to adapt; defaults to every linear layer.
        corrected_model_dir (`str`, *optional*):
            Where the corrected checkpoint is written; defaults to `{output_dir}/corrected`.
    """

    original_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Peak LR of the teacher's original training; sets learning_rate to a fraction."},
    )
    learning_rate_fraction: float = field(
        default=0.2, metadata={"help": "learning_rate = learning_rate_fraction * original_learning_rate."}
    )
    use_lora: bool = field(default=False, metadata={"help": "Fine-tune LoRA adapters, merged before saving."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt with LoRA (default: all linear layers)."}
    )
    corrected_model_dir: str | None = field(
        default=None,
        metadata={"help": "Output directory of the corrected checkpoint (default: {output_dir}/corrected)."},
    )

    def __post_init__(self):
        super().__post_init__()
        check_numbers(self)
        keep_token_out_of_pickles(self)  # checkpoints pickle these arguments (training_args.bin)
        if not 0 < self.learning_rate_fraction <= 1:
            raise ValueError(
                f"TeacherCorrectionConfig.learning_rate_fraction={self.learning_rate_fraction!r} is invalid: use a value "
                "in (0, 1] (paper 2 uses a reduced LR; 0.2 = 1/5 is the default)."
            )
        if self.original_learning_rate is not None:
            if not self.original_learning_rate > 0:
                raise ValueError(
                    f"TeacherCorrectionConfig.original_learning_rate={self.original_learning_rate!r} is invalid: pass "
                    "the positive peak LR of the teacher's training, or leave it unset to use learning_rate as is."
                )
            self.learning_rate = self.learning_rate_fraction * self.original_learning_rate
        if self.use_lora and (self.lora_r <= 0 or self.lora_alpha <= 0):
            raise ValueError(
                f"TeacherCorrectionConfig.lora_r={self.lora_r} / lora_alpha={self.lora_alpha} are invalid: use "
                "positive integers (e.g. 16 and 32)."
            )
        if self.corrected_model_dir is None:
            self.corrected_model_dir = os.path.join(self.output_dir, "corrected")


def correct_teacher(
    model: nn.Module | str,
    args: TeacherCorrectionConfig,
    train_dataset,
    eval_dataset=None,
    processing_class=None,
    callbacks=None,
) -> nn.Module:
    """Fine-tunes the teacher on the distillation data and writes a standard checkpoint (paper 2, §2).

    Training runs under a stock `transformers.Trainer`, so checkpointing and `accelerate launch` work as usual. A
    rerun with the same `output_dir` resumes from its newest complete checkpoint (or from
    `args.resume_from_checkpoint`). Labels are built from `input_ids` and `attention_mask` when the dataset has none.

    Args:
        model (`PreTrainedModel` or `str`): The teacher, or its checkpoint path.
        args ([`TeacherCorrectionConfig`]): Training arguments.
        train_dataset: Tokenized distillation data (`input_ids`, optionally `attention_mask` / `labels`).
        eval_dataset (*optional*): Held-out data for evaluation during training.
        processing_class (*optional*): The tokenizer, saved with the corrected checkpoint.
        callbacks (*optional*): Trainer callbacks.

    Returns:
        `PreTrainedModel`: the corrected teacher (LoRA adapters merged), also saved (safetensors) to
        `args.corrected_model_dir` by the main process: written to a temporary sibling directory, then renamed, so
        a crash never leaves a half-written checkpoint.

    Holds the output lock of every folder it writes (one writer per folder, see `output_lock.py`).
    """
    with output_locks(args.output_dir, args.corrected_model_dir):
        return _correct_teacher(model, args, train_dataset, eval_dataset, processing_class, callbacks)


def _correct_teacher(
    model: nn.Module | str,
    args: TeacherCorrectionConfig,
    train_dataset,
    eval_dataset=None,
    processing_class=None,
    callbacks=None,
) -> nn.Module:
    from ..validation import check_process_group

    check_process_group(args)
    source = model_fingerprint(model)  # recorded with the checkpoints: a resume from another teacher is refused
    if isinstance(model, str):
        from ..embedded import resolve_model_path
        from ..validation import check_checkpoint

        check_checkpoint(resolve_model_path(model))
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model_path(model), use_safetensors=True, trust_remote_code=False
        )
    if args.use_lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=args.lora_target_modules or "all-linear",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    pad = getattr(processing_class, "pad_token_id", None)
    trainer = _CorrectionTrainer(
        model=model,
        args=args,
        data_collator=DataCollatorForDistillation(pad_token_id=pad if pad is not None else 0),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
        callbacks=callbacks,
    )
    # Rerunning the same command after an interruption continues from the newest complete checkpoint.
    trainer.train(resume_from_checkpoint=resume_checkpoint(args, {"teacher": source}))

    if args.use_lora:
        # The merge needs the full weights: gather them (a no-op without sharding) into the unwrapped model.
        model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).merge_and_unload()
        if trainer.accelerator.is_main_process:
            with atomic_directory(args.corrected_model_dir, overwrite=True) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                check_finite_weights(tmp)
                if processing_class is not None:
                    processing_class.save_pretrained(tmp)
    else:
        # Trainer.save_model gathers FSDP / ZeRO-3 shards (every process); only the main process writes.
        atomic_save_model(trainer, args.corrected_model_dir)
        model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    trainer.accelerator.wait_for_everyone()
    return model
