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

from hf_minitron.data import check_streaming_steps, load_text_datasets
from hf_minitron.embedded import resolve_model_path
from hf_minitron.teacher_correction import TeacherCorrectionConfig, correct_teacher


@dataclass
class ScriptArguments:
    """The teacher and the data.

    Args:
        model_name_or_path (`str`, *optional*, defaults to `"embedded"`):
            Teacher checkpoint; `"embedded"` is the bundled SmolLM2-135M-Instruct.
        dataset_name (`str`, *optional*, defaults to `"embedded"`):
            `"embedded"` (the offline corpus), local text/jsonl/parquet/csv files (comma separated), or a Hub dataset.
        text_column (`str`, *optional*, defaults to `"text"`): Column holding the text.
        seq_length (`int`, *optional*, defaults to `512`): Packed sample length in tokens.
        max_train_samples (`int`, *optional*): Cap on the number of packed training samples.
        streaming (`bool`, *optional*, defaults to `False`): read, tokenize and pack a large corpus lazily instead of
            loading it (needs `max_steps`); the first `streaming_validation_documents` documents are held out.
        streaming_validation_documents (`int`, *optional*, defaults to `64`): Documents held out when streaming.
    """

    model_name_or_path: str = field(default="embedded", metadata={"help": "Teacher checkpoint or 'embedded'."})
    dataset_name: str = field(
        default="embedded", metadata={"help": "'embedded', local .txt/.jsonl/.parquet/.csv files, or a Hub dataset."}
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    seq_length: int = field(default=512, metadata={"help": "Packed sample length in tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on packed training samples."})
    streaming: bool = field(
        default=False, metadata={"help": "Stream a large corpus (read and packed lazily; needs max_steps)."}
    )
    streaming_validation_documents: int = field(
        default=64, metadata={"help": "Documents held out for validation when streaming."}
    )


def main(script_args: ScriptArguments, training_args: TeacherCorrectionConfig):
    # 1. Tokenizer and data (the distillation data the pruned student will later be trained on).
    check_streaming_steps(script_args.streaming, training_args.max_steps, "ScriptArguments.streaming")
    model_path = resolve_model_path(script_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = load_text_datasets(
        script_args.dataset_name,
        tokenizer,
        script_args.seq_length,
        script_args.text_column,
        max_train_samples=script_args.max_train_samples,
        streaming=script_args.streaming,
        streaming_validation_documents=script_args.streaming_validation_documents,
    )

    # 2. Fine-tune the teacher (full or LoRA) and write a standard checkpoint to corrected_model_dir.
    correct_teacher(
        model_path,
        training_args,
        train_dataset=data["train"],
        eval_dataset=data.get("validation") if training_args.eval_strategy != "no" else None,
        processing_class=tokenizer,
    )


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, TeacherCorrectionConfig))
    main(*parser.parse_args_and_config())
