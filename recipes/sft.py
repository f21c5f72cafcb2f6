"""Supervised fine-tuning (paper 2, §4): the first alignment stage of the distilled student, with TRL's SFTTrainer.

Usage (SmolLM2-135M-Instruct on the embedded toy chat set, one process, CPU or GPU):

    accelerate launch --config_file recipes/accelerate_configs/single_process.yaml \
        recipes/sft.py --config recipes/smollm2-135m/sft.yaml

Point `--model_name_or_path` at the distilled student (e.g. `outputs/smollm2-135m/final` from `minitron.yaml`) and
`--dataset_name` at a conversational dataset (`messages` column) for a real run. `--use_peft true` trains LoRA
adapters, merged into the weights before saving. Any SFTConfig / ModelConfig field can be overridden on the command
line, e.g. `--max_steps 5`. Then run `recipes/dpo.py` on the result.
"""

import sys

from trl import ModelConfig, SFTConfig, TrlParser, get_peft_config

from hf_minitron.alignment import build_sft_dataset, run_sft
from hf_minitron.cli import report_errors
from hf_minitron.commands.align import AlignmentArguments, load_alignment_data


def main(script_args: AlignmentArguments, training_args: SFTConfig, model_args: ModelConfig):
    # 1. Chat data (conversational: a `messages` column).
    train, evaluation = load_alignment_data(script_args, build_sft_dataset)

    # 2. Fine-tune (full or LoRA, merged) and write a stock checkpoint with its chat template.
    run_sft(
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
        parser = TrlParser((AlignmentArguments, SFTConfig, ModelConfig))
        main(*parser.parse_args_and_config())

    # Our errors (a bad value, a missing file, a run made with other settings) as one line, not a traceback.
    sys.exit(report_errors(run))
