"""On-policy distillation after KD (GKD, https://arxiv.org/abs/2306.13649): the student samples continuations of
prompts cut from the training text, the live teacher scores them, and the loss is the reverse KL (`beta: 1.0`) or the
generalised JSD between the two next-token distributions, on TRL's `DistillationTrainer`.

Usage (the distilled student of `recipes/distill.py`, the embedded SmolLM2-135M teacher, one process):

    accelerate launch --config_file recipes/accelerate_configs/single_process.yaml \
        recipes/on_policy.py --config recipes/smollm2-135m/on_policy.yaml

Make the student first with `recipes/distill.py --config recipes/smollm2-135m/distill.yaml`. Any field can be
overridden on the command line, e.g. `--max_steps 50 --beta 0.5`. Multi-GPU: swap in
`recipes/accelerate_configs/{ddp,fsdp,deepspeed_zero3}.yaml`. The same run is `hf-minitron on-policy --config ...`.
"""

import sys

from trl import TrlParser

from hf_minitron.cli import report_errors
from hf_minitron.commands.on_policy import OnPolicyArguments, on_policy_checkpoint
from hf_minitron.distillation.on_policy import OnPolicyConfig


def main(script_args: OnPolicyArguments, training_args: OnPolicyConfig):
    # 1. Load the student, the live teacher and the packed data, cut into prompts; 2. train on the student's own
    # samples scored by the teacher; 3. write a stock checkpoint to final_model_dir. All three live in the package.
    trainer = on_policy_checkpoint(script_args, training_args)

    # 4. Report the last logged loss.
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if trainer.is_world_process_zero() and losses:
        print(f"Final on-policy loss: {losses[-1]:.4f}")


if __name__ == "__main__":

    def run():
        parser = TrlParser((OnPolicyArguments, OnPolicyConfig))
        main(*parser.parse_args_and_config())

    # Our errors (a bad value, a missing file, a run made with other settings) as one line, not a traceback.
    sys.exit(report_errors(run))
