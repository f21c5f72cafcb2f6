"""Starts a function in its own process, cheaply, so that a test can `kill -9` it.

A fresh `python` pays ~10-20 s of imports (torch, transformers, TRL) on the 2-core test machine; the interrupt tests
start about a dozen processes. They are forked instead from a multiprocessing *forkserver* that imported those modules
once: each child is still a separate process with its own pid, killed with a real SIGKILL, and it never inherits the
test process's threads (the server is a fresh interpreter that ran no torch op).
"""

import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path


PRELOAD = [
    "torch",
    "transformers",
    "datasets",
    "peft",
    "trl",
    "hf_minitron.cli",
    "hf_minitron.distillation.trainer",
    "hf_minitron.alignment",
    "hf_minitron.commands.run",
    "hf_minitron.commands.prune",
    "interrupt_worker",
    "kill_mid_save",
]


def _context():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def _bootstrap(log_path: str, target, args) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.exit(target(*args) or 0)


def start(log_path, target, *args) -> multiprocessing.Process:
    """Runs `target(*args)` in a new process (stdout and stderr to `log_path`); its exit code is `target`'s return."""
    process = _context().Process(target=_bootstrap, args=(str(log_path), target, args), daemon=True)
    process.start()
    return process


def kill_when(process: multiprocessing.Process, signal_file, log_path, timeout: float, waiting_for: str) -> None:
    """SIGKILLs `process` as soon as it creates `signal_file`; raises `AssertionError` (with the end of its log) if
    it ends first or takes longer than `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not Path(signal_file).exists():
        if not process.is_alive():
            raise AssertionError(f"the process ended before {waiting_for}:\n{Path(log_path).read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the process did not reach {waiting_for} within {timeout} s")
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.join()
    assert process.exitcode == -signal.SIGKILL
