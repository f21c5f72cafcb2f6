"""Structured pruning (paper 1 §2.2, paper 2 §2): estimate activation importance, then prune depth and width.

Usage (the embedded SmolLM2-135M-Instruct teacher to ~60% of its parameters by width, on the embedded corpus):

    accelerate launch --config_file recipes/accelerate_configs/single_process.yaml \
        recipes/prune.py --config recipes/smollm2-135m/prune.yaml

Any PruneArguments / PrunedConfig field can be overridden on the command line, e.g. `--num_hidden_layers 24
--depth_method contiguous` (add `--depth_scorer winogrande --depth_scorer_limit 200` to pick the block by Winogrande
accuracy, one evaluation per candidate block, as paper 2 did) or `--teacher ./my-llama --calibration_data data.jsonl
--text_column content`. Under several
processes (`recipes/accelerate_configs/ddp.yaml`) the calibration samples are split across them and the statistics
all-reduced; the main process writes the checkpoint. Same as `hf-minitron prune --config ...`; then distill the
result with `recipes/distill.py`.
"""

import sys

from trl import TrlParser

from hf_minitron.cli import report_errors
from hf_minitron.commands.prune import PruneArguments, prune_checkpoint
from hf_minitron.pruning.config import PrunedConfig
from hf_minitron.validation import check_renamed_options


def main(script_args: PruneArguments, pruning_config: PrunedConfig):
    # 1. Everything checkable from the configs alone (target shape loads in transformers, output folder) is checked
    #    before the weights are read; 2. one pass of forward hooks scores heads, neurons, channels and layers;
    # 3. the model is sliced in place and written atomically with its tokenizer, scores and pruning record.
    summary = prune_checkpoint(script_args, pruning_config)

    # 4. Point at the result.
    before, after = summary["before"]["parameters"]["total"], summary["after"]["parameters"]["total"]
    print(f"Pruned checkpoint ({after:,} of {before:,} parameters): {summary['output']}")


if __name__ == "__main__":

    def run():
        check_renamed_options((PruneArguments, PrunedConfig), sys.argv[1:])  # old option names, refused by name
        parser = TrlParser((PruneArguments, PrunedConfig))
        main(*parser.parse_args_and_config())

    # Our errors (a bad value, a missing file, a run made with other settings) as one line, not a traceback.
    sys.exit(report_errors(run))
