"""Upload of a pruned and distilled checkpoint, its model card and plots to the Hugging Face Hub.

`push_to_hub` checks everything it can before the first byte is hashed (main process, token, endpoint, folder), then
runs the ordinary `huggingface_hub` client: `HfApi.create_repo(exist_ok=True)` and one `upload_folder` commit.
The card is uploaded as the folder's plain `README.md` file rather than with `ModelCard.push_to_hub`, which validates
its YAML against a fixed host and so ignores a custom endpoint.

The token is only ever handed to `HfApi`: it is not printed, logged, written to a file, or kept in an error message
(messages from the Hub are redacted: a server may echo the request's `Authorization` header back).
"""

import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload model pruned and distilled with hf-minitron"


class HubUploadError(RuntimeError):
    """The Hub refused or could not be reached during `push_to_hub`."""


class UnpicklableToken(str):
    """A token string that pickles as `None`.

    `Trainer` saves its arguments with `torch.save(self.args, "training_args.bin")` in every checkpoint; a plain
    `hub_token` would be stored there in clear. Wrapped in this class it still works everywhere a string does (the
    Trainer's own Hub calls), deep-copies as itself, and is left out of every pickle.
    """

    def __reduce__(self):
        return type(None), ()

    def __deepcopy__(self, memo):
        return self

    def __repr__(self):
        return "'<hub token>'"


def keep_token_out_of_pickles(training_args) -> None:
    """Wraps `training_args.hub_token` in [`UnpicklableToken`], so no saved `training_args.bin` holds it."""
    token = getattr(training_args, "hub_token", None)
    if isinstance(token, str) and not isinstance(token, UnpicklableToken):
        training_args.hub_token = UnpicklableToken(token)


def resolve_token(token: str | None = None) -> str:
    """The token to push with: `token`, else `$HF_TOKEN`, else the one saved by `hf auth login`.

    Raises:
        `ValueError`: when none is found, before any request is made.
    """
    from huggingface_hub import get_token

    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ValueError(
            "push_to_hub got an empty or non-string token: pass a Hugging Face access token string with write access, "
            "or leave token=None to use $HF_TOKEN or the token saved by `hf auth login`."
        )
    # get_token() reads $HF_TOKEN at call time (and the token file), so a variable set after import is honoured.
    token = token or get_token()
    if not token:
        raise ValueError(
            "push_to_hub needs a Hugging Face access token with write access and found none: pass token=..., set the "
            "HF_TOKEN environment variable, or run `hf auth login`."
        )
    return token.strip()


def resolve_endpoint(endpoint: str | None = None) -> str:
    """`endpoint`, else `$HF_ENDPOINT` read now, else huggingface_hub's default.

    `huggingface_hub.constants.ENDPOINT` is read once at import, so a variable set later would otherwise be ignored.
    """
    from huggingface_hub import constants

    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    if not endpoint.startswith(("http://", "https://")):
        raise ValueError(
            f"push_to_hub endpoint={endpoint!r} is not an HTTP(S) URL: pass e.g. 'https://huggingface.co', or leave "
            "it unset to use $HF_ENDPOINT or the default Hub."
        )
    return endpoint.rstrip("/")


# A `Bearer ...` credential, the value of an `Authorization:` / `token=` field, and anything shaped like a Hugging Face
# token (`hf_` + 20 or more letters and digits).
_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s,;\"'}\]]+")
_FIELD = re.compile(r"(?i)\b((?:authorization|token|access_token|api_key)\"?\s*[:=]\s*\"?)(?!bearer\b)[^\s,;\"'}\]]+")
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{20,}")


def redact(text: str, token: str | None = None) -> str:
    """`text` without `token` and without anything that looks like a credential (a `Bearer ...` value, an `hf_...`
    token): for messages that quote what the Hub sent back."""
    text = str(text)
    if token:
        text = text.replace(token, "***")
    text = _BEARER.sub(r"\1***", text)
    text = _FIELD.sub(r"\1***", text)
    return _HF_TOKEN.sub("***", text)


def _hub_error(err: Exception, endpoint: str, action: str, token: str | None = None) -> HubUploadError:
    """A `HubUploadError` that explains `err` without its request (whose headers carry the token), redacted."""
    return HubUploadError(redact(_explain(err, endpoint, action), token))


def _explain(err: Exception, endpoint: str, action: str) -> str:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        if status == 401:
            return (
                f"The Hub at {endpoint} rejected the token while trying to {action} (HTTP 401): check that it is a "
                "valid access token (https://huggingface.co/settings/tokens), or log in again with "
                "`hf auth login --force`."
            )
        if status == 403:
            return (
                f"The token is not allowed to {action} on {endpoint} (HTTP 403): use a token with write access to "
                "the repository's namespace."
            )
        server_message = getattr(err, "server_message", None) or err.response.reason_phrase
        return f"The Hub at {endpoint} failed to {action} (HTTP {status}): {server_message}"
    # huggingface_hub>=2 uses `httpx2`, 1.x `httpx`: match the transport error (connect, timeout, proxy) of either.
    if any(cls.__name__ == "TransportError" for cls in type(err).__mro__):
        return (
            f"Could not reach the Hub at {endpoint} to {action} ({type(err).__name__}: {err}): check the network, "
            "the endpoint (HF_ENDPOINT) and any proxy settings."
        )
    return f"Failed to {action} on {endpoint}: {type(err).__name__}: {err}"


