"""Progress: tqdm's bar when standard error is a terminal (no Keras import), plain lines in a log."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

from conftest import ROOT

from pipeline import progress

ON_A_TERMINAL = """
import sys
from pipeline.progress import progress
bar = progress(50, "image")
for n in range(10, 51, 10):
    bar.update(n, 12.5)
print("keras" in sys.modules, file=sys.__stdout__)
"""


def test_a_log_gets_plain_lines_the_first_then_periodically_and_the_last():
    said = []
    lines = progress._Lines(100, "image", said.append, every=3600)
    for n in range(10, 101, 10):
        lines.update(n, 25.0 if n == 100 else None)
    assert said == ["10/100 images", "100/100 images (25.0 image/s)"]
    assert not any("\r" in s or "\x1b" in s for s in said)


def _read(fd):
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the terminal's other end is closed and all was read
        return b""


def test_a_terminal_gets_a_tqdm_bar_without_importing_keras():
    main, sub = pty.openpty()
    fcntl.ioctl(sub, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 columns wide
    try:
        p = subprocess.run([sys.executable, "-c", ON_A_TERMINAL], stderr=sub, stdout=subprocess.PIPE, text=True,
                           cwd=ROOT, timeout=60)
        os.close(sub)
        drawn = b""
        while chunk := _read(main):
            drawn += chunk
        drawn = drawn.decode()
    finally:
        os.close(main)
    assert p.returncode == 0 and p.stdout.strip() == "False"  # no Keras
    assert "50/50" in drawn and "\r" in drawn and "12.5 image/s" in drawn, drawn
