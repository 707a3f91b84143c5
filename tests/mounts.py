"""Real file-system failures for tests: a folder that cannot be written and a full disk, as small tmpfs mounts
(root, as tests run here and in CI, ignores permission bits but not a read-only mount)."""

import contextlib
import errno
import os
import subprocess

import pytest


@contextlib.contextmanager
def tmpfs(folder, options):
    """``folder`` (made) with a tmpfs of ``options`` mounted on it, unmounted afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if p.returncode:
        pytest.fail(f"this test needs a tmpfs mount (root with mount rights): {p.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@contextlib.contextmanager
def read_only(folder):
    """``folder``, which this process cannot write into: a read-only mount for root, else permission bits."""
    if os.geteuid() == 0:
        with tmpfs(folder, "ro,size=64k"):
            yield folder
        return
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    try:
        yield folder
    finally:
        folder.chmod(0o755)


@contextlib.contextmanager
def full_disk(folder):
    """``folder`` on a small file system already full (a file of zeros took every free block)."""
    with tmpfs(folder, "size=256k"):
        with open(folder / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC
        yield folder
