"""Teacher correction (paper 2, §2): fine-tune the teacher on the distillation data before pruning.

Usage (the embedded SmolLM2-135M teacher on the embedded corpus, one process):

    accelerate launch --config_file recipes/accelerate_configs/single_process.yaml \
        recipes/teacher_correction.py --config recipes/smollm2-135m/teacher_correction.yaml

Any field can be overridden on the command line, e.g. `--use_lora true --max_steps 50`. Multi-GPU: swap in
`recipes/accelerate_configs/{ddp,fsdp,deepspeed_zero3}.yaml`.
"""

from dataclasses import dataclass, field

from transformers import AutoTokenizer
from trl import TrlParser

from hf_minitron.data import embedded_datasets
from hf_minitron.embedded import resolve_model_path
from hf_minitron.teacher_correction import TeacherCorrectionConfig, correct_teacher


@dataclass
class ScriptArguments:
    """The teacher and the data.

    Args:
        model_name_or_path (`str`, *optional*, defaults to `"embedded"`):
            Teacher checkpoint; `"embedded"` is the bundled SmolLM2-135M-Instruct.
        dataset_name (`str`, *optional*, defaults to `"embedded"`):
            `"embedded"` (the offline corpus) or a `datasets.load_dataset` name / path with a `text` column.
        seq_length (`int`, *optional*, defaults to `512`): Packed sample length in tokens.
        max_train_samples (`int`, *optional*): Cap on the number of packed training samples.
    """

    model_name_or_path: str = field(default="embedded", metadata={"help": "Teacher checkpoint or 'embedded'."})
    dataset_name: str = field(default="embedded", metadata={"help": "'embedded' or a dataset with a 'text' column."})
    seq_length: int = field(default=512, metadata={"help": "Packed sample length in tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on packed training samples."})


def load_data(script_args: ScriptArguments, tokenizer):
    if script_args.dataset_name == "embedded":
        return embedded_datasets(tokenizer, script_args.seq_length, script_args.max_train_samples)
    from datasets import load_dataset

    from hf_minitron.data import pack_texts

    raw = load_dataset(script_args.dataset_name)
    return {
        split: pack_texts(raw[split]["text"], tokenizer, script_args.seq_length, script_args.max_train_samples)
        for split in raw
    }


def main(script_args: ScriptArguments, training_args: TeacherCorrectionConfig):
    # 1. Tokenizer and data (the distillation data the pruned student will later be trained on).
    model_path = resolve_model_path(script_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = load_data(script_args, tokenizer)

    # 2. Fine-tune the teacher (full or LoRA) and write a standard checkpoint to corrected_model_dir.
    correct_teacher(
        model_path,
        training_args,
        train_dataset=data["train"],
        eval_dataset=data.get("validation"),
        processing_class=tokenizer,
    )


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, TeacherCorrectionConfig))
    main(*parser.parse_args_and_config())
