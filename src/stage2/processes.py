"""Processes that end cleanly: folder locks that end with their holder, worker processes that end with their
parent and leave stop signals to it, and stop requests that a long loop honours at its next safe point.

Torch-free, at the bottom of the import graph with `errors` and `atomic`: the run folder, the decoded cache and
the DataLoader workers all use it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from stage2.atomic import naming

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_held_locks: set[int] = set()  # descriptors of the folder locks this process holds


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, which a container or taskset narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class LockBusy(Exception):
    """The lock is held by another live process; `holder` is the pid it wrote ("?" if not written yet)."""

    def __init__(self, holder: str) -> None:
        super().__init__(f"held by pid {holder}")
        self.holder = holder


@contextmanager
def exclusive_lock(path: Path, *, wait: bool = False, on_wait: Callable[[str], None] | None = None
                   ) -> Iterator[None]:
    """Hold an exclusive `fcntl.flock` on the file `path` (created if missing, our pid written in it) while the
    block runs, and remove the file as it lets go.

    The kernel drops a flock when the last descriptor of its holder closes, however the holder ends (kill -9
    included), so the lock of a dead process is never an obstacle (its file stays, harmless). Workers forked while
    it is held let go of their copy at start (`init_worker`), so it ends with its holder. When another process
    holds it: LockBusy, or with `wait`, `on_wait(holder's pid)` and then wait for it.
    """
    while True:
        with naming(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                if not wait:
                    raise LockBusy(holder) from None
                if on_wait is not None:
                    on_wait(holder)
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _is_file_at(fd, path):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # its holder removed that file as it let go: lock the file at `path` now
    try:
        with naming(path):  # a full disk fails the pid's write: the message names the lock file
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held_locks.add(fd)
        yield
    finally:
        _held_locks.discard(fd)
        with contextlib.suppress(OSError):  # still ours: a process that opened it since retries on a new file
            os.unlink(path)
        os.close(fd)


def _is_file_at(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is the one at `path` (not one removed, or replaced, since it was opened)."""
    try:
        at = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (at.st_dev, at.st_ino)


def init_worker() -> None:
    """The first thing every worker process of ours runs (DataLoader workers, cache builders).

    - It lets go of the parent's folder locks, which the fork copied (the parent keeps them).
    - On Linux it dies with the parent (PR_SET_PDEATHSIG), even when the parent is killed with SIGKILL, instead of
      living on as an orphan that holds files and memory.
    - It leaves Ctrl-C and SIGTERM to the parent, which stops cleanly and then ends its workers: a terminal's
      Ctrl-C, and the SIGTERM that `timeout`, systemd and Slurm send to the whole process group, reach every
      worker too. A SIGTERM from the parent itself (multiprocessing's terminate()) still ends the worker.
    """
    parent = multiprocessing.parent_process()
    if parent is None or parent.pid is None:  # not started by multiprocessing: nothing to follow
        return
    for fd in _held_locks:
        os.close(fd)
    _held_locks.clear()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent.pid:  # the parent was already gone before prctl: nothing would signal us now
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo"):  # a plain handler cannot see who sent the signal; sigwaitinfo can
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=_sigterm_from_parent_only, args=(parent.pid,), name="sigterm", daemon=True).start()


def _sigterm_from_parent_only(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            # Exit 0, as torch's own worker SIGTERM handler does: the parent's SIGCHLD check would otherwise report
            # a worker "killed by signal" while it shuts its workers down.
            os._exit(0)


@dataclass
class StopRequest:
    """Set to the signal number by SIGTERM or a first Ctrl-C while `stop_requests` is active."""

    signum: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a signal"


@contextmanager
def stop_requests(request: StopRequest) -> Iterator[StopRequest]:
    """While the block runs, SIGTERM (what `docker stop`, Kubernetes and schedulers send) and the first Ctrl-C only
    set `request.signum`, for the loop to stop at its next safe point; a second Ctrl-C interrupts at once.
    Handlers can only be set from the main thread: elsewhere the signals keep their usual effect."""

    def record(signum: int, _frame: object) -> None:
        # No logging here: a handler that runs while the log stream is mid-write would re-enter it.
        if signum == signal.SIGINT and request.signum is not None:
            raise KeyboardInterrupt
        request.signum = signum

    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {sig: signal.signal(sig, record) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
