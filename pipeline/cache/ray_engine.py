"""``ENGINE=ray``: one cache extracted in shards over a Ray cluster's extractor actors (one per GPU).

The driver plans the cache exactly as the in-process engine does (same key, groups, order) and cuts each
group (the splits, and the views and TTA groups: :mod:`pipeline.cache.groups`) into shards of rows
[start, stop), ``SHARD`` rows rounded up to a multiple of CHUNK (itself a multiple of BATCH), so every batch
holds the rows it holds in-process and the features are the same bytes. Extractor actors
(:mod:`pipeline.cache.ray_actor`; ``num_gpus=1`` each where the cluster has GPUs, else a share of its CPUs)
run the engine (:mod:`pipeline.cache.engine`) on each shard's group cut to its rows, writing it to
``<stem>.shards/<group>-<start>-<stop>.h5`` (:mod:`pipeline.cache.shards`; partial file flushed per chunk,
resumed, verified, renamed), once they have checked that their node sees the driver's marker file in
CACHE_DIR and the shard's first image (else one line naming the node and the path). A shard whose actor
dies (its process or its node) goes back in the queue, resuming from its partial file, and a replacement
actor starts. The driver submits only shards without a file, then concatenates them (rows an earlier cache
lends come from it: :mod:`pipeline.cache.reuse`) into ``<stem>.h5.partial`` through the Writer, verifies and
renames it and removes the shard folder; a missing or damaged shard file refuses in one line naming it.
DATA, CACHE_DIR and WEIGHTS must be shared by every node at the same paths: see docs/scale-out.md.
Ray is imported lazily (an optional extra): the module loads without it."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from collections import Counter, deque

import numpy as np

from pipeline.cache import engine, groups, reuse
from pipeline.cache.ray_actor import Extractor, mark, part, raised_in_init
from pipeline.cache.shards import SHARDS, read_shard, shard_rows, shards
from pipeline.cache.writer import Writer
from pipeline.data.check import CheckMemo
from pipeline.data.loading import cores
from pipeline.errors import PipelineError
from pipeline.memo import NAME as MEMO

PASSED_ENV = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "TF_CPP_MIN_LOG_LEVEL", "PIPELINE_TF_LOGS",
              "TF_DETERMINISTIC_OPS", "KERAS_HOME")  # handed to the actors as they are in the driver
CPUS_PER_ACTOR = 4  # WORKERS=0 on a cluster without GPUs: one actor per this many CPUs
RESTARTS = 3  # a shard whose actor dies is retried this often (on another actor), then the run fails
PROBE_S = 5  # RAY_ADDRESS=host:port: seconds to wait for it to accept a connection before ray.init
START_S = 600  # seconds to wait for a replacement actor when no other actor is working
LOCAL_OBJECT_STORE = 256 << 20  # a local cluster's object store: it carries the dataset's manifest, not pixels


def _ray():
    try:
        import ray
    except ImportError:
        raise PipelineError("ENGINE=ray needs Ray: pip install -e '.[ray]' (or ENGINE=inprocess)") from None
    return ray


def _probe(address):
    """A one-line error unless ``address`` (host:port, ray://host:port; not auto) accepts a connection within
    PROBE_S s: ray.init retries an address with nothing listening for minutes."""
    if address == "auto":
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise PipelineError(f"RAY_ADDRESS={address}: expected host:port (the head's `ray start --head --port`), "
                            "auto, or empty for a local cluster")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_S).close()
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__).lower()
        raise PipelineError(f"ENGINE=ray: nothing answers at RAY_ADDRESS={address} ({why} within {PROBE_S} s); "
                            f"start the cluster there with `ray start --head --port={port}`, or leave RAY_ADDRESS "
                            "empty for a local cluster") from None


def _connect(ray, cfg, log) -> bool:
    """Join the cluster (RAY_ADDRESS, else $RAY_ADDRESS) or start a local one; True when this call started
    Ray (and so shuts it down after)."""
    if ray.is_initialized():
        return False
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or None
    quiet = dict(logging_level=logging.ERROR, log_to_driver=False)
    try:
        if address:
            _probe(address)
            ray.init(address=address, **quiet)
        else:

            ray.init(num_cpus=cores(), include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"RAY_ADDRESS={address}" if address else "a local Ray cluster"
        raise PipelineError(f"ENGINE=ray: cannot start or reach {where} ({str(e).splitlines()[0]}); start one "
                            "with `ray start --head` or leave RAY_ADDRESS empty for a local cluster") from None
    res = ray.cluster_resources()
    log(f"ray: {'joined ' + address if address else 'local cluster'}: {int(res.get('CPU', 0))} CPU, "
        f"{int(res.get('GPU', 0))} GPU")
    return True


def _actor_options(ray, cfg, jobs) -> tuple[int, dict, int]:
    """(actors, their resource options, TensorFlow/decode threads each): one per GPU where the cluster has
    GPUs (with the CPUs of a GPU node shared between its GPUs), else WORKERS (default one per 4 CPUs) with
    an equal share of the CPUs; never more actors than shards to do."""
    if cfg.workers < 0:
        raise PipelineError(f"WORKERS={cfg.workers}: must be 0 (one per GPU, else one per {CPUS_PER_ACTOR} CPUs) "
                            "or more")
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), float(res.get("CPU", 1))
    if gpus:
        n = min(cfg.workers or gpus, gpus)
        per = [node["Resources"].get("CPU", 1) / node["Resources"]["GPU"] for node in ray.nodes()
               if node.get("Alive") and node["Resources"].get("GPU")]
        share = max(1, int(min(per))) if per else 1
        opts = {"num_gpus": 1, "num_cpus": share}
    else:
        n = cfg.workers or max(1, int(cpus) // CPUS_PER_ACTOR)
        share = cpus / n
        opts = {"num_cpus": share if share < 1 else int(share)}
    n = max(1, min(n, jobs))
    return n, opts, max(1, int(share))


def _result_error(ray, e) -> PipelineError:
    cause = getattr(e, "cause", None)
    if isinstance(cause, PipelineError):
        return PipelineError(f"ENGINE=ray: {cause}")
    if isinstance(e, ray.exceptions.RayActorError):
        return PipelineError(f"ENGINE=ray: {raised_in_init(e)}" if raised_in_init(e) else "ENGINE=ray: a shard's "
                             f"extractor actor died {RESTARTS + 1} times ({str(e).splitlines()[0][:200]}); the "
                             "finished shards are kept: rerun to resume")
    text = str(cause if cause is not None else e).strip().splitlines()
    return PipelineError(f"ENGINE=ray: a shard failed: {text[-1] if text else type(e).__name__}")


def _schedule(ray, crew, start, submit, todo, log) -> list[dict]:
    """Run the shards ``todo`` on the actors ``crew``, each idle one taking the next; a shard whose actor died
    goes back in front (RESTARTS times) and ``start()`` makes a replacement, used once it answers."""
    queue, idle, running, waiting = deque(todo), list(crew), {}, {}
    lost, results, t0, total, n = Counter(), [], time.perf_counter(), sum(sh.stop - sh.start for sh in todo), 0

    def replace():
        b = start()
        waiting[b.where.remote()] = b

    while queue or running:
        while idle and queue:
            a, sh = idle.pop(0), queue.popleft()
            running[submit(a, sh)] = (a, sh)
        ready, _ = ray.wait([*running, *waiting], num_returns=1, timeout=None if running else START_S)
        if not ready:
            raise PipelineError(f"ENGINE=ray: no extractor actor could start within {START_S} s (the cluster lost "
                                "its nodes or has no free CPU/GPU); the finished shards are kept: rerun to resume")
        if ready[0] in waiting:
            a = waiting.pop(ready[0])
            try:
                log(f"ray: a replacement actor answers on {ray.get(ready[0])}")
                idle.append(a)
            except ray.exceptions.RayActorError as e:
                lost["start"] += 1
                if lost["start"] > RESTARTS or raised_in_init(e):
                    raise _result_error(ray, e) from None
                replace()
            continue
        a, sh = running.pop(ready[0])
        try:
            r = ray.get(ready[0])
        except ray.exceptions.RayActorError as e:
            lost[sh] += 1
            if lost[sh] > RESTARTS or raised_in_init(e):
                raise _result_error(ray, e) from None
            log(f"ray: the actor extracting shard {sh.name} was lost ({str(e).splitlines()[0][:200]}): "
                "the shard goes back in the queue, a replacement actor starts")
            queue.appendleft(sh)
            replace()
            continue
        except (ray.exceptions.RayError, PipelineError) as e:
            raise _result_error(ray, e) from None
        idle.append(a)
        results.append(r)
        n += sh.stop - sh.start
        more = f", resumed at row {r['resumed']}" if r["resumed"] else ""
        lent = f", {r['reused']} reused" if r["reused"] else ""
        log(f"shard {sh.name}: {r['images']} images{lent}{more} (pid {r['pid']} on {r['node']}, {r['device']}); "
            f"{n}/{total} rows, {n / max(time.perf_counter() - t0, 1e-9):.1f} rows/s")
    return results


def _run_shards(plan, todo, folder, layout_key, attrs, lender, rows, log) -> list[dict]:
    """Extract the shards ``todo`` on the cluster's actors; their results as they finish."""
    ray = _ray()
    cfg = plan.cfg
    started = _connect(ray, cfg, log)
    actors, marker = [], None
    try:
        n, opts, threads = _actor_options(ray, cfg, len(todo))
        marker = mark(cfg.cache_dir)
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        remote = ray.remote(Extractor).options(max_restarts=0, runtime_env={"env_vars": env}, **opts)
        sha, lends = plan.identity["weights"]["sha256"], (lender.path, lender.kinds) if lender is not None else None

        def start():
            actors.append(remote.remote(cfg, sha, plan.dim, plan.size, plan.chunk, threads, marker))
            return actors[-1]

        def submit(a, sh):  # the shard's rows' items, and its group cut to them (views, TTA: their transform)
            g = rows[sh.split]
            return a.extract.remote(sh, part(plan.ds, g.items[sh.start:sh.stop]), g.cut(sh.start, sh.stop),
                                    os.path.join(folder, sh.name + ".h5"), layout_key, attrs, lends)

        crew = [start() for _ in range(n)]
        where = ", ".join(f"{k}={v}" for k, v in opts.items())
        log(f"ray: {n} extractor actor(s) ({where} each) for {len(todo)} shard(s)")
        return _schedule(ray, crew, start, submit, todo, log)
    finally:
        for a in actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if marker is not None and os.path.exists(marker[0]):
            os.remove(marker[0])
        if started:
            ray.shutdown()


def _merge(plan, all_shards, rows, writer, lender, folder):
    """Concatenate the shards, in order, into the cache's partial file (rows an earlier cache lends where a
    shard had nothing to extract); a missing or damaged shard refuses, naming it. Returns the items whose
    rows came from shard files and did decode."""
    decoded = []
    layout = writer.layout
    for sh in all_shards:
        done = writer.done(sh.split)
        if sh.stop <= done:
            continue
        path = os.path.join(folder, sh.name + ".h5")
        g = rows[sh.split]
        idx, keys = g.items[sh.start:sh.stop], [g.key(plan.ds, r) for r in range(sh.start, sh.stop)]
        if os.path.exists(path):
            feats, mask = read_shard(path, plan.key, sh, layout, plan.dim)
            decoded += [i for i, m in zip(idx, mask) if not m]
        elif lender is not None and all(k in lender.rows for k in keys):
            feats, mask = lender.take(keys), np.zeros(len(idx), bool)
        else:
            raise PipelineError(f"shard {path} is missing: rerun make features to extract it")
        for c in range(max(sh.start, done), sh.stop, plan.chunk):
            e = min(c + plan.chunk, sh.stop)
            writer.write(sh.split, c, feats[c - sh.start:e - sh.start], mask[c - sh.start:e - sh.start])
    return decoded


def extract(plan) -> str:
    """Extract ``plan``'s cache over a Ray cluster: the shards without a file, then the merge."""

    cfg, ds, log = plan.cfg, plan.ds, plan.log
    t0 = time.perf_counter()
    rows = groups.of(plan)
    layout = groups.layout(ds, rows)
    all_shards = shards({g: v.items for g, v in rows.items()}, shard_rows(cfg, plan.chunk))
    folder = plan.path[:-len(".h5")] + SHARDS
    rec = plan.record()
    lender = reuse.find(plan)
    writer = Writer(plan.path, plan.key, rec, layout, plan.dim, cfg.dtype, plan.chunk, log=log)
    memo = CheckMemo(os.path.join(cfg.cache_dir, MEMO), ds.max_pixels) if ds.arrays is None else None
    try:
        have = lender.rows if lender is not None else {}
        todo, n_lent, n_left = [], 0, 0
        for sh in all_shards:
            start = max(sh.start, writer.done(sh.split))
            if start >= sh.stop:
                continue  # already in the cache's own partial file
            lent = sum(rows[sh.split].key(ds, r) in have for r in range(start, sh.stop))
            n_lent, n_left = n_lent + lent, n_left + sh.stop - start
            path = os.path.join(folder, sh.name + ".h5")
            if os.path.exists(path):
                read_shard(path, plan.key, sh, layout, plan.dim, rows=False)  # a damaged one refuses before any work
            elif lent < sh.stop - start:
                todo.append(sh)
        if lender is not None:
            log(f"reused {n_lent} rows from {os.path.basename(lender.path)}, extracting {n_left - n_lent}")
        names = ", ".join(sh.name for sh in todo[:4]) + (", ..." if len(todo) > 4 else "")
        log(f"ray: extracting {len(todo)} of {len(all_shards)} shards{' (' + names + ')' if todo else ''} "
            f"into {folder}")
        results = []
        if todo:
            os.makedirs(folder, exist_ok=True)
            results = _run_shards(plan, todo, folder, plan.key, rec, lender, rows, log)
        index = {ds.items[i].relpath: i for g in rows.values() for i in g.items}
        failed = {index[rel]: why for r in results for rel, why in r["failed"].items()}
        decoded = _merge(plan, all_shards, rows, writer, lender, folder)
        path = writer.finish()
        bad = writer.skipped_rows()
    finally:
        writer.close()
        if lender is not None:
            lender.close()
    shutil.rmtree(folder, ignore_errors=True)
    engine.settle(plan, rows, bad, failed, memo, decoded + list(failed))
    n_new = sum(r["images"] for r in results)
    engine.summary(plan, path, rows, bad, n_new, time.perf_counter() - t0, (0.0, 0))
    plan.stats["shards"] = [r["shard"].name for r in results]
    return path
