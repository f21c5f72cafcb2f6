"""`hf-minitron push` and `recipes/push.py`: its arguments and the one function that runs it."""

from dataclasses import dataclass, field

from ..hub import DEFAULT_COMMIT_MESSAGE, push_to_hub


@dataclass
class PushArguments:
    """What to upload and where: the options of `hf-minitron push` and `recipes/push.py`.

    Args:
        folder (`str`): the checkpoint folder (weights, tokenizer, `README.md` card).
        repo_id (`str`): `namespace/name` of the Hub model repository (created if missing).
        private (`bool`, *optional*, defaults to `False`): create the repository as private.
        endpoint (`str`, *optional*): the Hub URL; defaults to `$HF_ENDPOINT`, then https://huggingface.co.
        commit_message (`str`, *optional*): message of the upload commit.

    The token comes from `$HF_TOKEN` or `hf auth login`; it is never an option (it would land in shell history).
    """

    folder: str = field(metadata={"help": "Checkpoint folder to upload."})
    repo_id: str = field(metadata={"help": "Hub repository, 'namespace/name' (created if missing)."})
    private: bool = field(default=False, metadata={"help": "Create the repository as private."})
    endpoint: str | None = field(default=None, metadata={"help": "Hub URL (default: $HF_ENDPOINT or huggingface.co)."})
    commit_message: str | None = field(default=None, metadata={"help": "Message of the upload commit."})


def push_folder(args: PushArguments) -> str | None:
    """`push_to_hub` with the options of `args`; returns the commit URL on the main process, `None` elsewhere."""
    return push_to_hub(
        args.folder,
        args.repo_id,
        private=args.private,
        endpoint=args.endpoint,
        commit_message=args.commit_message or DEFAULT_COMMIT_MESSAGE,
    )
