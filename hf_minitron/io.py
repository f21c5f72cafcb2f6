"""Atomic outputs and resumable runs.

Every file and directory we write appears whole or not at all: it is written into a hidden temporary sibling
(`.{name}.tmp-{pid}-*`) and renamed into place, so a process killed mid-write leaves the previous output (or none)
plus that sibling, never a half-written output that loads. The next write of the same target removes siblings left by
dead processes ([`remove_stale_temporaries`]).

Every directory we commit holds a marker, `.hf_minitron_output.json`, listing the files we wrote. `overwrite=True`
replaces only such a directory, and only while it holds nothing but those files: a folder we did not write (a home
directory, a project with its own `config.json`), or one of ours into which someone put other files, is refused
whatever the flag says. The commit itself never replaces a directory that appeared after the up-front check (a
no-replace rename), and a result that cannot be moved into place is kept in a visible sibling whose path the error
names.

Trainer checkpoints (`checkpoint-N`) are written in place by `transformers`; [`last_checkpoint`] skips one that a kill
interrupted mid-save, and [`resume_checkpoint`] makes every training entry point continue an interrupted run when it
is rerun with the same command.

One module, past 500 lines: every writer's guarantees (temporary siblings, the output marker, no-replace commits, file
modes, resumable checkpoints) rest on the same few invariants, which are easier to keep when they are read together.
"""

import ctypes
import errno
import json
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
# Written into every directory we commit, listing its files: `overwrite=True` replaces a directory only when this
# marker shows we wrote it and it holds nothing else. A `config.json` or `*.safetensors` proves nothing: a project
# folder holding an application's own config.json looks like a checkpoint.
OUTPUT_MARKER = ".hf_minitron_output.json"


# ------------------------------------------------------------------------------------------------ temporaries
def _temporary_prefix(target: Path) -> str:
    # The writer's pid is part of the name: the next run can tell a dead writer's leftovers from a live one's.
    return f".{target.name}.tmp-{os.getpid()}-"


