"""Preference optimisation (paper 2, §4): DPO, or RPO with `rpo_alpha`, on the SFT model with TRL's DPOTrainer.

Usage (the output of `recipes/sft.py` on the embedded toy preference pairs, one process, CPU or GPU):

    accelerate launch --config_file recipes/accelerate_configs/single_process.yaml \
        recipes/dpo.py --config recipes/smollm2-135m/dpo.yaml

`--dataset_name` takes a preference dataset (`prompt` / `chosen` / `rejected`) for a real run, `--use_peft true`
trains LoRA adapters (merged before saving; the reference is then the adapter-free model), `--rpo_alpha` weights the
NLL term on the chosen answers (unset: plain DPO). Any RPOConfig / ModelConfig field can be overridden on the command
line, e.g. `--beta 0.05`.
"""

import sys

from trl import ModelConfig, TrlParser, get_peft_config

from hf_minitron.alignment import RPOConfig, build_preference_dataset, run_dpo
from hf_minitron.cli import report_errors
from hf_minitron.commands.align import AlignmentArguments, load_alignment_data


def main(script_args: AlignmentArguments, training_args: RPOConfig, model_args: ModelConfig):
    # 1. Preference pairs (`prompt`, `chosen`, `rejected`).
    train, evaluation = load_alignment_data(script_args, build_preference_dataset)

    # 2. DPO / RPO against a frozen copy of the starting model (full) or the adapter-free model (LoRA); the result is
    #    a stock checkpoint.
    run_dpo(
        model_args.model_name_or_path,
        None,  # the tokenizer is loaded from the model path
        train,
        training_args,
        peft_config=get_peft_config(model_args),
        eval_dataset=evaluation,
        chat_template=script_args.chat_template,
        final_model_dir=script_args.final_model_dir,
    )


if __name__ == "__main__":

    def run():
        parser = TrlParser((AlignmentArguments, RPOConfig, ModelConfig))
        main(*parser.parse_args_and_config())

    # Our errors (a bad value, a missing file, a run made with other settings) as one line, not a traceback.
    sys.exit(report_errors(run))
