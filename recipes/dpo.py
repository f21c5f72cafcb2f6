"""Preference optimisation (paper 2, §4): DPO, or RPO with `rpo_alpha`, on the SFT model with TRL's DPOTrainer.

Usage (the output of `recipes/sft.py` on the embedded toy preference pairs, one process, CPU or GPU):

    accelerate launch --config_file recipes/accelerate_configs/single_process.yaml \
        recipes/dpo.py --config recipes/smollm2-135m/dpo.yaml

`--dataset_name` takes a preference dataset (`prompt` / `chosen` / `rejected`) for a real run, `--use_peft true`
trains LoRA adapters (merged before saving; the reference is then the adapter-free model), `--rpo_alpha` weights the
NLL term on the chosen answers (unset: plain DPO). Any RPOConfig / ModelConfig field can be overridden on the command
line, e.g. `--beta 0.05`.
"""

from dataclasses import dataclass, field

from trl import ModelConfig, TrlParser, get_peft_config

from hf_minitron.alignment import RPOConfig, build_preference_dataset, run_dpo


@dataclass
class ScriptArguments:
    """The data and where the result goes (the model and LoRA settings are `trl.ModelConfig` fields).

    Args:
        dataset_name (`str`, *optional*, defaults to `"embedded"`):
            `"embedded"` (the offline toy pairs, [`~hf_minitron.alignment.build_preference_dataset`]) or a
            `datasets.load_dataset` name / path of a preference dataset.
        dataset_train_split (`str`, *optional*, defaults to `"train"`): Training split of `dataset_name`.
        dataset_test_split (`str`, *optional*): Evaluation split of `dataset_name` (`"validation"` for `embedded`).
        max_train_samples (`int`, *optional*): Cap on the number of training pairs.
        chat_template (`str`, *optional*):
            Jinja string, `.jinja` path or `"chatml"`; by default the tokenizer's own (an error if it has none).
        final_model_dir (`str`, *optional*): Where the aligned checkpoint is written (default `{output_dir}/final`).
    """

    dataset_name: str = field(default="embedded", metadata={"help": "'embedded' or a preference dataset."})
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_test_split: str | None = field(default=None, metadata={"help": "Evaluation split (optional)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on training pairs."})
    chat_template: str | None = field(default=None, metadata={"help": "Jinja string, .jinja path or 'chatml'."})
    final_model_dir: str | None = field(
        default=None, metadata={"help": "Output checkpoint (default: output_dir/final)."}
    )


def load_data(script_args: ScriptArguments):
    if script_args.dataset_name == "embedded":
        train = build_preference_dataset(script_args.dataset_train_split, script_args.max_train_samples)
        test = script_args.dataset_test_split
        return train, build_preference_dataset(test) if test else None
    from datasets import load_dataset

    raw = load_dataset(script_args.dataset_name)
    train = raw[script_args.dataset_train_split]
    if script_args.max_train_samples is not None:
        train = train.select(range(min(script_args.max_train_samples, len(train))))
    return train, raw[script_args.dataset_test_split] if script_args.dataset_test_split else None


def main(script_args: ScriptArguments, training_args: RPOConfig, model_args: ModelConfig):
    # 1. Preference pairs (`prompt`, `chosen`, `rejected`).
    train, evaluation = load_data(script_args)

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
    parser = TrlParser((ScriptArguments, RPOConfig, ModelConfig))
    main(*parser.parse_args_and_config())