def _writer_tag() -> str:
    """`{pid}-{random}`: the pid tells a dead writer's leftovers from a live one's; the random part keeps two writers
    in one process (threads) from taking the same backup or kept-result name."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


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


# ------------------------------------------------------------------------------------------------ output paths
def resolve_output_path(path: str | os.PathLike) -> Path:
    """The real path an output will be written to: `~` expanded and symlinks resolved, as model paths are.

    A symlinked output is written where the link points (the link keeps pointing at the new output); a dangling link
    is refused rather than replaced by a real folder.
    """
    if not os.fspath(path).strip():
        # Path("") is the current directory: an empty setting would write (and, with --overwrite, replace) there.
        raise ValueError("The output folder is empty (''): pass a folder name, e.g. outputs/my-run.")
    path = Path(os.path.expanduser(os.fspath(path)))
    if path.is_symlink() and not path.exists():
        raise FileNotFoundError(
            f"Output path {str(path)!r} is a symlink to {os.readlink(path)!r}, which does not exist: create the "
            "link's target first, or pass a real path."
        )
    return Path(os.path.realpath(path))


def _writable_ancestor(target: Path) -> Path:
    """The nearest existing ancestor of `target`, which must be a writable directory on a writable filesystem."""
    where = target.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise NotADirectoryError(
            errno.ENOTDIR,
            f"Cannot write {str(target)!r}: {str(where)!r} is a file, not a directory. Choose another output path",
        )
    read_only = hasattr(os, "statvfs") and os.statvfs(where).f_flag & os.ST_RDONLY
    if read_only or not os.access(where, os.W_OK | os.X_OK):
        raise PermissionError(
            errno.EROFS if read_only else errno.EACCES,
            f"Cannot write {str(target)!r}: {str(where)!r} is "
            f"{'on a read-only filesystem' if read_only else 'not writable'}. Choose an output path you can write to",
        )
    return where


def check_not_overlapping(output: str | os.PathLike, source: str | os.PathLike | None, what: str) -> None:
    """Refuses an `output` that is the local `source` folder (e.g. the teacher), inside it, or a parent of it.

    Replacing such an output would replace (or delete) the source itself. Hub ids and missing paths are ignored.
    """
    if source is None or not os.path.exists(os.path.expanduser(os.fspath(source))):
        return
    out = resolve_output_path(output)
    src = Path(os.path.realpath(os.path.expanduser(os.fspath(source))))
    if out == src or src in out.parents or out in src.parents:
        relation = "is" if out == src else ("is inside" if src in out.parents else "contains")
        raise ValueError(
            f"Output {str(output)!r} {relation} {what} {str(source)!r} ({src}): writing it would replace or delete "
            f"{what}. Choose an output path outside {str(src)!r} that does not contain it."
        )


def _marker_files(directory: Path) -> set[str] | None:
    """The files our marker in `directory` lists, or `None` when it has no valid marker."""
    try:
        marker = json.loads((directory / OUTPUT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("written_by") != "hf-minitron":
        return None
    files = marker.get("files")
    return set(files) if isinstance(files, list) else None


def _files_under(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() or p.is_symlink())


def is_own_output(directory: str | os.PathLike) -> bool:
    """Whether `directory` was committed by hf-minitron and holds only the files it wrote (so it may be replaced)."""
    directory = Path(directory)
    listed = _marker_files(directory)
    return listed is not None and set(_files_under(directory)) <= listed | {OUTPUT_MARKER}


def _write_marker(directory: Path) -> None:
    # A nested output (scores inside a model folder) already has its own marker: this one replaces it at the top.
    (directory / OUTPUT_MARKER).unlink(missing_ok=True)
    files = [name for name in _files_under(directory) if name != OUTPUT_MARKER]
    marker = {"written_by": "hf-minitron", "note": "hf-minitron may replace this folder (--overwrite)", "files": files}
    (directory / OUTPUT_MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")


def _refuse_replacing(target: Path, overwrite: bool) -> None:
    """Raises `FileExistsError` unless the existing `target` may be replaced: empty, or ours with `overwrite`.

    Another writer of `target` may move it aside or rename its own result in while we look (each check reads a path,
    not a directory): a `target` that vanished has nothing left to protect, and one that was replaced mid-check is
    checked again, so a half-seen directory is never called foreign. The final rename checks again and never replaces
    what appears meanwhile.
    """
    for _ in range(8):
        try:
            before = os.lstat(target)
        except FileNotFoundError:
            return
        try:
            _refuse_replacing_existing(target, overwrite)
            return
        except (FileExistsError, FileNotFoundError):
            try:
                after = os.lstat(target)
            except FileNotFoundError:
                return
            if (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino):
                raise
    _refuse_replacing_existing(target, overwrite)


def _refuse_replacing_existing(target: Path, overwrite: bool) -> None:
    if not target.is_dir() or target.is_symlink():
        raise FileExistsError(
            errno.EEXIST, f"Output path {str(target)!r} exists and is not a directory: choose a directory path."
        )
    if not any(target.iterdir()):
        return
    listed = _marker_files(target)
    # "Not ours" first: suggesting --overwrite for a folder that --overwrite would refuse sends the user in a circle.
    if listed is None:
        raise FileExistsError(
            errno.EEXIST,
            f"Output directory {str(target)!r} exists, is not empty and does not look like a model output written by "
            f"hf-minitron (no {OUTPUT_MARKER}): refusing to replace it even with --overwrite, since that would delete "
            "its files. Remove it yourself if it is disposable, or choose another directory.",
        )
    foreign = [name for name in _files_under(target) if name not in listed and name != OUTPUT_MARKER]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(
            errno.EEXIST,
            f"Output directory {str(target)!r} was written by hf-minitron but now also holds files it did not write "
            f"({shown}): refusing to replace it even with --overwrite, since that would delete them. Move them out, or "
            "choose another directory.",
        )
    if not overwrite:
        raise FileExistsError(
            errno.EEXIST,
            f"Output directory {str(target)!r} exists and is not empty: pass --overwrite (overwrite=True) to replace "
            "it, or choose another directory.",
        )


def check_output_dir(target: str | os.PathLike, overwrite: bool = False, sources=()) -> None:
    """The checks of `atomic_directory`, run up front so that bad paths fail before any expensive work.

    `target` must be a directory we may replace (missing, empty, or our own output with `overwrite`), not a mount
    point, writable, and neither be, nor be inside, nor contain any of the local `sources` (the models it is made
    from).
    """
    original = target
    target = resolve_output_path(target)
    for source in sources:
        check_not_overlapping(original, source, "the source model")
    if os.path.ismount(target):
        raise OSError(
            errno.EBUSY,
            f"Output {str(original)!r} is a mount point, which cannot be replaced by a rename: write into a folder "
            f"inside it, e.g. {str(target / 'output')!r}",
        )
    if os.path.lexists(target):
        _refuse_replacing(target, overwrite)
    _writable_ancestor(target)


def check_output_file(path: str | os.PathLike) -> Path:
    """Up-front checks of a file output (e.g. a results JSON): not a directory, in a writable place. Returns its real
    path."""
    original = path
    path = resolve_output_path(path)
    if path.is_dir():
        raise IsADirectoryError(
            errno.EISDIR,
            f"Output file {str(original)!r} is an existing directory: pass a file path, e.g. "
            f"{str(Path(original) / 'results.json')!r}",
        )
    _writable_ancestor(path)
    return path


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _renameat2():
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not Linux, or a libc older than glibc 2.28
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    return function


def _rename_noreplace(source: Path, target: Path) -> None:
    """Renames `source` onto `target`, failing with `FileExistsError` when `target` exists, atomically.

    Linux's `renameat2(RENAME_NOREPLACE)` checks and renames in one step. Where it is missing (or the filesystem does
    not support it), `rename(2)` still refuses to replace a non-empty directory, and we only ever commit non-empty
    ones (the marker), so two writers cannot both win; only an empty directory created meanwhile would be replaced.
    """
    renameat2 = _renameat2()
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(target))
    if os.path.lexists(target) and not (target.is_dir() and not any(target.iterdir())):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    try:
        os.rename(source, target)
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from error
        raise


def _keep_visible(tmp: Path, target: Path) -> Path:
    """Moves a finished result that could not be committed to a visible sibling of `target` (the next run would remove
    a hidden temporary); returns where it is."""
    keep = target.with_name(f"{target.name}.unsaved-{time.strftime('%Y%m%d-%H%M%S')}-{_writer_tag()}")
    try:
        os.rename(tmp, keep)
    except OSError:
        return tmp
    return keep


def _umask() -> int:
    """The process's umask. Linux shows it in /proc; elsewhere `os.umask` can only read it by setting it for a moment
    (022, the usual default, so that a file another thread creates in that moment gets ordinary modes)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _open_like_created_files(tmp: Path) -> None:
    """Gives the finished result the modes a plain `mkdir`/`open` would have under the user's umask.

    `mkdtemp` makes 0700 directories and `mkstemp`-style writers make 0600 files (transformers writes
    `model.safetensors` so), which would leave a checkpoint on a shared machine readable by its writer only, next to
    a 0644 `config.json`. Only those 0700/0600 entries are widened, and never beyond the umask; any other mode is the
    writer's choice and kept.
    """
    mask = _umask()
    os.chmod(tmp, 0o777 & ~mask)
    for root, dirs, files in os.walk(tmp):
        for name, default in [*((d, 0o777) for d in dirs), *((f, 0o666) for f in files)]:
            path = os.path.join(root, name)
            mode = os.lstat(path).st_mode
            if not stat.S_ISLNK(mode) and stat.S_IMODE(mode) == default & 0o700:
                os.chmod(path, default & ~mask)


