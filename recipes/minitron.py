"""The whole Minitron chain: correct teacher -> importance -> prune -> distill -> evaluate -> model card -> push.

Usage (the embedded SmolLM2-135M teacher on the offline corpus, this 2-core CPU, ~15 minutes):

    accelerate launch --config_file recipes/accelerate_configs/single_process.yaml \
        recipes/minitron.py --config recipes/smollm2-135m/minitron.yaml

Override any field with `--key value` (top level) or `--section.key value` (e.g. `--distillation.max_steps 20`).
Rerunning the same command resumes at the first unfinished stage. Same as `hf-minitron run <config>`.
"""

import sys

from hf_minitron.pipeline import load_pipeline_config, parse_overrides, run_pipeline


def main(argv):
    # 1. Read the YAML recipe and the command-line overrides into the stage dataclasses (validated up front).
    config_path, overrides = parse_overrides(argv)
    args, pruning, distillation, correction = load_pipeline_config(config_path, overrides)

    # 2. Run every unfinished stage; finished stages (their output folder exists) are reused.
    summary = run_pipeline(args, pruning, distillation, correction)

    # 3. Point at the result.
    print(f"Final checkpoint and model card: {summary['final_dir']}")


if __name__ == "__main__":
    main(sys.argv[1:])
