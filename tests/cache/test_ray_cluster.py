"""ENGINE=ray on a real cluster joined by RAY_ADDRESS: a head and a second node started with `ray start` (separate
processes, one CPU each, their state in a temp folder), `python -m pipeline features ENGINE=ray RAY_ADDRESS=...`
makes the in-process cache bit for bit, and again with the second node killed mid-shard (its raylet and workers,
by PID); a RAY_ADDRESS with nothing listening fails in one line within seconds."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from conftest import ROOT, make_tree

ray = pytest.importorskip("ray")

from pipeline.cache import ray_actor  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from test_ray import OPTIONS, PINNED, _done, assert_same, in_process  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
TAG = "PIPELINE_TEST_RAY_NODE"  # set in each `ray start`'s environment: how the test finds a node's processes
NODE = ["--num-cpus=1", "--num-gpus=0", "--disable-usage-stats", f"--object-store-memory={100 << 20}"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_pids(tag):
    """The processes of the node started with ``TAG=tag`` (its raylet, agents and workers inherit it)."""
    want, pids = f"{TAG}={tag}".encode(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if want in f.read().split(b"\0"):
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


def state_pids(state):
    """The processes with a file open under ``state`` (the cluster's logs: its agents set their title over their
    environment, so :func:`node_pids` misses them)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith(state) for fd in os.listdir(f"/proc/{pid}/fd")):
                pids.append(int(pid))
        except OSError:
            continue
    return pids


def holder(pids, suffix):
    """(pid, path) of a process among ``pids`` holding a file whose name ends with ``suffix``, or None."""
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                path = os.readlink(f"/proc/{pid}/fd/{fd}")
                if path.endswith(suffix):
                    return pid, path
        except OSError:
            continue
    return None


def kill_node_mid_shard(tag, rows, seconds=240):
    """A thread that, once a process of node ``tag`` holds a shard's partial file, stops it (SIGSTOP) and lets
    it run a millisecond at a time until ``rows`` rows are on disk, then SIGKILLs every process of the node;
    ``.result`` is what it did."""
    def watch():
        deadline = time.time() + seconds
        while time.time() < deadline:
            found = holder(node_pids(tag), ".h5.partial")
            if found is None:
                time.sleep(0.005)
                continue
            pid, path = found
            os.kill(pid, signal.SIGSTOP)
            done = _done(path)
            while time.time() < deadline and os.path.exists(path) and (done is None or done < rows):
                os.kill(pid, signal.SIGCONT)
                time.sleep(0.001)
                os.kill(pid, signal.SIGSTOP)
                done = _done(path)
            for p in node_pids(tag):
                os.kill(p, signal.SIGKILL)
            thread.result = ("killed", done, os.path.basename(path))
            return

    thread = threading.Thread(target=watch, daemon=True)
    thread.result = ("never saw a partial file on the node", None, None)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def cluster():
    """(address, env, tag of the second node) of a two-node cluster on this machine, its state in a short temp
    folder (it holds sockets); stopped after by the PIDs of its processes (`ray stop` would stop every Ray
    process of this user)."""
    state = tempfile.mkdtemp(prefix="rc", dir="/tmp") + os.sep
    port, tags = free_port(), (f"head-{os.getpid()}", f"second-{os.getpid()}")
    # no RAY_* from this process: an in-process ray.init (tests/cache/test_ray.py) leaves RAY_AUTH_MODE=token
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(state), RAY_TMPDIR=str(state), PYTHONPATH=str(ROOT), **PINNED)
    try:
        for tag, where in zip(tags, (["--head", f"--port={port}", "--include-dashboard=false"],
                                     [f"--address=127.0.0.1:{port}"])):
            p = subprocess.run([RAY, "start", *where, *NODE], env={**env, TAG: tag}, capture_output=True, text=True,
                               timeout=120)
            assert p.returncode == 0, p.stdout + p.stderr
        yield f"127.0.0.1:{port}", env, tags[1]
    finally:
        for p in {*node_pids(tags[0]), *node_pids(tags[1]), *state_pids(state)} - {os.getpid()}:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """(data, in-process cache) of a 64-image tree: five shards (train 0-16, 16-32, 32-35, val 0-14, test 0-15)."""
    root = tmp_path_factory.mktemp("clustertree")
    data = make_tree(root / "data", per_class=32)
    return data, in_process(data, root / "inprocess")


