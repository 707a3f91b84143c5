"""``predict``: label image files and folders with any model this program saves or exports (see
:mod:`pipeline.serve`), the model loaded only after its record checks out."""

from __future__ import annotations

import csv
import os
import shlex
import sys

import numpy as np

from pipeline import records
from pipeline.configs import PredictConfig
from pipeline.data import images
from pipeline.data import loading
from pipeline.errors import PipelineError
from pipeline.serve.runner import Runner
from pipeline.serve.find import open_model

# --- labelling files ------------------------------------------------------------------------------------------

def image_paths(specs) -> tuple[list[str], list[tuple[str, str]], int]:
    """(files, problems, ignored) of the given files and folders: a folder gives its image files (recursively,
    links followed, hidden ones and other extensions ignored); a named file is always tried; a missing path is
    a problem. Each real file is listed once and no folder walked twice (a link loop ends there)."""
    files, problems, ignored = [], [], 0
    seen, walked = set(), set()  # real paths of files listed; (st_dev, st_ino) of folders walked
    exts = tuple("." + e for e in images.IMAGE_EXTENSIONS)

    def first(path):
        real = os.path.realpath(path)
        if real in seen:
            return False
        seen.add(real)
        return True

    def fresh(folder, top=""):
        """Mark a folder walked; False if it was, or if it holds ``top`` (a link up: a loop)."""
        try:
            st = os.stat(folder)
        except OSError:
            return True
        if (st.st_dev, st.st_ino) in walked or top.startswith(os.path.realpath(folder).rstrip(os.sep) + os.sep):
            return False
        walked.add((st.st_dev, st.st_ino))
        return True

    for spec in specs:
        if os.path.isdir(spec):
            if not fresh(spec):
                continue
            top = os.path.realpath(spec) + os.sep
            for dirpath, dirnames, filenames in os.walk(spec, followlinks=True):
                dirnames[:] = [d for d in sorted(dirnames)
                               if not images.is_hidden(d) and fresh(os.path.join(dirpath, d), top)]
                for name in sorted(filenames):
                    if images.is_hidden(name) or not name.lower().endswith(exts):
                        ignored += 1
                        continue
                    path = os.path.join(dirpath, name)
                    if first(path):
                        files.append(path)
        elif os.path.exists(spec):
            if first(spec):
                files.append(spec)
        else:
            problems.append((spec, "no such file or folder"))
    return files, problems, ignored


def split_images(text: str) -> list[str]:
    """``IMAGES``: one existing path as it is, else shell-style words (quote paths with spaces)."""
    text = text.strip()
    if not text:
        return []
    if os.path.exists(text):
        return [text]
    try:
        return shlex.split(text)
    except ValueError as e:
        raise PipelineError(f"IMAGES={text!r}: {e}") from None


def decode_batches(files, size, interpolation="bilinear", batch=32, max_pixels=images.MAX_PIXELS):
    """Yield (paths, uint8 pixels, problems) per batch of ``files``, decoded ahead in threads as extraction
    decodes (:class:`pipeline.data.loading.Batches`; whole image to size x size, ``interpolation``); an
    unreadable file is a (path, reason) problem."""
    failed = {}

    def load(path):
        try:
            return images.load_resized(path, size, interpolation, max_pixels)
        except images.BadImage as e:
            failed[path] = str(e)
            return np.zeros((size, size, 3), np.uint8)

    todo = [(start, files[start:start + batch]) for start in range(0, len(files), batch)]
    with loading.Batches(load, todo, (size, size, 3)) as stream:
        for start, pixels in stream:
            chunk = files[start:start + batch]
            keep = [j for j, path in enumerate(chunk) if path not in failed]
            yield ([chunk[j] for j in keep], pixels[keep] if keep else None,
                   [(path, failed[path]) for path in chunk if path in failed])


def runner_batches(runner: Runner, files, batch=32):
    """:func:`decode_batches` of ``files`` for ``runner``: at its size, or (``runner.sizes``, a feature ensemble)
    decoded at each member size, the pixels a list of one batch per member; a file one size cannot read is
    left out of every one."""
    if not runner.sizes:
        yield from decode_batches(files, runner.size, runner.interpolation, batch, runner.max_pixels)
        return
    distinct = sorted(set(runner.sizes))
    streams = [decode_batches(files, s, runner.interpolation, batch, runner.max_pixels) for s in distinct]
    for parts in zip(*streams):
        bad = dict(p for _, _, problems in parts for p in problems)
        by_size = {}
        for s, (good, pixels, _) in zip(distinct, parts):
            keep = [j for j, path in enumerate(good) if path not in bad]
            by_size[s] = pixels[keep] if keep else None
        good = [path for path in parts[0][0] if path not in bad]
        yield good, ([by_size[s] for s in runner.sizes] if good else None), list(bad.items())


