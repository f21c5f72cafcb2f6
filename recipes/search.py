"""Architecture search under a parameter budget (paper 1 §3, Table 9): which shape to prune to.

Usage (the embedded SmolLM2-135M-Instruct teacher at ~60% of its parameters, on the embedded corpus):

    accelerate launch --config_file recipes/accelerate_configs/single_process.yaml \
        recipes/search.py --config recipes/smollm2-135m/search.yaml

Any SearchArguments / SearchConfig / DistillationConfig field can be overridden on the command line, e.g.
`--retrain_steps 400 --eval_interval 50` (the paper's setting), `--retrain_steps 0` (rank the pruned candidates without
retraining, as ModelOpt does) or `--scorer lm_eval`. Rerunning the same command skips the finished candidates. Same as
`hf-minitron search --config ...`; then prune to the winner with `recipes/prune.py` and distill it fully.
"""

import sys

from trl import TrlParser

from hf_minitron.cli import report_errors
from hf_minitron.commands.search import SearchArguments, print_search_summary, search_checkpoint
from hf_minitron.distillation.config import DistillationConfig
from hf_minitron.pruning.search_config import SearchConfig
from hf_minitron.validation import check_renamed_options


def main(script_args: SearchArguments, search_config: SearchConfig, training_args: DistillationConfig):
    # 1. The candidates within the budget are enumerated from the config alone (bad budgets fail here);
    # 2. one importance pass on the teacher; 3. each candidate is pruned from a copy, distilled for retrain_steps
    # and evaluated every eval_interval steps; 4. the ranking, its stability and the plots go to output_dir.
    result = search_checkpoint(script_args, search_config, training_args)

    # 5. Report the winner.
    print_search_summary(result, training_args.output_dir)


if __name__ == "__main__":

    def run():
        check_renamed_options(
            (SearchArguments, SearchConfig, DistillationConfig), sys.argv[1:]
        )  # old option names, refused by name
        parser = TrlParser((SearchArguments, SearchConfig, DistillationConfig))
        main(*parser.parse_args_and_config())

    # Our errors (a bad value, a missing file, a run made with other settings) as one line, not a traceback.
    sys.exit(report_errors(run))
