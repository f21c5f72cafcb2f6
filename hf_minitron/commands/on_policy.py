"""On-policy distillation of a checkpoint on disk from a live teacher: what `hf-minitron on-policy` and
`recipes/on_policy.py` run.

After KD, the student samples continuations of prompts cut from the training text and learns the teacher's
next-token distribution on its own samples (GKD, [arXiv:2306.13649](https://arxiv.org/abs/2306.13649)); see
[`~hf_minitron.distillation.on_policy`]. This module loads both checkpoints and the data, runs TRL's
`DistillationTrainer` and writes a stock checkpoint.
"""

import os
from dataclasses import dataclass, field

from ..data import TextDataArguments
from ..distillation.on_policy import OnPolicyConfig
from ..fingerprints import files_fingerprint, model_fingerprint
from ..io import atomic_save_model, resume_checkpoint
from ..output_lock import output_locks
from ..validation import check_same_tokenizer, check_sequence_length, load_model_config
from .distill import check_student_and_teacher


@dataclass
class OnPolicyArguments(TextDataArguments):
    """The student, the teacher and the data (the fields of [`~hf_minitron.data.TextDataArguments`], then these).

    Args:
        student (`str`): the student checkpoint, e.g. the output of `hf-minitron distill`. Required.
        teacher (`str`, *optional*): the teacher checkpoint or `embedded`; defaults to
            `OnPolicyConfig.teacher_model_name_or_path`. It runs live: a teacher cache cannot score the student's own
            samples.
        final_model_dir (`str`, *optional*): where the trained checkpoint is written; defaults to `{output_dir}/final`.
    """

    student: str | None = field(
        default=None, metadata={"help": "Student checkpoint, e.g. the distilled model (required)."}
    )
    teacher: str | None = field(
        default=None, metadata={"help": "Teacher checkpoint or 'embedded' (default: teacher_model_name_or_path)."}
    )
    final_model_dir: str | None = field(
        default=None, metadata={"help": "Output checkpoint (default: output_dir/final)."}
    )


def on_policy_checkpoint(args: OnPolicyArguments, config: OnPolicyConfig):
    """Trains `args.student` on its own samples scored by `args.teacher`; saves the result to `args.final_model_dir`.

    Returns:
        `trl.DistillationTrainer`: the trainer after training (its `state.log_history` holds the losses).

    Holds the output lock of every folder it writes (one writer per folder, see `output_lock.py`).
    """
    with output_locks(config.output_dir, args.final_model_dir or os.path.join(config.output_dir, "final")):
        return _on_policy_checkpoint(args, config)


def _on_policy_checkpoint(args: OnPolicyArguments, config: OnPolicyConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..distillation.on_policy import build_on_policy_trainer, check_live_teacher

    # Everything that can be checked from configs and tokenizers fails here, before data packing and weights.
    if config.prompt_length > args.seq_length:
        raise ValueError(
            f"OnPolicyConfig.prompt_length={config.prompt_length} is longer than the packed samples it is cut from "
            f"(OnPolicyArguments.seq_length={args.seq_length}): use prompt_length <= seq_length."
        )
    student_path, teacher, teacher_path, final_model_dir = check_student_and_teacher(
        args, config, "the checkpoint to train, e.g. the output of `hf-minitron distill` (outputs/distilled/final)"
    )
    check_live_teacher(teacher_path)
    student_config = load_model_config(student_path)
    check_sequence_length(
        student_config, config.prompt_length + config.max_completion_length, "prompt_length + max_completion_length"
    )
    load_model_config(teacher_path)
    # Custom modeling code in a checkpoint is never run from here: transformers would otherwise ask on stdin.
    tokenizer = AutoTokenizer.from_pretrained(student_path, trust_remote_code=False)
    teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_path, trust_remote_code=False)
    check_same_tokenizer(tokenizer, teacher_tokenizer, args.student, teacher)
    data = args.load_datasets(tokenizer)
    trainer = build_on_policy_trainer(
        AutoModelForCausalLM.from_pretrained(student_path, trust_remote_code=False),
        AutoModelForCausalLM.from_pretrained(teacher_path, trust_remote_code=False),
        config,
        data["train"],
        tokenizer,
        eval_dataset=data.get("validation") if config.eval_strategy != "no" else None,
    )
    # Rerunning the same command after an interruption continues from the newest complete checkpoint.
    inputs = {
        "student": model_fingerprint(student_path),
        "teacher": model_fingerprint(teacher_path),
        "data": {**args.data_settings(), "files": files_fingerprint(args.dataset.split(","))},
    }
    trainer.train(resume_from_checkpoint=resume_checkpoint(config, inputs))
    # Gathers FSDP / ZeRO-3 shards; the main process writes a temporary sibling and renames it into place.
    atomic_save_model(trainer, final_model_dir)
    return trainer
