"""`hf-minitron sft` / `hf-minitron dpo` and `recipes/sft.py` / `recipes/dpo.py`: the data arguments of an alignment
stage and how they load."""

from dataclasses import dataclass, field


@dataclass
class AlignmentArguments:
    """The data of an alignment stage and where the result goes (the model and LoRA are `trl.ModelConfig` fields).

    Args:
        dataset_name (`str`, *optional*, defaults to `"embedded"`): `embedded` (the offline toy chat / preference
            set of `hf_minitron.alignment`) or a `datasets.load_dataset` name / path.
        dataset_train_split (`str`, *optional*, defaults to `"train"`): training split.
        dataset_test_split (`str`, *optional*): evaluation split.
        max_train_samples (`int`, *optional*): cap on training examples.
        chat_template (`str`, *optional*): Jinja string, `.jinja` path or `"chatml"`; defaults to the tokenizer's.
        final_model_dir (`str`, *optional*): output checkpoint; defaults to `{output_dir}/final`.
    """

    dataset_name: str = field(default="embedded", metadata={"help": "'embedded' or a dataset name / path."})
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_test_split: str | None = field(default=None, metadata={"help": "Evaluation split (optional)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on training examples."})
    chat_template: str | None = field(default=None, metadata={"help": "Jinja string, .jinja path or 'chatml'."})
    final_model_dir: str | None = field(
        default=None, metadata={"help": "Output checkpoint (default: output_dir/final)."}
    )


def load_alignment_data(args: AlignmentArguments, build):
    """`(train, evaluation)` datasets: the embedded toy set made by `build` (`build_sft_dataset` or
    `build_preference_dataset`), or splits of a `datasets.load_dataset` name / path."""
    if args.dataset_name == "embedded":
        test = build(args.dataset_test_split) if args.dataset_test_split else None
        return build(args.dataset_train_split, args.max_train_samples), test
    from datasets import load_dataset

    raw = load_dataset(args.dataset_name)
    train = raw[args.dataset_train_split]
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    return train, raw[args.dataset_test_split] if args.dataset_test_split else None
