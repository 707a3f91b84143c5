"""Progress of long work: tqdm's bar on a terminal (standard error), plain lines in a log (no carriage returns,
no escape codes)."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

EVERY = 10.0  # seconds between two plain lines in a log


class _Lines:
    """Progress as a plain line on the first update, then every ``EVERY`` seconds and at the end."""

    def __init__(self, total, unit, log, every=EVERY):
        self.total, self.unit, self.log, self.every, self.next = total, unit, log, every, 0.0

    def update(self, n, rate=None):
        now = time.monotonic()
        if now >= self.next or n >= self.total:
            speed = f" ({rate:.1f} {self.unit}/s)" if rate else ""
            self.log(f"{n}/{self.total} {self.unit}s{speed}")
            self.next = now + self.every


class _Bar:
    """tqdm's bar on standard error, closed when the work is done."""

    def __init__(self, total, unit):
        self.bar = tqdm(total=total, unit=unit, file=sys.stderr, mininterval=0.5, dynamic_ncols=True)

    def update(self, n, rate=None):
        if self.bar.disable:
            return
        if rate:
            self.bar.set_postfix_str(f"{rate:.1f} {self.bar.unit}/s", refresh=False)
        self.bar.update(n - self.bar.n)
        if n >= self.bar.total:
            self.bar.close()


def progress(total, unit, log=print):
    """A progress display of ``total`` units whose ``update(done, rate=None)`` says how many are done: a bar when
    standard error is a terminal, else plain lines through ``log``."""
    return _Bar(total, unit) if sys.stderr.isatty() else _Lines(total, unit, log)
