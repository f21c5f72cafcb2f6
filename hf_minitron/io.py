"""Atomic outputs and resumable runs.

Every file and directory we write appears whole or not at all: it is written into a hidden temporary sibling
(`.{name}.tmp-{pid}-*`) and renamed into place, so a process killed mid-write leaves the previous output (or none)
plus that sibling, never a half-written output that loads. The next write of the same target removes siblings left by
dead processes ([`remove_stale_temporaries`]).

Trainer checkpoints (`checkpoint-N`) are written in place by `transformers`; [`last_checkpoint`] skips one that a kill
interrupted mid-save, and [`resume_checkpoint`] makes every training entry point continue an interrupted run when it
is rerun with the same command.
"""

import errno
import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
# A directory holding one of these was written by us or by transformers: `overwrite=True` may replace it. Anything
# else (a home directory, a dataset) is never deleted, whatever the flag says.
_OUTPUT_MARKERS = ("config.json", "*.safetensors")


# ------------------------------------------------------------------------------------------------ temporaries
def _temporary_prefix(target: Path) -> str:
    # The writer's pid is part of the name: the next run can tell a dead writer's leftovers from a live one's.
    return f".{target.name}.tmp-{os.getpid()}-"


def _owner_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(target: str | os.PathLike) -> None:
    """Cleans up after interrupted writes of `target`: removes the temporary siblings of dead processes.

    A `.{name}.old-{pid}` sibling is the previous output, moved aside just before the final rename; if the writer
    died between the two renames and `target` is missing, it is moved back. Owners are checked by pid on this host:
    do not let two machines write the same target on a shared filesystem at once.
    """
    target = Path(target).absolute()
    if not target.parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(\d+)(?:-.*)?$")
    leftovers = []
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if match is not None and not _owner_alive(int(match.group(2))):
            leftovers.append((match.group(1), entry))
    for kind, entry in sorted(leftovers, key=lambda item: item[0] != "old"):  # restore a backup before cleaning
        if kind == "old" and not target.exists():
            os.replace(entry, target)
            logger.warning("Restored %s from %s, left by an interrupted write.", target, entry.name)
        else:
            logger.info("Removing %s, left by an interrupted write of %s.", entry, target.name)
            _remove(entry)


def _commit_directory(tmp: Path, target: Path) -> None:
    """Renames the finished `tmp` onto `target`, replacing any previous `target`."""
    os.chmod(tmp, 0o755)  # mkdtemp creates 0700 directories
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
    # "Not ours" first: suggesting --overwrite for a folder that --overwrite would refuse sends the user in a circle.
    if target.is_dir() and any(target.iterdir()) and not any(any(target.glob(m)) for m in _OUTPUT_MARKERS):
        raise FileExistsError(
            f"Output directory {str(target)!r} exists, is not empty and does not look like a model output (no "
            "config.json or *.safetensors): refusing to replace it even with --overwrite, since that would delete its "
            "files. Remove it yourself if it is disposable, or choose another directory."
        )
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Output directory {str(target)!r} exists and is not empty: pass --overwrite (overwrite=True) to replace "
            "it, or choose another directory."
        )


def format_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def check_free_space(target: str | os.PathLike, needed_bytes: int) -> None:
    """Raises `OSError(ENOSPC)` when the filesystem that will hold `target` has less than `needed_bytes` free."""
    where = Path(target).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < needed_bytes:
        raise OSError(
            errno.ENOSPC,
            f"Not enough disk space for {str(target)!r}: about {format_bytes(needed_bytes)} needed, "
            f"{format_bytes(free)} free on the filesystem of {str(where)!r}. Free some space, or choose an output "
            "directory on another disk",
        )


def _disk_full_error(error: BaseException, target: Path, expected_bytes: int | None) -> OSError | None:
    """An `OSError(ENOSPC)` naming `target` when `error` means the disk is full, else `None`."""
    # A nested atomic write (scores inside a model folder) already explained it: report the original error once.
    while getattr(error, "_disk_full", False) and error.__cause__ is not None:
        error = error.__cause__
    # safetensors' Rust writer reports a full disk as `SafetensorError('... (os error 28)')`, not as an OSError.
    full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
    if not (full or "No space left on device" in str(error) or "os error 28" in str(error)):
        return None
    needed = f"about {format_bytes(expected_bytes)} needed, " if expected_bytes else ""
    free = format_bytes(shutil.disk_usage(target.parent).free)
    translated = OSError(
        errno.ENOSPC,
        f"Disk full while writing {str(target)!r} ({needed}{free} free after removing the partial write); any "
        f"previous output there is unchanged. Free some space, or choose an output directory on another disk "
        f"({type(error).__name__}: {error})",
    )
    translated._disk_full = True
    return translated


def _new_temporary_directory(target: Path, overwrite: bool) -> Path:
    remove_stale_temporaries(target)
    check_output_dir(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=_temporary_prefix(target), dir=target.parent))


@contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False, expected_bytes: int | None = None):
    """Yields a temporary sibling of `target` to write into; on success it replaces `target` by a rename.

    An interrupted write leaves the previous `target` (or nothing) and a hidden `.{name}.tmp-{pid}-*` sibling, never a
    half-written `target`; the next write of `target` removes that sibling. A non-empty existing `target` is refused
    unless `overwrite=True`, and even then unless it looks like a model output. With `expected_bytes`, a filesystem
    with less free space fails before the first write; a full disk during the write raises `OSError(ENOSPC)` naming
    `target`, after removing the partial write.
    """
    target = Path(target).absolute()
    tmp = _new_temporary_directory(target, overwrite)
    if expected_bytes:
        try:
            check_free_space(target, expected_bytes)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    try:
        yield tmp
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        disk_full = _disk_full_error(error, target, expected_bytes)
        if disk_full is not None:
            raise disk_full from error
        raise
    _commit_directory(tmp, target)


@contextmanager
def atomic_file(path: str | os.PathLike):
    """Yields a temporary sibling path of the file `path` to write; on success it is renamed onto `path`."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` through a temporary sibling: readers see the old file or the new one."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 2, **kwargs) -> None:
    """`json.dumps(obj)` written with [`atomic_write_text`]; serialised first, so a bad object leaves `path` as is."""
    atomic_write_text(path, json.dumps(obj, indent=indent, **kwargs) + "\n")


# ------------------------------------------------------------------------------------------------ trainer runs
def last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete `checkpoint-N` in `output_dir`, or `None`.

    `Trainer` writes `trainer_state.json` last (after the weights, optimizer, scheduler and RNG states), so a
    checkpoint without a readable one was interrupted mid-save: it is skipped (and overwritten when training gets
    there again). `transformers.trainer_utils.get_last_checkpoint` would return it, and resuming from it would restart
    the step count at 0.
    """
    if not os.path.isdir(output_dir):
        return None
    steps = sorted(
        (int(match.group(1)), name)
        for name in os.listdir(output_dir)
        if (match := _CHECKPOINT_DIR.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    )
    for _, name in reversed(steps):
        path = os.path.join(output_dir, name)
        try:
            with open(os.path.join(path, TRAINER_STATE_NAME), encoding="utf-8") as f:
                json.load(f)
        except (OSError, ValueError):
            logger.warning(
                "Skipping %s: it was interrupted while being saved (no readable %s).", path, TRAINER_STATE_NAME
            )
            continue
        return path
    return None


def resume_checkpoint(args) -> str | None:
    """The checkpoint a `Trainer` run should resume from, so that rerunning an interrupted command continues it.

    `args.resume_from_checkpoint` when it is a path (it must exist); otherwise (unset, or `"true"`) the newest complete
    checkpoint in `args.output_dir`, as TRL's scripts do with `get_last_checkpoint`. To start afresh, use a new
    `output_dir` or delete its `checkpoint-*` folders.
    """
    requested = args.resume_from_checkpoint
    if isinstance(requested, str) and requested.lower() not in ("true", ""):
        if not os.path.isdir(requested):
            raise FileNotFoundError(
                f"resume_from_checkpoint={requested!r} does not exist: pass a `checkpoint-N` folder of an earlier run, "
                "or leave it unset to resume from the newest checkpoint in output_dir."
            )
        return requested
    found = last_checkpoint(args.output_dir)
    if found is None and requested not in (None, False, ""):
        raise FileNotFoundError(
            f"resume_from_checkpoint=true, but {args.output_dir!r} holds no complete checkpoint: leave it unset to "
            "start a new run."
        )
    if found is not None:
        logger.warning("Resuming from %s (the newest complete checkpoint in %s).", found, args.output_dir)
    return found


def atomic_save_model(trainer, target: str | os.PathLike, write_extra=None) -> None:
    """`trainer.save_model` into a temporary sibling of `target`, renamed onto `target` when complete.

    Every process must call it: `save_model` gathers FSDP / ZeRO-3 shards collectively; only the main process
    writes. `write_extra(tmp)` adds files on the main process before the rename. The Trainer's pickled
    `training_args.bin` is left out: a final checkpoint holds safetensors and JSON only.
    """
    from accelerate.utils import broadcast_object_list

    target = Path(target).absolute()
    main = trainer.is_world_process_zero()
    tmp = [str(_new_temporary_directory(target, overwrite=True)) if main else None]
    tmp = Path(broadcast_object_list(tmp, from_process=0)[0])
    try:
        trainer.save_model(str(tmp))
        if main:
            (tmp / "training_args.bin").unlink(missing_ok=True)
            if write_extra is not None:
                write_extra(tmp)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if main:
        _commit_directory(tmp, target)
    trainer.accelerator.wait_for_everyone()
