"""One writer per output folder.

Two commands writing one folder at once lose work silently: two `distill` runs mix their `checkpoint-N` folders and
the later final save replaces the other's result, and two `run`s leave a stage record that describes the other run's
weights. Every command therefore holds an exclusive lock on each folder it writes, for as long as it runs, and a
second writer is refused at once, naming the first.

The lock is `flock(2)` on a small file under `$HF_MINITRON_CACHE/locks/` named after the folder's real path (so the
user's folders get no lock files): the kernel drops it when its process exits, however it exits, so a killed run
never leaves a folder locked. It guards processes of one machine that share that cache (a network filesystem shared
by several machines is not covered). Under `accelerate launch` / `torchrun` the main process (rank 0) holds it for the
launch; the other ranks write nothing themselves.
"""

import fcntl
import hashlib
import json
import os
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path


# Folders this process holds, with a count: a command that calls another command on the same folder does not lock
# itself out.
_HELD: dict[str, list] = {}


class OutputInUseError(ValueError):
    """Another process is writing the same output folder."""


def _lock_path(folder: Path) -> Path:
    from .embedded import cache_dir

    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    return locks / f"{hashlib.sha256(str(folder).encode()).hexdigest()[:32]}.lock"


@contextmanager
def output_lock(folder: str | os.PathLike):
    """Holds the exclusive lock of `folder` (resolved like every output: `~`, links) while the block runs.

    Raises:
        `OutputInUseError`: another live process holds it; the message names its pid, command and start time.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    from .io import resolve_output_path

    key = str(resolve_output_path(folder))
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    fd = os.open(_lock_path(Path(key)), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            holder = {}
        os.close(fd)
        who = f"pid {holder.get('pid', '?')}, `{holder.get('command', '?')}`, since {holder.get('since', '?')}"
        raise OutputInUseError(
            f"{str(folder)!r} is being written by another hf-minitron process ({who}). Two writers of one folder "
            "would mix their checkpoints and results: wait for that run to finish (or stop it), or choose another "
            "output folder."
        ) from None
    os.ftruncate(fd, 0)
    command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]
    os.pwrite(
        fd,
        json.dumps(
            {"pid": os.getpid(), "command": command, "since": time.strftime("%Y-%m-%d %H:%M:%S"), "folder": key}
        ).encode(),
        0,
    )
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        _HELD[key][1] -= 1
        if _HELD[key][1] == 0:
            del _HELD[key]
            os.close(fd)  # closing the descriptor releases the lock


@contextmanager
def output_locks(*folders):
    """[`output_lock`] on each of `folders` that is not `None` (a folder named twice is locked once)."""
    with ExitStack() as stack:
        for folder in dict.fromkeys(f for f in folders if f is not None):
            stack.enter_context(output_lock(folder))
        yield