def check_push_ready(repo_id: str, token: str | None = None, endpoint: str | None = None) -> tuple[str, str]:
    """Everything about an upload that can be checked without a request: `repo_id`, offline mode, a token, the
    endpoint. Returns `(token, endpoint)`; run it before hours of work whose result is to be pushed.

    Raises:
        `ValueError`: naming what is missing or invalid, and the fix.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"push_to_hub repo_id={repo_id!r} is invalid: {err} Use 'namespace/name'.") from None
    if constants.is_offline_mode():
        raise ValueError("push_to_hub cannot run with HF_HUB_OFFLINE=1: unset HF_HUB_OFFLINE to upload.")
    return resolve_token(token), resolve_endpoint(endpoint)


def check_trainer_push_ready(args) -> None:
    """A trainer whose arguments set `push_to_hub` uploads checkpoints as it trains: the repo id, offline mode and
    token are checked before any weights are loaded (transformers derives the repo from `output_dir` without
    `hub_model_id`)."""
    if getattr(args, "push_to_hub", False):
        check_push_ready(args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir)), args.hub_token)


_QUICK_START_ID = re.compile(r'^model_id = "[^"\n]*"', re.M)


@contextmanager
def _with_repo_id_in_card(folder: Path, repo_id: str):
    """`folder`, or, when its card's quick start names another model id (a placeholder, a local path), a
    hard-linked copy of it whose `README.md` names `repo_id`: the published card loads what it describes, and the
    local folder is left as it is."""
    readme = folder / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    updated = _QUICK_START_ID.sub(f'model_id = "{repo_id}"', text)
    if updated == text:
        yield folder
        return
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.push-", dir=folder.parent))
    try:
        for path in folder.rglob("*"):
            target = staging / path.relative_to(folder)
            if path.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            elif path != readme:
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(path, target)  # no copy of the weights
                except OSError:
                    shutil.copy2(path, target)
        (staging / "README.md").write_text(updated, encoding="utf-8")
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    endpoint: str | None = None,
    revision: str | None = None,
    ignore_patterns: list[str] | None = None,
) -> str | None:
    """Uploads a checkpoint folder (weights, config, tokenizer, `README.md` card, plots) to a Hub model repository.

    Runs on the main process only; other processes return `None` at once.

    Args:
        folder (`str` or `os.PathLike`):
            The folder to upload, e.g. the final checkpoint with `README.md` written by
            `hf_minitron.model_card.save_model_card`.
        repo_id (`str`):
            `"namespace/name"` (or `"name"` under the token's user). Created if missing.
        private (`bool`, *optional*, defaults to `False`):
            Create the repository as private (an existing repository keeps its visibility).
        token (`str`, *optional*):
            An access token with write access; defaults to `$HF_TOKEN`, then the token saved by `hf auth login`.
        commit_message (`str`, *optional*):
            Message of the upload commit.
        endpoint (`str`, *optional*):
            The Hub URL; defaults to `$HF_ENDPOINT` (read at call time), then `https://huggingface.co`.
        revision (`str`, *optional*):
            Branch to commit to; defaults to `main`.
        ignore_patterns (`list[str]`, *optional*):
            Glob patterns of files not to upload (e.g. `["checkpoint-*/*"]`).

    Returns:
        `str` or `None`: the URL of the commit on the main process, `None` elsewhere.

    Raises:
        `ValueError`: a missing token, an invalid `repo_id`, folder or endpoint (before any request).
        `HubUploadError`: the Hub cannot be reached, rejects the token (401/403) or fails the upload.
    """
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return None
    from huggingface_hub import HfApi

    from . import __version__
    from .io import OUTPUT_MARKER
    from .validation import check_finite_weights

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"push_to_hub folder={str(folder)!r} is not a directory: pass the saved checkpoint folder.")
    if not any(p.is_file() for p in folder.rglob("*")):
        raise ValueError(f"push_to_hub folder={str(folder)!r} holds no file: save the model there first.")
    token, endpoint = check_push_ready(repo_id, token, endpoint)
    # A model with NaN/inf weights is never published (it loads, and fails only when used).
    check_finite_weights(folder)
    # Our marker says which local files hf-minitron may replace: it means nothing on the Hub.
    ignore_patterns = [*(ignore_patterns or []), OUTPUT_MARKER, f"*/{OUTPUT_MARKER}"]

    api = HfApi(endpoint=endpoint, token=token, library_name="hf-minitron", library_version=__version__)
    # whoami fails fast on a bad token or an unreachable endpoint, before any file is hashed.
    try:
        user = api.whoami()["name"]
    except Exception as err:
        raise _hub_error(err, endpoint, "check the token", token) from None
    if "/" not in repo_id:
        repo_id = f"{user}/{repo_id}"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    except Exception as err:
        raise _hub_error(err, endpoint, f"create the repository {repo_id}", token) from None
    try:
        with _with_repo_id_in_card(folder, repo_id) as upload:
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=upload,
                commit_message=commit_message,
                revision=revision,
                ignore_patterns=ignore_patterns,
                repo_type="model",
            )
    except ValueError as err:  # e.g. invalid README.md metadata, reported by the Hub's YAML validation
        raise ValueError(redact(str(err), token)) from None
    except Exception as err:
        raise _hub_error(err, endpoint, f"upload {folder} to {repo_id}", token) from None
    logger.info("Uploaded %s to %s", folder, commit.commit_url)
    return commit.commit_url
