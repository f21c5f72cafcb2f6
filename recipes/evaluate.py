"""Evaluation (paper 1 Table 2, paper 2 Table 1): the student next to its teacher, with lm-eval and held-out perplexity.

Usage (the output of `recipes/minitron.py` vs the embedded SmolLM2-135M-Instruct teacher, offline, one process):

    accelerate launch --config_file recipes/accelerate_configs/single_process.yaml \
        recipes/evaluate.py --config recipes/smollm2-135m/evaluate.yaml

`--tasks mmlu,winogrande,arc_challenge,hellaswag,gsm8k,truthfulqa_mc2` runs the papers' benchmarks (downloaded by
lm-eval); `--teacher null` evaluates the student alone. Any EvaluateArguments field can be overridden on the command
line, e.g. `--limit 20`. The main process evaluates and writes `output_file`. Same as `hf-minitron evaluate --config ...`.
"""

import sys

from trl import TrlParser

from hf_minitron.cli import report_errors
from hf_minitron.commands.evaluate import EvaluateArguments, evaluate_checkpoints


def main(script_args: EvaluateArguments):
    # 1. Load the checkpoint(s) and the held-out split; 2. run the lm-eval tasks and the held-out perplexity on each;
    # 3. print the side-by-side table and write the JSON (main process). All three live in the package.
    evaluate_checkpoints(script_args)

    # 4. Point at the result.
    print(f"Results: {script_args.output_file}")


if __name__ == "__main__":

    def run():
        parser = TrlParser(EvaluateArguments)
        main(*parser.parse_args_and_config())

    # Our errors (a bad value, a missing file, a run made with other settings) as one line, not a traceback.
    sys.exit(report_errors(run))
