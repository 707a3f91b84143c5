"""One writer per cache file: an exclusive ``flock`` on ``<file>.lock``, released when the process ends however
it ends; a second run waits, saying so, or fails at once."""

from __future__ import annotations

import contextlib
import os

from pipeline.errors import PipelineError

LOCK = ".lock"


@contextlib.contextmanager
def locked(path, wait=True, log=print):
    """Hold the exclusive lock of cache file ``path`` (``<path>.lock``, released when the process ends,
    however it ends). A second run waits, saying so, or with ``wait=False`` fails in one line."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: runs are not serialised
        yield
        return
    lock_path = path + LOCK
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = f"another run (pid {_lock_pid(lock_path)}) is writing {path}"
            if not wait:
                raise PipelineError(f"{who}; rerun when it is done (or without WAIT=0 to wait for it)") from None
            log(f"{who}; waiting")
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError:
            pass  # the pid only names the holder in a message (a full disk: the work's own writes say so)
        yield
    finally:
        os.close(fd)


def _lock_pid(lock_path) -> str:
    try:
        with open(lock_path) as f:
            return f.read().strip() or "?"
    except OSError:
        return "?"


def busy(path) -> str | None:
    """"busy (pid N)" while another process holds the lock of cache file ``path``, else None."""
    try:
        import fcntl

        fd = os.open(path + LOCK, os.O_RDONLY)
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return f"busy (pid {_lock_pid(path + LOCK)})"
    finally:
        os.close(fd)
    return None
