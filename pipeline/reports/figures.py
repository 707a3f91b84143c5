"""The reports' figures drawn beside the work. A head command forks one worker process at its start; it imports
matplotlib and scikit-learn on the second core while this process scans, loads and fits, then draws each
figure handed to it while this process goes on. Where forking is not safe (no ``fork``, Python threads
running, TensorFlow loaded: a notebook, a test process, the fine-tune step) figures are drawn in this process.
Either way :func:`wait` returns only when every figure is on disk, and raises what drawing raised."""

from __future__ import annotations

import contextlib
import os
import sys
import threading

_pool = None
_pending = []


def _warm():
    """What the first figure would pay for: the imports (pyplot: scikit-learn's displays import it), the font
    manager and a first text drawn on the Agg canvas."""
    import matplotlib.pyplot  # noqa: F401
    import sklearn.metrics  # noqa: F401
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1))
    fig.text(0.5, 0.5, "0.9 predicted", fontsize=6.5)
    FigureCanvasAgg(fig).draw()


def _forkable() -> bool:
    import multiprocessing

    return (os.environ.get("PIPELINE_PLOT_WORKER", "1") != "0" and "fork" in multiprocessing.get_all_start_methods()
            and threading.active_count() == 1 and "tensorflow" not in sys.modules)


def start() -> bool:
    """Fork the worker now, if it is safe; whether one runs. Call first thing, before any thread or TensorFlow."""
    global _pool
    if _pool is None and _forkable():
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        _pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"), initializer=_warm)
        _pool.submit(int)  # forks here, while this process has one thread
    return _pool is not None


def draw(fn, *args) -> None:
    """``fn(*args)`` (a module-level function that writes a figure) in the worker, or here without one."""
    global _pool
    if _pool is not None:
        from concurrent.futures.process import BrokenProcessPool

        try:
            _pending.append((_pool.submit(fn, *args), fn, args))
            return
        except BrokenProcessPool:  # the worker died (killed, out of memory): draw here from now on
            _pool = None
    fn(*args)


def wait() -> None:
    """Every figure handed to :func:`draw` is written; one whose worker died is drawn here instead."""
    from concurrent.futures.process import BrokenProcessPool

    global _pool
    while _pending:
        future, fn, args = _pending.pop(0)
        try:
            future.result()
        except BrokenProcessPool:
            _pool = None
            fn(*args)


@contextlib.contextmanager
def running():
    """The worker for the length of a command: started on entry; on a normal exit the figures are waited for;
    on any exit the worker is ended (figures not yet drawn after a failure are dropped)."""
    start()
    try:
        yield
        wait()
    finally:
        _end()


def _end() -> None:
    global _pool
    _pending.clear()
    if _pool is not None:
        _pool.shutdown(cancel_futures=True)
        _pool = None
