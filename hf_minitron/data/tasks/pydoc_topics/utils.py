"""Loader of the `pydoc_topics` task, referenced from `pydoc_topics.yaml` as `!function utils.load_pydoc_topics`.

lm-eval passes a `dataset_path: json` task's `data_files` to `datasets.load_dataset` unchanged, so a relative path
would resolve against the current directory, not the task folder. Resolving it here makes the task work from any
working directory and from an installed wheel.
"""

from pathlib import Path


def load_pydoc_topics(**kwargs):
    """The task as a `datasets.DatasetDict` with a single `test` split. Extra keyword arguments (lm-eval passes the
    task metadata) are ignored."""
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(Path(__file__).with_name("pydoc_topics.jsonl"))})
