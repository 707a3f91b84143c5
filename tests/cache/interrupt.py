"""Killing a ``features`` run at a chosen point of its partial cache file, then resuming it beside a clean run."""

import os
import signal
import time

from test_extract import run_cli

import pipeline
from pipeline.cache import store


def kill_when(args, folder, ready, seconds=240):
    """Start ``features`` with ``args`` into ``folder``; SIGKILL it as soon as ``ready(f)`` holds for its
    partial file (an h5py File, read while the run writes it). Asserts the kill landed before the run ended."""
    proc = run_cli([*args, f"CACHE_DIR={folder}"])
    deadline, hit = time.time() + seconds, False
    while time.time() < deadline and proc.poll() is None and not hit:
        partial = list(folder.glob("*.h5.partial")) if folder.exists() else []
        if partial:
            try:  # read while another process writes it: a read can fail, then look again
                with store.h5py.File(partial[0], "r", locking=False) as f:
                    hit = bool(ready(f))
            except (OSError, KeyError):
                pass
        time.sleep(0.02)
    assert hit and proc.poll() is None, "the run finished before it could be killed where asked"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def resumed_and_clean(args, killed, clean):
    """Rerun the killed run (it must say it resumes) and a clean run; both caches, loaded."""
    resumed = run_cli([*args, f"CACHE_DIR={killed}"])
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0 and "resuming" in out, out
    fresh = run_cli([*args, f"CACHE_DIR={clean}"])
    assert fresh.wait(timeout=300) == 0
    return (pipeline.load_cache(str(next(killed.glob("*.h5")))), pipeline.load_cache(str(next(clean.glob("*.h5")))))
