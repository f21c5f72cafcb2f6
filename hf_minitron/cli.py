"""The `hf-minitron` command line.

    hf-minitron prune --teacher embedded --config recipes/smollm2-135m/prune.yaml --output_dir outputs/pruned
    hf-minitron prune --teacher ./teacher --hidden_size 448 --num_attention_heads 8 --calibration_data data.jsonl ...
    hf-minitron run recipes/smollm2-135m/minitron.yaml --distillation.max_steps 20
    hf-minitron search --config recipes/smollm2-135m/search.yaml --retrain_steps 100
    hf-minitron distill --student outputs/pruned --teacher embedded --config recipes/smollm2-135m/distill.yaml
    hf-minitron on-policy --student outputs/distilled/final --teacher embedded --max_steps 50
    hf-minitron cache-teacher --config recipes/smollm2-135m/cache_teacher.yaml --mode topk --top_k 128
    hf-minitron evaluate --model outputs/distilled/final --teacher embedded --limit 50
    hf-minitron push --folder outputs/distilled/final --repo_id me/smollm2-minitron

Every dataclass field is an option (`--help` lists them with their help text); `--config` reads a YAML/JSON file
whose keys are those field names, and options given on the command line override it.

One module, past 500 lines: the parsing shared by every command, the fast help path and the table of commands are what
`hf-minitron` is; each command's work lives in `hf_minitron/commands/`.
"""

import argparse
import dataclasses
import hashlib
import sys
from pathlib import Path


# Nothing heavy is imported at module level: `hf-minitron <command> --help` must not wait for torch, transformers,
# peft and lm-eval (each command imports what it runs).


def _read_config_file(path: str) -> dict:
    from .validation import read_config_file

    return read_config_file(path, "--config")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each option's help, and the description (examples) printed as written."""


def _owner(cls, name: str):
    """The class in `cls`'s MRO that declares the field `name` (e.g. `TrainingArguments` for `learning_rate`)."""
    return next(base for base in cls.__mro__ if name in base.__dict__.get("__annotations__", {}))


def _is_ours(cls) -> bool:
    return cls.__module__.split(".")[0] == "hf_minitron"


# The options of a base class (`TrainingArguments`, TRL's `_BaseConfig`) that `--help` shows; `--help-all` lists the
# other few hundred. These are the ones a Minitron run sets.
COMMON_INHERITED_OPTIONS = (
    "output_dir", "max_steps", "num_train_epochs", "learning_rate", "lr_scheduler_type", "warmup_steps",
    "weight_decay", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
    "gradient_checkpointing", "bf16", "fp16", "use_cpu", "logging_steps", "eval_strategy", "eval_steps",
    "save_strategy", "save_steps", "save_total_limit", "report_to", "seed", "resume_from_checkpoint", "push_to_hub",
    "hub_model_id", "deepspeed", "fsdp",
)  # fmt: skip


# The trainers' common base classes: their few hundred options are the same in every command.
_BASE_CONFIGS = ("TrainingArguments", "_BaseConfig")


def _group_options(parser, dataclass_types, full: bool = True) -> None:
    """One help section per dataclass, hf-minitron's own first: a subclass of `TrainingArguments` (or of a TRL config)
    lists its inherited options in a section of their own, after ours, instead of burying ours at the end. Among the
    inherited sections, the one that names the model to train comes first. Unless `full`, a base class's section
    shows only its common options and says how many more `--help-all` lists (all of them still parse)."""
    sections: dict[tuple[int, str], list[str]] = {}
    based: set[str] = set()
    for cls in dataclass_types:
        for f in dataclasses.fields(cls):
            owner = _owner(cls, f.name)
            title = f"{owner.__module__.split('.')[0]}.{owner.__name__}"
            key = (0, cls.__name__) if _is_ours(owner) else (1, title)
            if owner.__name__ in _BASE_CONFIGS:
                based.add(title)
            sections.setdefault(key, []).append(f.name)
    actions = {}
    for action in parser._optionals._group_actions:
        actions.setdefault(action.dest, []).append(action)

    def order(item):
        (theirs, title), names = item
        return (theirs, 0 if "model_name_or_path" in names else 1, title in based)  # stable within each rank

    for (theirs, title), names in sorted(sections.items(), key=order):
        hidden = [n for n in names if n not in COMMON_INHERITED_OPTIONS] if title in based and not full else []
        if theirs:
            description = f"Inherited from {title}: the standard options of the trainer."
            if hidden:
                description += f" {len(hidden)} more: `--help-all` lists them."
            group = parser.add_argument_group(f"{title} options", description)
        else:
            group = parser.add_argument_group(f"{title} options (hf-minitron)")
        for name in names:
            for action in actions.pop(name, []):
                parser._optionals._group_actions.remove(action)
                group._group_actions.append(action)
                if name in hidden:
                    action.help = argparse.SUPPRESS


