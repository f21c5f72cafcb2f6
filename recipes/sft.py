"""Supervised fine-tuning (paper 2, §4): the first alignment stage of the distilled student, with TRL's SFTTrainer.

Usage (SmolLM2-135M-Instruct on the embedded toy chat set, one process, CPU or GPU):

    accelerate launch --config_file recipes/accelerate_configs/single_process.yaml \
        recipes/sft.py --config recipes/smollm2-135m/sft.yaml

Point `--model_name_or_path` at the distilled student (e.g. `outputs/smollm2-135m/final` from `minitron.yaml`) and
`--dataset_name` at a conversational dataset (`messages` column) for a real run. `--use_peft true` trains LoRA
adapters, merged into the weights before saving. Any SFTConfig / ModelConfig field can be overridden on the command
line, e.g. `--max_steps 5`. Then run `recipes/dpo.py` on the result.
"""

from dataclasses import dataclass, field

from trl import ModelConfig, SFTConfig, TrlParser, get_peft_config

from hf_minitron.alignment import build_sft_dataset, run_sft


@dataclass
class ScriptArguments:
    """The data and where the result goes (the model and LoRA settings are `trl.ModelConfig` fields).

    Args:
        dataset_name (`str`, *optional*, defaults to `"embedded"`):
            `"embedded"` (the offline toy chat set, [`~hf_minitron.alignment.build_sft_dataset`]) or a
            `datasets.load_dataset` name / path of a conversational dataset.
        dataset_train_split (`str`, *optional*, defaults to `"train"`): Training split of `dataset_name`.
        dataset_test_split (`str`, *optional*): Evaluation split of `dataset_name` (`"validation"` for `embedded`).
        max_train_samples (`int`, *optional*): Cap on the number of training conversations.
        chat_template (`str`, *optional*):
            Jinja string, `.jinja` path or `"chatml"`; by default the tokenizer's own (an error if it has none).
        final_model_dir (`str`, *optional*): Where the aligned checkpoint is written (default `{output_dir}/final`).
    """

    dataset_name: str = field(default="embedded", metadata={"help": "'embedded' or a conversational dataset."})
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_test_split: str | None = field(default=None, metadata={"help": "Evaluation split (optional)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on training conversations."})
    chat_template: str | None = field(default=None, metadata={"help": "Jinja string, .jinja path or 'chatml'."})
    final_model_dir: str | None = field(
        default=None, metadata={"help": "Output checkpoint (default: output_dir/final)."}
    )


def load_data(script_args: ScriptArguments):
    if script_args.dataset_name == "embedded":
        train = build_sft_dataset(script_args.dataset_train_split, script_args.max_train_samples)
        return train, build_sft_dataset(script_args.dataset_test_split) if script_args.dataset_test_split else None
    from datasets import load_dataset

    raw = load_dataset(script_args.dataset_name)
    train = raw[script_args.dataset_train_split]
    if script_args.max_train_samples is not None:
        train = train.select(range(min(script_args.max_train_samples, len(train))))
    return train, raw[script_args.dataset_test_split] if script_args.dataset_test_split else None


def main(script_args: ScriptArguments, training_args: SFTConfig, model_args: ModelConfig):
    # 1. Chat data (conversational: a `messages` column).
    train, evaluation = load_data(script_args)

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
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig))
    main(*parser.parse_args_and_config())