def _commit_directory(tmp: Path, target: Path, overwrite: bool = False) -> None:
    """Renames the finished `tmp` onto `target`: never onto a directory that appeared (or changed) after the up-front
    check, and never leaving the only copy of the result hidden."""
    _write_marker(tmp)
    _open_like_created_files(tmp)
    backup = None
    try:
        if os.path.lexists(target):
            # The up-front check may be hours old: another run may have written `target` since.
            _refuse_replacing(target, overwrite)
            # Another writer of `target` may move it aside (its own commit) at any point here: then there is nothing
            # to back up, and the rename below refuses whatever that writer puts in its place.
            try:
                if any(target.iterdir()):
                    backup = target.with_name(f".{target.name}.old-{_writer_tag()}")
                    os.rename(target, backup)
                else:
                    os.rmdir(target)  # empty: nothing to keep; fails (and is reported) if it was filled meanwhile
            except FileNotFoundError:
                backup = None
        _rename_noreplace(tmp, target)
    except OSError as error:
        if backup is not None and not os.path.lexists(target):
            os.rename(backup, target)
            backup = None
        kept = _keep_visible(tmp, target)
        if isinstance(error, FileExistsError):
            raise FileExistsError(
                errno.EEXIST,
                f"{str(target)!r} was written by someone else (another run with the same output?) while this result "
                f"was being made, and was left as it is ({error.strerror}). This result is kept at {str(kept)!r}",
            ) from error
        raise OSError(
            error.errno,
            f"Could not move the finished result into {str(target)!r} ({error.strerror or error}). It is kept at "
            f"{str(kept)!r}: move it there yourself",
        ) from error
    finally:
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)


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
    half-written `target`; the next write of `target` removes that sibling. `target` is resolved as
    [`resolve_output_path`] does (`~`, symlinks). A non-empty existing `target` is refused unless `overwrite=True`,
    and even then unless it is an output we wrote holding only our files ([`is_own_output`]); a `target` written by
    someone else during the write is left alone and the result kept in a visible sibling (the error names it). With
    `expected_bytes`, a filesystem with less free space fails before the first write; a full disk during the write
    raises `OSError(ENOSPC)` naming `target`, after removing the partial write.
    """
    target = resolve_output_path(target)
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
    _commit_directory(tmp, target, overwrite)


@contextmanager
def atomic_file(path: str | os.PathLike):
    """Yields a temporary sibling path of the file `path` to write; on success it is renamed onto `path`.

    `path` is resolved as [`resolve_output_path`] does; an existing directory there is refused before the write. If
    the final rename fails, the written file is kept in a visible sibling that the error names.
    """
    path = check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # mkstemp creates 0600 files: a rewritten file keeps its mode, a new one gets what `open` would give it.
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    os.chmod(tmp, mode)
    try:
        os.replace(tmp, path)
    except OSError as error:
        kept = _keep_visible(tmp, path)
        raise OSError(
            error.errno,
            f"Could not move the finished file into {str(path)!r} ({error.strerror or error}). It is kept at "
            f"{str(kept)!r}: move it there yourself",
        ) from error


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


# Next to a training command's checkpoints: what they were made with (see `settings_records.py`).
RESUME_RECORD_NAME = "resume_settings.json"


def resume_checkpoint(args, inputs: dict | None = None) -> str | None:
    """The checkpoint a `Trainer` run should resume from, so that rerunning an interrupted command continues it.

    `args.resume_from_checkpoint` when it is a path (it must exist); otherwise (unset, or `"true"`) the newest complete
    checkpoint in `args.output_dir`, as TRL's scripts do with `get_last_checkpoint`. To start afresh, use a new
    `output_dir` or delete its `checkpoint-*` folders.

    A run that starts afresh records its training settings and `inputs` (e.g. content fingerprints of the student, the
    teacher and the data files) in `output_dir/resume_settings.json`; resuming from `output_dir` under other settings
    or from other inputs is refused, naming what changed, instead of silently continuing (and returning) the earlier
    run's model.
    """
    from .settings_records import changes, read_record, training_settings

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
    record = {"training": training_settings(args), **(inputs or {})}
    path = Path(args.output_dir) / RESUME_RECORD_NAME
    if found is not None:
        previous = read_record(path)
        changed = changes(previous, record) if previous is not None else []
        if changed:
            raise ValueError(
                f"{args.output_dir!r} holds checkpoints of a run with other settings or inputs; resuming {found!r} "
                f"would continue (and return) that run's model. Changed: {'; '.join(changed)}. Rerun with the earlier "
                "settings to resume it, or start afresh with a new output_dir (or delete its checkpoint-* folders)."
            )
        if previous is None:
            logger.warning("%s holds no %s: resuming without checking its settings.", args.output_dir, path.name)
        logger.warning("Resuming from %s (the newest complete checkpoint in %s).", found, args.output_dir)
    elif getattr(args, "process_index", 0) == 0:
        if path.exists() and read_record(path) is None:
            # A file of that name that is not our record is the user's: never overwritten.
            raise ValueError(
                f"{str(path)!r} exists and is not an hf-minitron resume record: choose another output_dir, or move the "
                "file away."
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"settings": record})
    return found


def atomic_save_model(trainer, target: str | os.PathLike, write_extra=None) -> None:
    """`trainer.save_model` into a temporary sibling of `target`, renamed onto `target` when complete.

    Every process must call it: `save_model` gathers FSDP / ZeRO-3 shards collectively; only the main process
    writes. `write_extra(tmp)` adds files on the main process before the rename. The Trainer's pickled
    `training_args.bin` is left out: a final checkpoint holds safetensors and JSON only. Weights with a NaN or an
    infinity are never committed (`NonFiniteError`).
    """
    from accelerate.utils import broadcast_object_list

    from .validation import check_finite_weights

    target = resolve_output_path(target)
    main = trainer.is_world_process_zero()
    tmp = [str(_new_temporary_directory(target, overwrite=True)) if main else None]
    tmp = Path(broadcast_object_list(tmp, from_process=0)[0])
    try:
        trainer.save_model(str(tmp))
        if main:
            (tmp / "training_args.bin").unlink(missing_ok=True)
            check_finite_weights(tmp)
            if write_extra is not None:
                write_extra(tmp)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if main:
        _commit_directory(tmp, target, overwrite=True)
    trainer.accelerator.wait_for_everyone()