def label(runner: Runner, files, top_k=3, batch=32):
    """(results, problems): per readable file {"path", "top": [(class, score), ...]} in input order, and
    ``"unknown"`` (true when its maximum probability is below the record's threshold) when the model has one;
    per unreadable file (path, reason)."""
    classes = runner.classes
    k = max(1, min(top_k, len(classes)))
    results, problems = [], []
    for good, pixels, bad in runner_batches(runner, files, batch):
        problems += bad
        if not good:
            continue
        scores = runner.scores(pixels)
        unknown = runner.unknown(scores)
        for j, (path, row) in enumerate(zip(good, scores)):
            order = np.argsort(-row, kind="stable")[:k]
            results.append({"path": path, "top": [(classes[i], float(row[i])) for i in order],
                            **({"unknown": bool(unknown[j])} if unknown is not None else {})})
    return results, problems


def write_output(path, results, problems, output="probability") -> None:
    """``OUTPUT``: JSON when it ends in .json, else TSV (csv-quoted, so a tab, newline or quote in a path keeps
    its row), written atomically. ``output``: what the numbers are (probability, or score for decision values).
    With a threshold, each prediction says ``unknown`` (JSON true/false; a TSV column, ``unknown`` or empty)."""
    if path.lower().endswith(".json"):
        records.write_json(path, {"predictions": [{"path": r["path"], "top": [{"label": c, output: p}
                                                                              for c, p in r["top"]],
                                                   **({"unknown": r["unknown"]} if "unknown" in r else {})}
                                                  for r in results],
                                  "unreadable": [{"path": p, "reason": why} for p, why in problems]})
        return
    k = max((len(r["top"]) for r in results), default=0)
    flag = any("unknown" in r for r in results)
    head = ["path"] + [f"{x}_{i}" for i in range(1, k + 1) for x in ("label", output)] + ["unknown"] * flag + ["error"]
    rows = [head]
    for r in results:
        said = ["unknown" if r.get("unknown") else ""] * flag
        rows.append([r["path"], *[f"{v}" for c, p in r["top"] for v in (c, f"{p:.6f}")], *said, ""])
    for p, why in problems:
        rows.append([p] + [""] * (2 * k + flag) + [why])
    with records.atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            csv.writer(f, delimiter="\t").writerows(rows)  # \r\n rows: a \r in a path is quoted too


def describe(runner: Runner) -> str:
    if runner.kind == "export":
        return f"{runner.path} ({runner.record['export_format']} export, {runner.record.get('runtime', {}).get('name')})"
    if runner.kind in ("dense", "sklearn"):
        return f"{runner.path} ({runner.record.get('head')} head on {runner.source.get('backbone')} features)"
    return runner.path


def run(cfg: PredictConfig, extra=None, log=print, err=None) -> int:
    """The ``predict`` step: prints the top-k labels of every readable image; unreadable ones are reported
    (on stderr) and the rest still labelled. Exit status 0, or 1 when some input could not be labelled."""
    err = err or (lambda m: print(m, file=sys.stderr))
    specs = split_images(cfg.images)
    if not specs:
        raise PipelineError("no images given: make predict IMAGES='photo.jpg folder/' or "
                            "python -m pipeline predict PATH...")
    if cfg.top_k < 1 or cfg.batch < 1:
        raise PipelineError("TOP_K and BATCH must be positive")
    if cfg.output:
        records.writable_file(cfg.output, "OUTPUT")  # before any image is labelled
    files, problems, ignored = image_paths(specs)
    if not files:
        for p, why in problems:
            err(f"skipped {p}: {why}")
        raise PipelineError(f"no image files in {', '.join(specs)}")
    runner = open_model(cfg.model, cfg.models_dir, log=err)
    for note in runner.notes:
        err(f"note: {note}")
    results, bad = label(runner, files, cfg.top_k, cfg.batch)
    problems += bad
    width = max(len(r["path"]) for r in results) if results else 0
    for r in results:
        log(f"{r['path']:<{width}}  " + "  ".join(f"{c} {p:.3f}" for c, p in r["top"])
            + ("  unknown" if r.get("unknown") else ""))
    for p, why in problems:
        err(f"skipped {p}: {why}")
    if cfg.output:
        write_output(cfg.output, results, problems, runner.output)
    note = f", {ignored} non-image file(s) ignored" if ignored else ""
    if runner.reject_threshold is not None and runner.output == "probability":
        note += (f"; {sum(r['unknown'] for r in results)} unknown (max probability below "
                 f"{runner.reject_threshold:.3f})")
    if runner.temperature is not None:
        note += f"; probabilities at temperature {runner.temperature:.3f}"
    what = "" if runner.output == "probability" else " (decision values, not probabilities)"
    err(f"labelled {len(results)} image(s) with {describe(runner)}{what}{note}"
        + (f"; {len(problems)} could not be read" if problems else ""))
    return 1 if problems else 0
