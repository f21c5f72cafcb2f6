"""Upload a finished checkpoint, its model card and plots to the Hugging Face Hub.

Usage (the output of `recipes/minitron.py`; the token comes from `$HF_TOKEN` or `hf auth login`):

    HF_TOKEN=hf_... accelerate launch --config_file recipes/accelerate_configs/single_process.yaml \
        recipes/push.py --config recipes/smollm2-135m/push.yaml --repo_id <your-namespace>/SmolLM2-80M-Minitron

Any PushArguments field can be overridden on the command line, e.g. `--private false`. The token is never an option
(it would land in shell history) and is never printed. Only the main process uploads. Same as
`hf-minitron push --config ...`; `recipes/minitron.py` does it at the end of the chain with `push_to_hub: true`.
"""

import sys

from trl import TrlParser

from hf_minitron.cli import report_errors
from hf_minitron.commands.push import PushArguments, push_folder


def main(script_args: PushArguments):
    # 1. Check the folder, repo id, token and endpoint before hashing a byte; 2. create the repository if missing;
    # 3. upload the folder (README.md card as a plain file) in one commit.
    url = push_folder(script_args)

    # 4. Point at the commit (main process).
    if url:
        print(f"Uploaded: {url}")


if __name__ == "__main__":

    def run():
        parser = TrlParser(PushArguments)
        main(*parser.parse_args_and_config())

    # Our errors (a bad value, a missing file, a run made with other settings) as one line, not a traceback.
    sys.exit(report_errors(run))
