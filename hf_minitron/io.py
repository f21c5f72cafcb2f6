"""Atomic outputs: every directory we write appears whole or not at all."""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False):
    """Yields a temporary sibling of `target` to write into; on success it replaces `target` by a rename.

    An interrupted write leaves the previous `target` (or nothing) and a hidden `.{name}.tmp-*` sibling, never a
    half-written `target`. A non-empty existing `target` is refused unless `overwrite=True`.
    """
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"Output path {str(target)!r} exists and is a file: choose a directory path.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Output directory {str(target)!r} exists and is not empty: pass --overwrite (overwrite=True) to replace "
            "it, or choose another directory."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, backup)
    os.replace(tmp, target)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def check_output_dir(target: str | os.PathLike, overwrite: bool = False) -> None:
    """The checks of `atomic_directory`, run up front so bad paths fail before any expensive work."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"Output path {str(target)!r} exists and is a file: choose a directory path.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Output directory {str(target)!r} exists and is not empty: pass --overwrite (overwrite=True) to replace "
            "it, or choose another directory."
        )
