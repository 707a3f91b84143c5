"""Locks between processes: a second run fails at once naming the holder's pid (WAIT=0), and a holder killed
with SIGKILL leaves the lock free."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

from pipeline import lock
from pipeline.errors import PipelineError

HOLD = """
import sys
from pipeline import lock
with lock.locked(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_held_lock_names_its_holder_and_a_killed_holder_frees_it(tmp_path):
    path = str(tmp_path / "c.h5")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, path], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert lock.busy(path) == f"busy (pid {holder.pid})"
        with pytest.raises(PipelineError, match=rf"another run \(pid {holder.pid}\) is writing .*c\.h5; rerun"):
            with lock.locked(path, wait=False):
                pass
        assert lock.busy(path) == f"busy (pid {holder.pid})"  # the failed try left the holder's pid in place
    finally:
        holder.kill()
        holder.wait(30)
    assert lock.busy(path) is None
    with lock.locked(path, wait=False):
        assert open(path + lock.LOCK).read() == str(os.getpid())
