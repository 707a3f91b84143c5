"""One writer at a time: an exclusive lock on ``<path>.lock`` (``filelock``: ``flock`` where there is one),
released when the process ends however it ends; a second run waits, saying so, or fails at once."""

from __future__ import annotations

import contextlib
import os

from filelock import FileLock, Timeout

from pipeline.errors import PipelineError

LOCK = ".lock"


@contextlib.contextmanager
def locked(path, wait=True, log=print):
    """Hold the exclusive lock of ``path`` (``<path>.lock``). A second run waits, saying so, or with
    ``wait=False`` fails in one line."""
    lock_path = path + LOCK
    held = FileLock(lock_path)
    holder = _lock_pid(lock_path)  # read before trying: the file holds the holder's pid
    try:
        held.acquire(timeout=0)
    except Timeout:
        who = f"another run (pid {holder}) is writing {path}"
        if not wait:
            raise PipelineError(f"{who}; rerun when it is done (or without WAIT=0 to wait for it)") from None
        log(f"{who}; waiting")
        held.acquire()
    try:
        _write_pid(lock_path)
        yield
    finally:
        held.release()


def _write_pid(lock_path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(lock_path, os.O_WRONLY)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        finally:
            os.close(fd)


def _lock_pid(lock_path) -> str:
    try:
        with open(lock_path) as f:
            return f.read().strip() or "?"
    except OSError:
        return "?"


def busy(path) -> str | None:
    """"busy (pid N)" while another process holds the lock of ``path``, else None."""
    lock_path = path + LOCK
    if not os.path.exists(lock_path):
        return None
    holder = _lock_pid(lock_path)
    probe = FileLock(lock_path)
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return f"busy (pid {holder})"
    except OSError:
        return None
    probe.release()
    return None
