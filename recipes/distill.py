"""Knowledge distillation (paper 1 §2.4, paper 2 §2): retrain the pruned student from the (corrected) teacher.

Usage (a student pruned from the embedded SmolLM2-135M teacher, on the embedded corpus, one process):

    accelerate launch --config_file recipes/accelerate_configs/single_process.yaml \
        recipes/distill.py --config recipes/smollm2-135m/distill.yaml

Make the student first with `hf-minitron prune --config recipes/smollm2-135m/prune.yaml --output_dir outputs/pruned`.
Any field can be overridden on the command line, e.g. `--max_steps 50 --kd_loss reverse_kl`. Multi-GPU: swap in
`recipes/accelerate_configs/{ddp,fsdp,deepspeed_zero3}.yaml`. The same run is `hf-minitron distill --config ...`.
"""

import sys

from trl import TrlParser

from hf_minitron.cli import report_errors
from hf_minitron.commands.distill import DistillArguments, distill_checkpoint
from hf_minitron.distillation.config import DistillationConfig


def main(script_args: DistillArguments, training_args: DistillationConfig):
    # 1. Load the student, the frozen teacher and the packed data; 2. distill with the Minitron KD loss;
    # 3. write a stock checkpoint (with the tokenizer) to final_model_dir. All three live in the package.
    trainer = distill_checkpoint(script_args, training_args)

    # 4. Report how the run was distributed and the last logged loss.
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if trainer.is_world_process_zero():
        print(f"Distributed: {trainer.accelerator.distributed_type.value}; teacher: {trainer.teacher_placement}")
        if losses:
            print(f"Final training loss: {losses[-1]:.4f}")


if __name__ == "__main__":

    def run():
        parser = TrlParser((DistillArguments, DistillationConfig))
        main(*parser.parse_args_and_config())

    # Our errors (a bad value, a missing file, a run made with other settings) as one line, not a traceback.
    sys.exit(report_errors(run))
