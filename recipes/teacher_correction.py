"""Teacher correction (paper 2, §2): fine-tune the teacher on the distillation data before pruning.

Usage (the embedded SmolLM2-135M teacher on the embedded corpus, one process):

    accelerate launch --config_file recipes/accelerate_configs/single_process.yaml \
        recipes/teacher_correction.py --config recipes/smollm2-135m/teacher_correction.yaml

Any field can be overridden on the command line, e.g. `--use_lora true --max_steps 50`. Multi-GPU: swap in
`recipes/accelerate_configs/{ddp,fsdp,deepspeed_zero3}.yaml`.
"""

import sys

from trl import TrlParser

from hf_minitron.cli import report_errors
from hf_minitron.commands.correct_teacher import CorrectTeacherArguments, correct_teacher_checkpoint
from hf_minitron.distillation.teacher_correction import TeacherCorrectionConfig
from hf_minitron.validation import check_renamed_options


def main(script_args: CorrectTeacherArguments, training_args: TeacherCorrectionConfig):
    # 1. Check the arguments against the teacher's config and pack the distillation data (the data the pruned student
    # will later be trained on); 2. fine-tune the teacher (full or LoRA) and write a standard checkpoint to
    # corrected_model_dir. Both live in the package, shared with `hf-minitron correct-teacher`.
    correct_teacher_checkpoint(script_args, training_args)
    if training_args.process_index == 0:
        print(f"Corrected teacher: {training_args.corrected_model_dir}")


if __name__ == "__main__":

    def run():
        check_renamed_options(
            (CorrectTeacherArguments, TeacherCorrectionConfig), sys.argv[1:]
        )  # old option names, refused by name
        parser = TrlParser((CorrectTeacherArguments, TeacherCorrectionConfig))
        main(*parser.parse_args_and_config())

    # Our errors (a bad value, a missing file, a run made with other settings) as one line, not a traceback.
    sys.exit(report_errors(run))
