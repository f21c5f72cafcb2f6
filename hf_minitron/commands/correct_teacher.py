"""`hf-minitron correct-teacher` and `recipes/teacher_correction.py`: its arguments and the one function that runs it."""

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from ..data import TextDataArguments
from ..distillation.teacher_correction import TeacherCorrectionConfig, correct_teacher
from ..io import check_not_overlapping, check_output_dir


@dataclass
class CorrectTeacherArguments(TextDataArguments):
    """The teacher and the data of teacher correction (paper 2, §2): the fields of
    [`~hf_minitron.data.TextDataArguments`] (the distillation data), then the teacher.

    Args:
        teacher (`str`, *optional*, defaults to `"embedded"`): teacher checkpoint, or `embedded`.
    """

    RENAMED_OPTIONS: ClassVar[dict[str, str]] = {"model": "teacher"}  # refused with the new name

    teacher: str = field(default="embedded", metadata={"help": "Teacher checkpoint or 'embedded'."})


def correct_teacher_checkpoint(args: CorrectTeacherArguments, config: TeacherCorrectionConfig) -> nn.Module:
    """The teacher-correction stage of `hf-minitron correct-teacher` and `recipes/teacher_correction.py`: checks the
    arguments against the teacher's config, packs the data and runs [`correct_teacher`] on the checkpoint."""
    from transformers import AutoTokenizer

    from ..embedded import resolve_model_path
    from ..validation import check_sequence_length, load_model_config

    # Everything that can be checked from the config and the tokenizer fails here, before data packing and weights.
    args.check_steps(config.max_steps)
    model_path = resolve_model_path(args.teacher)
    check_output_dir(config.corrected_model_dir, overwrite=True, sources=[model_path])
    check_not_overlapping(config.output_dir, model_path, "the teacher")
    check_sequence_length(load_model_config(model_path), args.seq_length, "CorrectTeacherArguments.seq_length")
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    data = args.load_datasets(tokenizer)
    eval_dataset = data.get("validation") if config.eval_strategy != "no" else None
    return correct_teacher(model_path, config, data["train"], eval_dataset=eval_dataset, processing_class=tokenizer)
