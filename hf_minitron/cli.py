"""The `hf-minitron` command line.

    hf-minitron prune --model embedded --config recipes/smollm2-135m/prune.yaml --output outputs/pruned
    hf-minitron prune --model ./teacher --hidden_size 448 --num_attention_heads 8 --calibration_data data.jsonl ...
    hf-minitron run recipes/smollm2-135m/minitron.yaml --distillation.max_steps 20
    hf-minitron demo

Every dataclass field is an option (`--help` lists them with their help text); `--config` reads a YAML/JSON file
whose keys are those field names, and options given on the command line override it.
"""

import argparse
import json
import sys
from pathlib import Path


def _read_config_file(path: str) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"--config {path!r} does not exist.")
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"--config {path!r} must hold a mapping of option names to values.")
    return data


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


def _demo(argv):
    """Prunes the embedded SmolLM2 teacher with the default recipe and compares held-out loss."""
    from .demo import run_demo

    parser = argparse.ArgumentParser(prog="hf-minitron demo", description=_demo.__doc__)
    parser.add_argument("--output", default="outputs/demo", help="Output directory.")
    parser.add_argument("--quick", action="store_true", help="Tiny settings (for tests).")
    ns = parser.parse_args(argv)
    run_demo(ns.output, quick=ns.quick)


COMMANDS = {
    "run": (_run, "Run (or resume) the whole chain from a recipe: correct -> prune -> distill -> evaluate -> card."),
    "prune": (_prune, "Estimate Minitron importance and prune a checkpoint (depth and width)."),
    "demo": (_demo, "Prune the embedded SmolLM2-135M teacher on the offline corpus and report held-out loss."),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: hf-minitron <command> [options]\n\ncommands:\n" + "\n".join(lines))
        print("\nRun `hf-minitron <command> --help` for the options of a command.")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    command, _ = COMMANDS[argv[0]]
    try:
        command(argv[1:])
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
