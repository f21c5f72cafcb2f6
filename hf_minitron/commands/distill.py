"""Distill a checkpoint on disk from a teacher on disk: what `hf-minitron distill` and `recipes/distill.py` run.

Minitron retrains the pruned student with logit distillation from the (corrected) teacher
([paper 1](https://arxiv.org/abs/2407.14679) §2.4, [paper 2](https://arxiv.org/abs/2408.11796) §2); this module
loads both checkpoints and the data, runs [`DistillationTrainer`] and writes a stock checkpoint.
"""

import os
from dataclasses import dataclass, field

from ..data import TextDataArguments
from ..distillation.config import DistillationConfig
from ..fingerprints import files_fingerprint, model_fingerprint
from ..hub import check_trainer_push_ready
from ..io import atomic_save_model, check_not_overlapping, check_output_dir, resume_checkpoint
from ..output_lock import output_locks
from ..validation import check_same_tokenizer, check_sequence_length, load_model_config


@dataclass
class DistillArguments(TextDataArguments):
    """The student, the teacher and the data (the fields of [`~hf_minitron.data.TextDataArguments`], then these).

    Args:
        student (`str`): the (pruned) student checkpoint, e.g. the output of `hf-minitron prune`. Required: distilling
            a model from itself teaches it nothing.
        teacher (`str`, *optional*): the teacher checkpoint or `embedded`; defaults to
            `DistillationConfig.teacher_model_name_or_path`.
        final_model_dir (`str`, *optional*): where the distilled checkpoint is written; defaults to
            `{output_dir}/final`.
    """

    student: str | None = field(
        default=None, metadata={"help": "Student checkpoint, e.g. the pruned model (required)."}
    )
    teacher: str | None = field(
        default=None, metadata={"help": "Teacher checkpoint or 'embedded' (default: teacher_model_name_or_path)."}
    )
    final_model_dir: str | None = field(
        default=None, metadata={"help": "Output checkpoint (default: output_dir/final)."}
    )


def distill_checkpoint(args: DistillArguments, config: DistillationConfig):
    """Distills `args.student` from `args.teacher` and saves the result to `args.final_model_dir`.

    Returns:
        `DistillationTrainer`: the trainer after training (its `state.log_history` holds the losses).

    Holds the output lock of every folder it writes (one writer per folder, see `output_lock.py`).
    """
    with output_locks(config.output_dir, args.final_model_dir or os.path.join(config.output_dir, "final")):
        return _distill_checkpoint(args, config)


def check_student_and_teacher(args, config, student_hint: str):
    """What a student-from-teacher command checks before reading any weights: a student and a teacher are given,
    the steps are in bounds, the outputs neither are nor hold either model, and an upload the trainer would make has
    its credentials. Returns `(student_path, teacher, teacher_path, final_model_dir)`; `teacher_path` is `None` for
    a teacher passed as a loaded model."""
    from ..embedded import resolve_model_path

    if not args.student:
        raise ValueError(f"{type(args).__name__}.student is not set: pass --student with {student_hint}.")
    teacher = args.teacher or config.teacher_model_name_or_path
    if teacher is None:
        raise ValueError("No teacher: pass --teacher PATH (or set teacher_model_name_or_path).")
    student_path = resolve_model_path(args.student)
    teacher_path = resolve_model_path(teacher) if isinstance(teacher, str) else None
    args.check_steps(config.max_steps)
    final_model_dir = args.final_model_dir or os.path.join(config.output_dir, "final")
    check_output_dir(final_model_dir, overwrite=True, sources=[student_path, teacher_path])
    check_trainer_push_ready(config)  # a missing token fails now, not after loading and training
    for source, what in ((student_path, "the student"), (teacher_path, "the teacher")):
        check_not_overlapping(config.output_dir, source, what)
    return student_path, teacher, teacher_path, final_model_dir


def _distill_checkpoint(args: DistillArguments, config: DistillationConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..distillation.trainer import DistillationTrainer

    # Everything that can be checked from configs and tokenizers fails here, before data packing and weights.
    student_path, teacher, teacher_path, final_model_dir = check_student_and_teacher(
        args,
        config,
        "the checkpoint to distil into, e.g. the output of `hf-minitron prune` (outputs/smollm2-135m-stages/pruned)",
    )
    student_config = load_model_config(student_path)
    check_sequence_length(student_config, args.seq_length, "DistillArguments.seq_length")
    # Custom modeling code in a checkpoint is never run from here: transformers would otherwise ask on stdin.
    tokenizer = AutoTokenizer.from_pretrained(student_path, trust_remote_code=False)
    if teacher_path is not None:
        load_model_config(teacher_path)
        teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_path, trust_remote_code=False)
        check_same_tokenizer(tokenizer, teacher_tokenizer, args.student, teacher)
    data = args.load_datasets(tokenizer)
    trainer = DistillationTrainer(
        model=AutoModelForCausalLM.from_pretrained(student_path, trust_remote_code=False),
        teacher_model=teacher,
        args=config,
        train_dataset=data["train"],
        eval_dataset=data.get("validation") if config.eval_strategy != "no" else None,
        processing_class=tokenizer,
    )
    # Rerunning the same command after an interruption continues from the newest complete checkpoint.
    inputs = {
        "student": model_fingerprint(student_path),
        "teacher": model_fingerprint(teacher_path or teacher),
        "data": {**args.data_settings(), "files": files_fingerprint(args.dataset.split(","))},
    }
    trainer.train(resume_from_checkpoint=resume_checkpoint(config, inputs))
    # Gathers FSDP / ZeRO-3 shards; the main process writes a temporary sibling and renames it into place.
    atomic_save_model(trainer, final_model_dir)
    return trainer
