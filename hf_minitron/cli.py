"""The `hf-minitron` command line.

    hf-minitron prune --model embedded --config recipes/smollm2-135m/prune.yaml --output outputs/pruned
    hf-minitron prune --model ./teacher --hidden_size 448 --num_attention_heads 8 --calibration_data data.jsonl ...
    hf-minitron run recipes/smollm2-135m/minitron.yaml --distillation.max_steps 20
    hf-minitron search --config recipes/smollm2-135m/search.yaml --retrain_steps 100
    hf-minitron distill --student outputs/pruned --teacher embedded --config recipes/smollm2-135m/distill.yaml
    hf-minitron cache-teacher --config recipes/smollm2-135m/cache_teacher.yaml --mode topk --top_k 128
    hf-minitron evaluate --model outputs/distilled/final --teacher embedded --limit 50
    hf-minitron push --folder outputs/distilled/final --repo_id me/smollm2-minitron

Every dataclass field is an option (`--help` lists them with their help text); `--config` reads a YAML/JSON file
whose keys are those field names, and options given on the command line override it.
"""

import dataclasses
import sys
from pathlib import Path

from .validation import NonFiniteError, check_field_types, read_config_file


def _read_config_file(path: str) -> dict:
    return read_config_file(path, "--config")


def parse_dataclasses(dataclass_types, argv, prog: str):
    """Parses `argv` into instances of `dataclass_types`, with `--config FILE` providing defaults.

    Unknown keys in the file are an error that names them (a typo must not be silently ignored).
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types, prog=prog)
    parser.add_argument("--config", default=None, help="YAML/JSON file of option values (CLI options override it).")
    config_path = None
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise ValueError("--config needs a file path.")
        config_path = argv[index + 1]
    if config_path:
        values = _read_config_file(config_path)
        valid = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(
                f"Unknown option(s) {unknown} in {config_path!r}. Valid options: {sorted(valid - {'help'})}."
            )
        for cls in dataclass_types:  # argparse converts string defaults only: a list for an int would slip through
            names = {f.name for f in dataclasses.fields(cls)}
            mine = {k: v for k, v in values.items() if k in names}
            values.update(check_field_types(cls, mine, f"--config {config_path!r}"))
        parser.set_defaults(**values)
    *instances, _ = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=False)
    return instances


def _prune(argv):
    from .checkpoint_pruning import PruneArguments, prune_checkpoint
    from .pruning_config import PrunedConfig

    args, config = parse_dataclasses((PruneArguments, PrunedConfig), argv, "hf-minitron prune")
    prune_checkpoint(args, config)


def _run(argv):
    """Runs (or resumes) the whole Minitron chain from a pipeline recipe: `hf-minitron run RECIPE.yaml [--k v]`."""
    from .pipeline import load_pipeline_config, parse_overrides, run_pipeline

    if not argv or argv[0] in ("-h", "--help"):
        from .pipeline import __doc__ as pipeline_doc

        print("usage: hf-minitron run RECIPE.yaml [--key value] [--section.key value] ...\n" + pipeline_doc)
        return
    config_path, overrides = parse_overrides(["--config", *argv] if not argv[0].startswith("--") else argv)
    summary = run_pipeline(*load_pipeline_config(config_path, overrides))
    print(f"Final checkpoint and model card: {summary['final_dir']}")


def _distill(argv):
    from .distillation_config import DistillationConfig
    from .distillation_job import DistillArguments, distill_checkpoint

    args, config = parse_dataclasses((DistillArguments, DistillationConfig), argv, "hf-minitron distill")
    distill_checkpoint(args, config)


def _cache_teacher(argv):
    from .teacher_cache import CacheTeacherArguments, cache_teacher_checkpoint

    (args,) = parse_dataclasses((CacheTeacherArguments,), argv, "hf-minitron cache-teacher")
    cache = cache_teacher_checkpoint(args)
    print(f"Teacher cache ({len(cache)} samples): {args.output_dir}")


def _search(argv):
    from .distillation_config import DistillationConfig
    from .search import SearchConfig
    from .search_job import SearchArguments, print_search_summary, search_checkpoint

    args, config, retraining = parse_dataclasses(
        (SearchArguments, SearchConfig, DistillationConfig), argv, "hf-minitron search"
    )
    print_search_summary(search_checkpoint(args, config, retraining), retraining.output_dir)


def _correct_teacher(argv):
    from .teacher_correction import CorrectTeacherArguments, TeacherCorrectionConfig, correct_teacher_checkpoint

    args, config = parse_dataclasses(
        (CorrectTeacherArguments, TeacherCorrectionConfig), argv, "hf-minitron correct-teacher"
    )
    correct_teacher_checkpoint(args, config)
    print(f"Corrected teacher: {config.corrected_model_dir}")


def _align(argv, stage: str):
    from trl import ModelConfig, SFTConfig, get_peft_config

    from .alignment import (
        AlignmentArguments,
        RPOConfig,
        build_preference_dataset,
        build_sft_dataset,
        load_alignment_data,
        run_dpo,
        run_sft,
    )

    config_class, build, run = {
        "sft": (SFTConfig, build_sft_dataset, run_sft),
        "dpo": (RPOConfig, build_preference_dataset, run_dpo),
    }[stage]
    args, config, model_args = parse_dataclasses(
        (AlignmentArguments, config_class, ModelConfig), argv, f"hf-minitron {stage}"
    )
    if model_args.model_name_or_path is None:
        raise ValueError(f"hf-minitron {stage} needs --model_name_or_path (a checkpoint, or 'embedded').")
    train, evaluation = load_alignment_data(args, build)
    run(
        model_args.model_name_or_path,
        None,  # the tokenizer is loaded from the model path
        train,
        config,
        peft_config=get_peft_config(model_args),
        eval_dataset=evaluation,
        chat_template=args.chat_template,
        final_model_dir=args.final_model_dir,
    )
    print(f"Aligned model: {args.final_model_dir or Path(config.output_dir) / 'final'}")


def _evaluate(argv):
    from .checkpoint_evaluation import EvaluateArguments, evaluate_checkpoints

    (args,) = parse_dataclasses((EvaluateArguments,), argv, "hf-minitron evaluate")
    evaluate_checkpoints(args)
    print(f"Results: {args.output_file}")


def _push(argv):
    from .hub import HubUploadError, PushArguments, push_folder

    (args,) = parse_dataclasses((PushArguments,), argv, "hf-minitron push")
    try:
        url = push_folder(args)
    except HubUploadError as error:
        raise ValueError(str(error)) from None
    if url:
        print(f"Uploaded: {url}")


COMMANDS = {
    "run": (_run, "Run (or resume) the whole chain from a recipe: correct -> prune -> distill -> evaluate -> card."),
    "prune": (_prune, "Estimate Minitron importance and prune a checkpoint (depth and width)."),
    "search": (_search, "Search architectures under a parameter budget: prune, distill briefly and rank candidates."),
    "distill": (_distill, "Distill a (pruned) student from a teacher with the Minitron KD loss."),
    "cache-teacher": (_cache_teacher, "Run the teacher once and store its outputs (exact or top-k) for offline KD."),
    "correct-teacher": (_correct_teacher, "Fine-tune the teacher on the distillation data before pruning."),
    "sft": (lambda argv: _align(argv, "sft"), "Supervised fine-tuning of the distilled student (TRL SFTTrainer)."),
    "dpo": (lambda argv: _align(argv, "dpo"), "DPO / RPO preference optimisation (TRL DPOTrainer)."),
    "evaluate": (_evaluate, "Evaluate a checkpoint (or compare student and teacher) with lm-eval; writes JSON."),
    "push": (_push, "Upload a checkpoint folder with its model card to the Hugging Face Hub."),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<16} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: hf-minitron <command> [options]\n\ncommands:\n" + "\n".join(lines))
        print("\nRun `hf-minitron <command> --help` for the options of a command.")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    command, _ = COMMANDS[argv[0]]
    try:
        command(argv[1:])
    # Our input checks, missing files, a full disk, a diverged training run: no traceback needed.
    except (ValueError, OSError, NonFiniteError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
