"""ENGINE=ray on a local 2-CPU Ray cluster (one for the whole module, its state in a temp folder): the cache is
the in-process one bit for bit (with VIEWS and TTA rows too), an actor killed mid-shard is restarted and its
shard resumed, only shards without a file are extracted, a damaged shard makes the merge refuse naming it,
rows an earlier cache lends (views and TTA rows too) are not extracted."""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import h5py
import numpy as np
import pytest
from pathlib import Path

from conftest import ROOT, make_tree, write_image

ray = pytest.importorskip("ray")

from pipeline.cache import extract as features  # noqa: E402
from pipeline.cache import ray_actor, ray_engine, shards, store  # noqa: E402
from pipeline.configs import FeaturesConfig  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.ray]

PINNED = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "2"}  # actors and the in-process reference
OPTIONS = dict(backbone="mobilenet_v2", weights="none", size=32, alpha=0.35, val_fraction=0.25, test_fraction=0.25,
               batch=4, chunk=8)


def cfg(data, cache, **kw):
    return FeaturesConfig(**{**OPTIONS, "data": str(data), "cache_dir": str(cache), "engine": "ray", "workers": 2,
                             "shard": 16, **kw})


def in_process(data, cache, **kw):
    """The in-process cache, made in a fresh process with TensorFlow's thread counts pinned as the actors'."""
    args = [f"{k.upper()}={v}" for k, v in {**OPTIONS, "data": data, "cache_dir": cache, **kw}.items()]
    p = subprocess.run([sys.executable, "-m", "pipeline", "features", *args], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, **PINNED, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return str(next(cache.glob("*.h5")))


def assert_same(a_path, b_path, exact=True):
    """The same cache: bit for bit; ``exact=False``: features to float rounding (rows computed at other places
    in their batches, which changes the last bits on some CPUs, e.g. AVX2-only ones), the rest bit for bit."""
    a, b = store.load(a_path), store.load(b_path)
    assert a.key == b.key and a.class_names == b.class_names and set(a.splits) == set(b.splits)
    with h5py.File(a_path) as fa, h5py.File(b_path) as fb:
        for s in fb:
            for name in ("features", "labels", "skipped"):
                if name == "features" and not exact:
                    np.testing.assert_allclose(fa[s][name][()], fb[s][name][()], rtol=1e-5, atol=1e-6)
                else:
                    assert fa[s][name][()].tobytes() == fb[s][name][()].tobytes(), (s, name)
            assert fa[s]["paths"].asstr()[()].tolist() == fb[s]["paths"].asstr()[()].tolist()


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster of 2 CPUs for every test here; HOME and Ray's temp folder (short: it holds
    sockets) in a temp folder, removed after."""
    state = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    mp = pytest.MonkeyPatch()
    for k, v in {"HOME": state, "RAY_TMPDIR": state, **PINNED}.items():
        mp.setenv(k, v)
    mp.delenv("RAY_ADDRESS", raising=False)
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=state, logging_level="ERROR", log_to_driver=False,
             object_store_memory=ray_engine.LOCAL_OBJECT_STORE)
    try:
        yield
    finally:
        ray.shutdown()
        mp.undo()
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """(data, in-process cache) of a 40-image tree: shards train 0-16, 16-24, val 0-8, test 0-8."""
    root = tmp_path_factory.mktemp("raytree")
    data = make_tree(root / "data", per_class=20)
    return data, in_process(data, root / "inprocess")


def shard_lines(msgs):
    return [m for m in msgs if re.match(r"shard \S+: \d+ images", m)]


def test_two_actors_make_the_in_process_cache_bit_for_bit(cluster, tree, tmp_path):
    data, reference = tree
    msgs = []
    path = features.run(cfg(data, tmp_path / "cache"), log=msgs.append)
    assert_same(path, reference)
    assert any(m.startswith("ray: 2 extractor actor(s)") for m in msgs), msgs
    lines = shard_lines(msgs)
    assert len(lines) == 4 and len({re.search(r"pid (\d+)", m)[1] for m in lines}) == 2, msgs
    assert not os.path.exists(path[:-3] + shards.SHARDS)  # the shard folder is removed after the merge
    msgs = []
    assert features.run(cfg(data, tmp_path / "cache"), log=msgs.append) == path
    assert any(m.startswith("up to date") for m in msgs) and not any(m.startswith("ray:") for m in msgs)


def _holder(path):
    """The pid of a process that has ``path`` open (read from /proc), or None."""
    path = os.path.realpath(path)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == path for fd in os.listdir(f"/proc/{pid}/fd")):
                return int(pid)
        except OSError:
            continue
    return None


def _done(path):
    try:  # read while a stopped process has it open for writing: a read can fail, then step again
        with h5py.File(path, "r", locking=False) as f:
            return int(next(iter(f.values())).attrs["done"])
    except (OSError, KeyError, StopIteration):
        return None


def kill_mid_write(partial, rows, seconds=240):
    """A thread that, once ``partial`` exists, stops the process writing it (SIGSTOP) and lets it run a
    millisecond at a time until ``rows`` rows are on disk, then SIGKILLs it; ``.result`` is what it did."""
    def watch():
        deadline = time.time() + seconds
        while time.time() < deadline:
            pid = _holder(partial) if partial.exists() else None
            if pid is None:
                time.sleep(0.001)
                continue
            os.kill(pid, signal.SIGSTOP)
            while time.time() < deadline and os.path.exists(partial):
                done = _done(partial)
                if done is not None and done >= rows:
                    os.kill(pid, signal.SIGKILL)
                    thread.result = ("killed", done)
                    return
                os.kill(pid, signal.SIGCONT)
                time.sleep(0.001)
                os.kill(pid, signal.SIGSTOP)
            os.kill(pid, signal.SIGCONT)
            thread.result = ("finished before the kill", None)
            return

    thread = threading.Thread(target=watch, daemon=True)
    thread.result = ("never saw the partial file", None)
    thread.start()
    return thread


def test_an_actor_killed_mid_shard_is_restarted_and_its_shard_resumes(cluster, tree, tmp_path):
    """The test kills the actor writing the first train shard (the only one of 2 chunks) once its first chunk
    is on disk: a new actor resumes that shard from row 8."""
    data, reference = tree
    cache = tmp_path / "cache"
    key = features.Plan(cfg(data, cache), log=lambda m: None, lazy=True).path[:-len(".h5")]
    killer = kill_mid_write(Path(key + shards.SHARDS) / "train-000000000-000000016.h5.partial", 8)
    msgs = []
    path = features.run(cfg(data, cache), log=msgs.append)
    killer.join()
    assert killer.result == ("killed", 8), killer.result
    resumed = [m for m in shard_lines(msgs) if "resumed at row 8" in m]
    assert len(resumed) == 1 and resumed[0].startswith("shard train-000000000-000000016"), msgs
    assert_same(path, reference)


def test_only_shards_without_a_file_are_extracted_and_a_damaged_one_refuses(cluster, tree, tmp_path, monkeypatch):
    data, reference = tree
    cache = tmp_path / "cache"

    def stop(*a, **k):
        raise KeyboardInterrupt("stopped before the merge")

    real_merge = ray_engine._merge
    monkeypatch.setattr(ray_engine, "_merge", stop)
    with pytest.raises(KeyboardInterrupt):
        features.run(cfg(data, cache), log=lambda m: None)
    folder = next(cache.glob("*" + shards.SHARDS))
    files = sorted(p.name for p in folder.glob("*.h5"))
    assert files == ["test-000000000-000000008.h5", "train-000000000-000000016.h5",
                     "train-000000016-000000024.h5", "val-000000000-000000008.h5"]

    msgs = []  # a rerun submits nothing
    with pytest.raises(KeyboardInterrupt):
        features.run(cfg(data, cache), log=msgs.append)
    assert any(m.startswith("ray: extracting 0 of 4 shards") for m in msgs) and not shard_lines(msgs), msgs

    monkeypatch.setattr(ray_engine, "_merge", real_merge)
    real_run = ray_engine._run_shards
    monkeypatch.setattr(ray_engine, "_run_shards", lambda *a, **k: [])  # the merge alone
    first = folder / "train-000000000-000000016.h5"
    with h5py.File(first, "r+") as f:  # a changed byte: the merge checks every shard's checksum
        saved = f["train"]["features"][3, 5]
        f["train"]["features"][3, 5] = saved + 1
    with pytest.raises(PipelineError, match=rf"^shard {re.escape(str(first))} is changed since it was written"):
        features.run(cfg(data, cache), log=lambda m: None)
    with h5py.File(first, "r+") as f:
        f["train"]["features"][3, 5] = saved
    (folder / "val-000000000-000000008.h5").unlink()  # a shard lost before the merge
    with pytest.raises(PipelineError, match=rf"^shard {re.escape(str(folder))}/val-000000000-000000008\.h5 is "
                                            "missing: rerun"):
        features.run(cfg(data, cache), log=lambda m: None)
    monkeypatch.setattr(ray_engine, "_run_shards", real_run)

    victim = folder / "test-000000000-000000008.h5"  # not merged yet (the merge stopped at val)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    with pytest.raises(PipelineError) as err:  # a damaged shard: one line naming it, before any work
        features.run(cfg(data, cache), log=lambda m: None)
    text = str(err.value)
    assert text.startswith(f"shard {victim} is ") and "delete it and rerun" in text and "\n" not in text, text
    assert not list(cache.glob("*.h5"))

    victim.unlink()  # the deleted shards are the only ones extracted again
    msgs = []
    path = features.run(cfg(data, cache), log=msgs.append)
    assert sorted(m.split(":")[0] for m in shard_lines(msgs)) == ["shard test-000000000-000000008",
                                                                  "shard val-000000000-000000008"], msgs
    assert any("resuming" in m for m in msgs)  # the cache's own partial file already held train's rows
    assert_same(path, reference)
    assert not folder.exists()


def test_added_images_are_the_only_rows_the_actors_extract(cluster, tree, tmp_path):
    """Incremental on Ray: the in-process cache lends its rows; shards with nothing new are not submitted."""
    data, reference = tree
    new = tmp_path / "data"
    shutil.copytree(data, new)
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(reference, cache)
    for k in range(3):
        write_image(new / ("cat", "dog")[k % 2] / f"new_{k}.jpg", (90, 90, 160), seed=700 + k)
    msgs = []
    path = features.run(cfg(new, cache), log=msgs.append)
    assert any(m.startswith(f"reused 40 rows from {os.path.basename(reference)}, extracting 3") for m in msgs), msgs
    lines = shard_lines(msgs)
    assert sum(int(re.search(r": (\d+) images", m)[1]) for m in lines) == 3, msgs
    assert len(lines) < 4
    assert_same(path, in_process(new, tmp_path / "scratch"), exact=False)  # reused rows sat elsewhere in batches


def test_views_and_tta_rows_are_the_in_process_ones_bit_for_bit_and_lent_on_ray(cluster, tree, tmp_path):
    """VIEWS and TTA on Ray: their groups are sharded like the splits and each actor applies the group's
    transform; the cache is the in-process one bit for bit. Then 3 images added: every clean, view and TTA
    row of the earlier cache is lent, only the new images' rows are extracted."""
    data, _ = tree
    more = dict(views=2, tta=1)
    msgs = []
    path = features.run(cfg(data, tmp_path / "cache", **more), log=msgs.append)
    with h5py.File(path) as f:
        assert set(f) == {"train", "val", "test", store.VIEWS, "val_tta", "test_tta"}
    names = {m.split(":")[0].split()[1].rsplit("-", 2)[0] for m in shard_lines(msgs)}
    assert names == {"train", "val", "test", store.VIEWS, "val_tta", "test_tta"}, msgs
    assert_same(path, in_process(data, tmp_path / "inprocess", **more))

    new = tmp_path / "data"
    shutil.copytree(data, new)
    for k in range(3):
        write_image(new / ("cat", "dog")[k % 2] / f"new_{k}.jpg", (90, 90, 160), seed=700 + k)
    msgs = []
    lent = features.run(cfg(new, tmp_path / "cache", **more), log=msgs.append)
    # 40 clean rows, 2 views of the 24 train images, 16 TTA rows lent; the 3 new images' rows in whichever
    # splits they fall (each a clean row, and 2 view rows or a TTA row)
    assert any(re.match(rf"reused {40 + 48 + 16} rows from .*, extracting \d+$", m) for m in msgs), msgs
    # rows lent sat elsewhere in their batches: equal to float rounding where that changes the last bits
    assert_same(lent, in_process(new, tmp_path / "scratch", **more), exact=False)


def test_an_actor_that_fails_as_it_starts_is_said_in_one_line_and_a_killed_one_is_lost(cluster, tree, tmp_path):
    """An actor whose node has other weights dies in its constructor: the run stops with that one line instead
    of retrying; an actor killed otherwise is only lost (its shard goes to another)."""
    data, _ = tree
    remote = ray.remote(ray_actor.Extractor).options(max_restarts=0, num_cpus=1)
    other = remote.remote(cfg(data, tmp_path), "0" * 64, 1280, 32, 8, 1)
    with pytest.raises(ray.exceptions.RayActorError) as err:
        ray.get(other.where.remote())
    error = ray_engine._result_error(ray, err.value)
    assert re.fullmatch(r"ENGINE=ray: the weights on node \S+ \(none\) differ from the driver's: every node needs "
                        r"the same WEIGHTS file \(a shared file system\)", str(error)), error
    killed = remote.remote(cfg(data, tmp_path), "0" * 64, 1280, 32, 8, 1)
    ray.kill(killed)
    with pytest.raises(ray.exceptions.RayActorError) as err:
        ray.get(killed.where.remote())
    assert ray_actor.raised_in_init(err.value) is None