def features(address, env, data, cache):
    args = [f"{k.upper()}={v}" for k, v in {**OPTIONS, "data": data, "cache_dir": cache}.items()]
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "pipeline", "features", *args, "ENGINE=ray", f"RAY_ADDRESS={address}",
                        "WORKERS=2", "SHARD=16"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    print(p.stdout + p.stderr, f"({time.time() - t0:.1f} s)")
    assert p.returncode == 0, p.stdout + p.stderr
    return str(next(cache.glob("*.h5"))), p.stdout + p.stderr


def test_a_cluster_joined_by_address_makes_the_in_process_cache_even_when_a_node_dies(cluster, tree, tmp_path):
    address, env, second = cluster
    data, reference = tree
    path, out = features(address, env, data, tmp_path / "cache")
    assert_same(path, reference)
    assert f"ray: joined {address}: 2 CPU" in out, out
    pids = set(re.findall(r"^shard \S+: \d+ images.*\(pid (\d+) on", out, re.M))
    assert len(pids) == 2, out  # both nodes' actors extracted
    assert not list((tmp_path / "cache").glob(".ray-marker-*"))

    killer = kill_node_mid_shard(second, 8)  # the second node dies with one chunk of its shard on disk
    path, out = features(address, env, data, tmp_path / "lost")
    killer.join()
    state, done, name = killer.result
    assert state == "killed" and done >= 8, killer.result
    shard = name[:-len(".h5.partial")]
    assert re.search(rf"^ray: the actor extracting shard {shard} was lost", out, re.M), out
    assert re.search(rf"^shard {shard}: \d+ images, resumed at row {done} ", out, re.M), out
    assert_same(path, reference)


def test_a_ray_address_with_nothing_listening_fails_in_one_line_within_seconds(tmp_path):
    port = free_port()  # nothing listens on it once the probe socket is closed
    env = {**os.environ, "HOME": str(tmp_path), "RAY_TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    data = make_tree(tmp_path / "data", per_class=4)
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "pipeline", "features", f"DATA={data}", f"CACHE_DIR={tmp_path / 'c'}",
                        "BACKBONE=mobilenet_v2", "WEIGHTS=none", "SIZE=32", "ALPHA=0.35", "ENGINE=ray",
                        f"RAY_ADDRESS=127.0.0.1:{port}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=60)
    assert time.time() - t0 < 20
    assert p.returncode == 2, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and f"RAY_ADDRESS=127.0.0.1:{port}" in lines[0] and "nothing answers" in lines[0], lines


def test_a_node_that_cannot_see_the_cache_folder_or_an_image_fails_naming_the_node_and_path(tmp_path):
    """What each actor checks before a shard: the driver's marker file (its token) and the shard's first image."""
    marker = ray_actor.mark(tmp_path / "cache")
    image = make_tree(tmp_path / "data", per_class=1) / "cat" / "cat_000.jpg"
    ray_actor.check_sight(marker, str(image))  # this node sees both
    elsewhere = tmp_path / "elsewhere"
    for unseen in ((str(elsewhere / os.path.basename(marker[0])), marker[1]), (marker[0], "another run's token")):
        with pytest.raises(PipelineError) as err:
            ray_actor.check_sight(unseen, str(image))
        folder = os.path.dirname(unseen[0])
        assert re.fullmatch(rf"node \S+ cannot see the cache folder {re.escape(folder)} \(the driver's marker "
                            r"\.ray-marker-\w+ is not there\): CACHE_DIR must be on a file system every node sees, "
                            "at the same path", str(err.value)), err.value
    image.unlink()
    with pytest.raises(PipelineError, match=rf"^node \S+ cannot read the image {re.escape(str(image))} \(No such "
                                            "file or directory\\): DATA must be on a file system every node sees"):
        ray_actor.check_sight(marker, str(image))
