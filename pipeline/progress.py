"""Progress of long work: Keras' bar on a terminal, plain lines in a log (no carriage returns, no escape
codes)."""

from __future__ import annotations

import sys


class _Lines:
    """Progress as plain lines, about every tenth of the work: for logs that are not a terminal."""

    def __init__(self, total, unit, log):
        self.total, self.unit, self.log, self.next = total, unit, log, 0

    def update(self, n, rate=None):
        if n >= self.next or n == self.total:
            speed = f" ({rate:.1f} {self.unit}/s)" if rate else ""
            self.log(f"{n}/{self.total} {self.unit}s{speed}")
            self.next = n + max(1, self.total // 10)


class _Bar:
    """Keras' progress bar, on a terminal."""

    def __init__(self, total, unit):
        import keras

        self.bar = keras.utils.Progbar(total, unit_name=unit, stateful_metrics=[f"{unit[:3]}/s"])
        self.key = f"{unit[:3]}/s"

    def update(self, n, rate=None):
        self.bar.update(n, [(self.key, rate)] if rate else None)


def progress(total, unit, log=print):
    """A progress display of ``total`` units: Keras' bar on a terminal, else plain lines (no carriage
    returns or escape codes in a log file)."""
    return _Bar(total, unit) if sys.stdout.isatty() else _Lines(total, unit, log)
