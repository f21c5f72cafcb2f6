"""The whole Minitron chain: correct teacher -> importance -> prune -> distill -> align -> evaluate -> card -> push.

Usage (the embedded SmolLM2-135M teacher on the offline corpus, ~4 minutes on a quiet 2-core CPU):

    accelerate launch --config_file recipes/accelerate_configs/single_process.yaml \
        recipes/minitron.py --config recipes/smollm2-135m/minitron.yaml

Override any field with `--key value` (top level) or `--section.key value` (e.g. `--distillation.max_steps 20`);
`--sft null` skips the SFT stage, `--dpo.rpo_alpha 1.0` adds a DPO / RPO stage after it. Rerunning the same command
resumes at the first unfinished stage. Under several processes (`recipes/accelerate_configs/ddp.yaml`) every stage
runs data-parallel and only the main process writes. Same as `hf-minitron run <config>`.
"""

import sys

from accelerate import PartialState

from hf_minitron.cli import report_errors
from hf_minitron.commands.run import run_pipeline
from hf_minitron.commands.run_config import load_pipeline_config, parse_overrides


def main(argv):
    # 1. Read the YAML recipe and the command-line overrides into the stage dataclasses (validated up front).
    config_path, overrides = parse_overrides(argv)
    args, pruning, distillation, correction, alignment = load_pipeline_config(config_path, overrides)

    # 2. Run every unfinished stage; finished stages (their output folder exists) are reused.
    summary = run_pipeline(args, pruning, distillation, correction, alignment)

    # 3. Point at the result (once, from the main process).
    if PartialState().is_main_process:  # the process group the chain ran in
        print(f"Final checkpoint and model card: {summary['final_dir']}")


if __name__ == "__main__":

    def run():
        main(sys.argv[1:])

    # Our errors (a bad value, a missing file, a run made with other settings) as one line, not a traceback.
    sys.exit(report_errors(run))