def _fix_negative_flags(parser) -> None:
    # HfArgumentParser adds `--no_X` for a boolean that defaults to True, with X's own help and `(default: False)`:
    # read as written, that help says the opposite of what the flag does.
    for action in parser._actions:
        if isinstance(action, argparse._StoreFalseAction) and action.option_strings[0].startswith("--no_"):
            action.help = f"Turn --{action.dest} off (the same as --{action.dest} false)."
            action.default = argparse.SUPPRESS  # the positive flag's action holds the default


def build_parser(dataclass_types, prog: str, description: str | None = None, full_help: bool = True):
    """The `HfArgumentParser` of a command: one option per dataclass field, `--config FILE`, grouped help (with
    `full_help=False`, the common inherited options only)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        dataclass_types,
        prog=prog,
        usage=f"{prog} [--config FILE] [--option value ...]",
        description=description,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML/JSON file of option values (CLI options override it).")
    parser.add_argument("--help-all", action="store_true", help="List every option, the inherited ones too.")
    _group_options(parser, dataclass_types, full_help)
    _fix_negative_flags(parser)
    return parser


def parse_dataclasses(dataclass_types, argv, prog: str):
    """Parses `argv` into instances of `dataclass_types`, with `--config FILE` providing defaults.

    Unknown keys in the file are an error that names them (a typo must not be silently ignored). `-h` / `--help`
    prints the options (and stores the text for the next `--help`, see [`cached_help`]) and exits.
    """
    from .validation import check_field_types, check_renamed_options

    command = prog.split()[-1]
    if argv in (["-h"], ["--help"], ["--help-all"]):
        full = argv == ["--help-all"]
        text = build_parser(dataclass_types, prog, _description(command), full_help=full).format_help()
        _store_help(command + ("-all" if full else ""), text)
        print(text, end="")
        raise SystemExit(0)
    parser = build_parser(dataclass_types, prog, _description(command))
    check_renamed_options(dataclass_types, argv)
    _check_option_names(parser, argv)
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


def _check_option_names(parser, argv) -> None:
    # argparse names an unknown option without a guess; a typo (`--hiden_size`) deserves the option it missed.
    import difflib

    valid = set(parser._option_string_actions)
    for arg in argv:
        if arg.startswith("--") and arg.split("=", 1)[0] not in valid:
            name = arg.split("=", 1)[0]
            guess = difflib.get_close_matches(name, sorted(valid), n=1)
            hint = f" Did you mean {guess[0]}?" if guess else " `--help` lists the options."
            raise ValueError(f"Unknown option {name}.{hint}")


# ---------------------------------------------------------------------------------------------- help, fast
def _help_path(command: str) -> Path:
    """Where the help text of `command` is kept, keyed by everything that shapes it: our sources, the versions of the
    libraries whose dataclasses we extend, and the terminal width. Any change makes a new key."""
    from importlib import metadata

    from .embedded import cache_dir

    package = Path(__file__).parent
    key = [command, str(_terminal_width())]
    for path in sorted(package.rglob("*.py")):
        stat = path.stat()
        key.append(f"{path.relative_to(package)}:{stat.st_mtime_ns}:{stat.st_size}")
    for name in ("transformers", "trl", "peft", "accelerate"):
        try:
            key.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            key.append(f"{name}: none")
    digest = hashlib.sha256("\n".join(key).encode()).hexdigest()[:16]
    return cache_dir() / "help" / f"{command}-{digest}.txt"


def _terminal_width() -> int:
    import shutil

    return shutil.get_terminal_size().columns  # argparse wraps to $COLUMNS, or the terminal's width


def prepare_help(widths=(80, 100, 120)) -> int:
    """Renders and stores every command's `--help` (and `--help-all`) at these terminal widths and the current one;
    returns how many texts were stored. `make install` runs it (`python -m hf_minitron.cli --prepare-help`): building
    a help text imports transformers, peft and TRL (10-25 s on a small CPU), so a first `--help` would wait for them."""
    import contextlib
    import io
    import os

    stored = 0
    previous = os.environ.get("COLUMNS")
    try:
        for width in sorted({*widths, _terminal_width()}):
            os.environ["COLUMNS"] = str(width)
            for name, (command, _, _) in COMMANDS.items():
                for flag in ("--help", "--help-all") if name != "run" else ("--help",):
                    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
                        command([flag])
                    stored += cached_help(name + ("-all" if flag == "--help-all" else "")) is not None
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
    return stored


def cached_help(command: str) -> str | None:
    """The help of `command` as printed the last time, if nothing that shapes it has changed since. Building a help
    text imports the dataclasses of the command, and so transformers, peft and torch (5-15 s on a small CPU)."""
    try:
        return _help_path(command).read_text(encoding="utf-8")
    except OSError:
        return None


def _store_help(command: str, text: str) -> None:
    try:
        from .io import atomic_write_text

        path = _help_path(command)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    except OSError:  # a read-only home is no reason to fail a --help
        pass


def _prune(argv):
    from .commands.prune import PruneArguments, prune_checkpoint
    from .pruning.config import PrunedConfig

    args, config = parse_dataclasses((PruneArguments, PrunedConfig), argv, "hf-minitron prune")
    prune_checkpoint(args, config)


def _run(argv):
    """Runs (or resumes) the whole Minitron chain from a pipeline recipe: `hf-minitron run RECIPE.yaml [--k v]`."""
    if not argv or argv[0] in ("-h", "--help"):
        text = _run_help()
        if argv:
            _store_help("run", text)
        print(text, end="")
        return
    from .commands.run import run_pipeline
    from .commands.run_config import load_pipeline_config, parse_overrides
    from .commands.run_console import quiet_third_party_output

    quiet_third_party_output()
    config_path, overrides = parse_overrides(["--config", *argv] if not argv[0].startswith("--") else argv)
    summary = run_pipeline(*load_pipeline_config(config_path, overrides))
    print(f"Final checkpoint and model card: {summary['final_dir']}")


def _run_help() -> str:
    from .commands import run, run_config

    formatter = _HelpFormatter("hf-minitron run", width=_terminal_width())
    formatter.add_usage("hf-minitron run RECIPE.yaml [--key value] [--section.key value] ...", None, [])
    formatter.add_text(_description("run"))
    formatter.start_section("top-level options (MinitronArguments; --key value, or key: value in the recipe)")
    for f in dataclasses.fields(run_config.MinitronArguments):
        default = f.default if f.default is not dataclasses.MISSING else None
        # SUPPRESS: the formatter would add its own "(default: None)" after ours (these actions hold no default).
        formatter.add_argument(
            argparse.Action(
                [f"--{f.name}"], f.name, default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {default})"
            )
        )
    formatter.end_section()
    formatter.start_section("stage sections (--section.key value, or a section of the recipe)")
    sections = (
        ("--pruning.KEY", "a PrunedConfig field: the target shape and importance (see `hf-minitron prune --help`)"),
        ("--distillation.KEY", "a DistillationConfig field (see `hf-minitron distill --help`)"),
        ("--teacher_correction.KEY", "a TeacherCorrectionConfig field (see `hf-minitron correct-teacher --help`)"),
        ("--on_policy.KEY", "an OnPolicyConfig field (see `hf-minitron on-policy --help`); off unless present"),
        ("--sft.KEY", "an SFT stage field (see `hf-minitron sft --help`); `--sft null` drops the stage"),
        ("--dpo.KEY", "a DPO / RPO stage field (see `hf-minitron dpo --help`)"),
    )
    for option, text in sections:
        formatter.add_argument(argparse.Action([option], option, default=argparse.SUPPRESS, help=text))
    formatter.end_section()
    formatter.add_text(run.__doc__)
    return formatter.format_help()


def _distill(argv):
    from .commands.distill import DistillArguments, distill_checkpoint
    from .distillation.config import DistillationConfig

    args, config = parse_dataclasses((DistillArguments, DistillationConfig), argv, "hf-minitron distill")
    distill_checkpoint(args, config)


def _on_policy(argv):
    from .commands.on_policy import OnPolicyArguments, on_policy_checkpoint
    from .distillation.on_policy import OnPolicyConfig

    args, config = parse_dataclasses((OnPolicyArguments, OnPolicyConfig), argv, "hf-minitron on-policy")
    on_policy_checkpoint(args, config)
    print(f"On-policy distilled model: {args.final_model_dir or Path(config.output_dir) / 'final'}")


def _cache_teacher(argv):
    from .commands.cache_teacher import CacheTeacherArguments, cache_teacher_checkpoint

    (args,) = parse_dataclasses((CacheTeacherArguments,), argv, "hf-minitron cache-teacher")
    cache = cache_teacher_checkpoint(args)
    print(f"Teacher cache ({len(cache)} samples): {args.output_dir}")


def _search(argv):
    from .commands.search import SearchArguments, print_search_summary, search_checkpoint
    from .distillation.config import DistillationConfig
    from .pruning.search_config import SearchConfig

    args, config, retraining = parse_dataclasses(
        (SearchArguments, SearchConfig, DistillationConfig), argv, "hf-minitron search"
    )
    print_search_summary(search_checkpoint(args, config, retraining), retraining.output_dir)


def _correct_teacher(argv):
    from .commands.correct_teacher import CorrectTeacherArguments, correct_teacher_checkpoint
    from .distillation.teacher_correction import TeacherCorrectionConfig

    args, config = parse_dataclasses(
        (CorrectTeacherArguments, TeacherCorrectionConfig), argv, "hf-minitron correct-teacher"
    )
    correct_teacher_checkpoint(args, config)
    print(f"Corrected teacher: {config.corrected_model_dir}")


def _align(argv, stage: str):
    from trl import ModelConfig, SFTConfig, get_peft_config

    from .alignment import RPOConfig, build_preference_dataset, build_sft_dataset, run_dpo, run_sft
    from .commands.align import AlignmentArguments, load_alignment_data

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
    from .commands.evaluate import EvaluateArguments, evaluate_checkpoints

    (args,) = parse_dataclasses((EvaluateArguments,), argv, "hf-minitron evaluate")
    evaluate_checkpoints(args)
    print(f"Results: {args.output_file}")


def _push(argv):
    from .commands.push import PushArguments, push_folder
    from .hub import HubUploadError

    (args,) = parse_dataclasses((PushArguments,), argv, "hf-minitron push")
    try:
        url = push_folder(args)
    except HubUploadError as error:
        raise ValueError(str(error)) from None
    if url:
        print(f"Uploaded: {url}")


# command -> (function, what it does, examples)
COMMANDS = {
    "run": (
        _run,
        "Run (or resume) the whole chain from a recipe: correct -> prune -> distill -> evaluate -> card.",
        [
            "hf-minitron run recipes/smollm2-135m/minitron.yaml    # the demo: ~4 min on a quiet 2-core CPU",
            "hf-minitron run recipes/smollm2-135m/minitron.yaml --output_dir outputs/longer --distillation.max_steps 200",
            "hf-minitron run recipes/smollm2-135m/minitron.yaml --sft null    # without the SFT stage",
            "hf-minitron run recipes/smollm2-135m/minitron_stdlib.yaml    # a useful student: ~1 h on a 2-core CPU",
        ],
    ),
    "prune": (
        _prune,
        "Estimate Minitron importance and prune a checkpoint (depth and width).",
        [
            "hf-minitron prune --config recipes/smollm2-135m/prune.yaml",
            "hf-minitron prune --teacher ./my-llama --hidden_size 3072 --num_attention_heads 32 "
            "--calibration_data data.jsonl --output_dir out/",
        ],
    ),
    "search": (
        _search,
        "Search architectures under a parameter budget: prune, distill briefly and rank candidates.",
        ["hf-minitron search --config recipes/smollm2-135m/search.yaml --retrain_steps 100"],
    ),
    "distill": (
        _distill,
        "Distill a (pruned) student from a teacher with the Minitron KD loss.",
        [
            "hf-minitron distill --student outputs/smollm2-135m-stages/pruned --teacher embedded "
            "--config recipes/smollm2-135m/distill.yaml",
        ],
    ),
    "on-policy": (
        _on_policy,
        "After KD: the student samples continuations, the teacher scores them (GKD, TRL DistillationTrainer).",
        [
            "hf-minitron on-policy --student outputs/distilled/final --teacher embedded "
            "--config recipes/smollm2-135m/on_policy.yaml",
        ],
    ),
    "cache-teacher": (
        _cache_teacher,
        "Run the teacher once and store its outputs (exact or top-k) for offline KD.",
        ["hf-minitron cache-teacher --config recipes/smollm2-135m/cache_teacher.yaml --mode topk --top_k 128"],
    ),
    "correct-teacher": (
        _correct_teacher,
        "Fine-tune the teacher on the distillation data before pruning.",
        ["hf-minitron correct-teacher --config recipes/smollm2-135m/teacher_correction.yaml"],
    ),
    "sft": (
        lambda argv: _align(argv, "sft"),
        "Supervised fine-tuning of the distilled student (TRL SFTTrainer).",
        ["hf-minitron sft --config recipes/smollm2-135m/sft.yaml"],
    ),
    "dpo": (
        lambda argv: _align(argv, "dpo"),
        "DPO / RPO preference optimisation (TRL DPOTrainer).",
        ["hf-minitron dpo --config recipes/smollm2-135m/dpo.yaml"],
    ),
    "evaluate": (
        _evaluate,
        "Evaluate a checkpoint (or compare student and teacher) with lm-eval; writes JSON.",
        ["hf-minitron evaluate --model outputs/smollm2-135m/final --teacher embedded --limit 50"],
    ),
    "push": (
        _push,
        "Upload a checkpoint folder with its model card to the Hugging Face Hub.",
        ["hf-minitron push --folder outputs/smollm2-135m/final --repo_id me/smollm2-minitron"],
    ),
}


def _description(command: str) -> str:
    _, summary, examples = COMMANDS[command]
    return summary + "\n\nexamples:\n" + "\n".join(f"  {example}" for example in examples)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--prepare-help"]:
        print(f"Stored {prepare_help()} help texts: a first `hf-minitron <command> --help` is served from them.")
        return 0
    if argv[:1] in (["--version"], ["-V"]):
        from . import __version__

        print(f"hf-minitron {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<16} {summary}" for name, (_, summary, _) in COMMANDS.items()]
        print("usage: hf-minitron <command> [options]\n\ncommands:\n" + "\n".join(lines))
        print("\nRun `hf-minitron <command> --help` for the options of a command, with examples.")
        if argv and argv[0] not in ("-h", "--help"):
            import difflib

            guess = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
            hint = f": did you mean {guess[0]!r}?" if guess else ""
            print(f"\nerror: unknown command {argv[0]!r}{hint}", file=sys.stderr)
            return 2
        return 0
    if argv[1:] in (["-h"], ["--help"], ["--help-all"]):
        text = cached_help(argv[0] + ("-all" if argv[1:] == ["--help-all"] else ""))
        if text is not None:
            print(text, end="")
            return 0
    command, _, _ = COMMANDS[argv[0]]
    return report_errors(lambda: command(argv[1:]))


def report_errors(function) -> int:
    """Runs `function()` as a command does: our input checks, missing files, a full disk or a diverged training run
    print one line, `error: ...`, and return 2 instead of a traceback; `--help` and argparse's own refusals return their
    exit code. The recipes under `recipes/` end with `sys.exit(report_errors(...))` too."""
    from .validation import NonFiniteError

    try:
        function()
    # Our input checks, missing files, a full disk, a diverged training run: no traceback needed.
    except (ValueError, OSError, NonFiniteError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help (0), or an option argparse refused (2, after its message)
        return exit_.code if isinstance(exit_.code, int) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
