"""Figures drawn in the forked worker are the figures drawn in this process; a failure there is raised here; a
worker that died is replaced by drawing here; no worker where forking is unsafe. Each case runs in a fresh
interpreter (one thread, no TensorFlow), as a head command does."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PRELUDE = """
import os, sys
from pipeline.reports import evaluate
from pipeline.reports import figures as plotter
m = {"class_names": ["a", "b", "c"], "confusion_matrix": [[5, 1, 0], [2, 7, 1], [0, 0, 9]], "accuracy": 0.84}
out = sys.argv[1]
"""


def _run(tmp_path, body):
    r = subprocess.run([sys.executable, "-c", PRELUDE + body, str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_worker_draws_the_same_png_as_this_process(tmp_path):
    out = _run(tmp_path, """
with plotter.running():
    assert plotter._pool is not None
    plotter.draw(evaluate.plot_confusion, os.path.join(out, "worker.png"), m, "t")
assert plotter._pool is None and os.path.exists(os.path.join(out, "worker.png"))  # waited for, then ended
evaluate.plot_confusion(os.path.join(out, "here.png"), m, "t")
""")
    assert out == ""
    assert (tmp_path / "worker.png").read_bytes() == (tmp_path / "here.png").read_bytes()


def test_a_failure_in_the_worker_is_raised_by_wait(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    out = _run(tmp_path, """
assert plotter.start()
plotter.draw(evaluate.plot_confusion, os.path.join(out, "file", "c.png"), m, "t")
try:
    plotter.wait()
except OSError as e:
    print("raised", type(e).__name__)
""")
    assert out.startswith("raised ")


def test_a_failed_command_ends_the_worker_without_waiting(tmp_path):
    out = _run(tmp_path, """
try:
    with plotter.running():
        pool = plotter._pool
        raise RuntimeError("the step failed")
except RuntimeError:
    print(plotter._pool is None, pool._shutdown_thread)
""")
    assert out.split() == ["True", "True"]


def test_a_dead_worker_is_replaced_by_drawing_here(tmp_path):
    _run(tmp_path, """
import signal, time
assert plotter.start()
plotter.wait()
for pid in list(plotter._pool._processes):
    os.kill(pid, signal.SIGKILL)
time.sleep(0.5)
plotter.draw(evaluate.plot_confusion, os.path.join(out, "c.png"), m, "t")
plotter.wait()
""")
    assert (tmp_path / "c.png").stat().st_size > 0


def test_no_worker_with_threads_or_tensorflow_loaded(tmp_path):
    out = _run(tmp_path, """
import threading
ev = threading.Event()
t = threading.Thread(target=ev.wait); t.start()
print(plotter.start())
ev.set(); t.join()
sys.modules["tensorflow"] = object()
print(plotter.start())
del sys.modules["tensorflow"]
os.environ["PIPELINE_PLOT_WORKER"] = "0"
print(plotter.start())
plotter.draw(evaluate.plot_confusion, os.path.join(out, "c.png"), m, "t")  # drawn here, at once
print(os.path.exists(os.path.join(out, "c.png")))
""")
    assert out.split() == ["False", "False", "False", "True"]
