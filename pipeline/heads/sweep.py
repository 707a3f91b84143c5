"""``sweep``: cross-validate every head's main regularisation on train+val, print a leaderboard, refit the
winner on train+val and report it on test."""

from __future__ import annotations

import csv
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold, StratifiedKFold

from pipeline import records
from pipeline.cache import lazy, resolve
from pipeline.cache.resolve import load_cache
from pipeline.configs import SCORINGS, HeadConfig
from pipeline.errors import PipelineError
from pipeline.heads import artifacts, registry
from pipeline.reports import evaluate
from pipeline.heads.train import check_outputs, check_splits, finish, fit, views_of


def sweep_names(text):
    if text.strip().lower() in ("all", ""):
        return list(registry.HEADS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        registry.get(n)
    return names


def check_folds(y, class_names, cv):
    if cv < 2:
        raise PipelineError(f"CV={cv}: need at least 2 folds")
    counts = np.bincount(y, minlength=len(class_names))
    few = [f"{class_names[i]} ({c})" for i, c in enumerate(counts) if c < cv]
    if few:
        raise PipelineError(f"fewer images than CV={cv} folds in train+val for class {', '.join(few)}; "
                            "lower CV or add images")


def fixed_params(names, extra) -> dict:
    """{head: {param: value}} of the free NAME=value options of a sweep: each applies to every swept head
    that has it (and then replaces that head's grid for it); one that no swept head has is an error."""
    out = {n: {} for n in names}
    for key, text in (extra or {}).items():
        owners = [n for n in names if key.lower() in registry.get(n).params]
        if not owners:
            valid = sorted({p.upper() for n in names for p in registry.get(n).params})
            raise PipelineError(f"no swept head ({', '.join(names)}) has parameter {key!r}; valid: "
                                f"{', '.join(valid)}")
        for n in owners:
            out[n][key.lower()] = registry.get(n).resolve({key: text})[key.lower()]
    return out


def cv_data(cache, cfg, log=print):
    """(X, y, folds, views) of the sweep's CV on train+val: the train views (VIEWS) appended after the clean
    rows, folds grouped by image then."""
    check_folds(np.concatenate([cache.splits["train"].labels, cache.splits["val"].labels]), cache.class_names,
                cfg.cv)
    X, y = train_val(cache, cfg, log)
    views = views_of(cache, cfg) if not lazy.is_lazy(cache) else None
    folds = StratifiedKFold(cfg.cv, shuffle=True, random_state=cfg.head_seed)
    if views is not None:  # an image's views go with it: never in the fit and the validation fold at once
        folds = grouped_folds(y, views.image, cfg.cv, cfg.head_seed)
        X, y = np.concatenate([X, views.features]), np.concatenate([y, views.labels])
    return X, y, folds, views


def sweep(cfg: HeadConfig, extra: dict | None = None, log=print) -> dict:
    """Cross-validated grid search of every head's main regularisation on train+val; the leaderboard,
    the winner refitted on train+val and reported on test. ``extra``: fixed hyper-parameters
    ({NAME: text}, applied to the swept heads that have them). Returns {"leaderboard", "best", "paths"}."""
    names = sweep_names(cfg.heads)
    fixed = fixed_params(names, extra)
    if cfg.scoring not in SCORINGS:
        raise PipelineError(f"unknown scoring {cfg.scoring!r}; valid: {', '.join(SCORINGS)}")
    check_outputs(cfg)
    cache = load_cache(cfg, log)
    check_splits(cache)
    X, y, folds, views = cv_data(cache, cfg, log)
    with_views = f" + {len(views.labels)} train views, grouped by image" if views is not None else ""
    log(f"sweep over {', '.join(names)}: {cfg.cv}-fold CV on train+val ({len(y)} x {X.shape[1]}{with_views}), "
        f"scoring {cfg.scoring}, jobs {cfg.jobs}")

    def search(name):
        return search_head(name, cfg, fixed[name], X, y, folds, log)

    board = [row for row in overlapped(search, names, cfg.jobs) if row is not None]
    if not board:
        raise PipelineError("sweep: no head could be fitted on this cache")
    board.sort(key=lambda row: -row["mean"])
    log(leaderboard(board, cfg.scoring))
    win = board[0]
    head = registry.get(win["head"])
    params = head.resolve(win["params"])
    est = head.build(params, seed=cfg.head_seed)
    log(f"best: {win['head']} {head.describe(params)}; refitting on train+val")
    secs = fit(win["head"], est, X, y)
    stem = resolve.stem(cache.path)
    lb_path = os.path.join(cfg.reports_dir, stem, "sweep", "leaderboard.json")
    evaluate.write_json(lb_path, {"scoring": cfg.scoring, "cv": cfg.cv, "seed": cfg.head_seed,
                                  "leaderboard": board})
    write_csv(lb_path[:-len(".json")] + ".csv", board, cfg.scoring)
    paths = finish(est, cache, cfg, "best", win["head"], params,
                   {"fit_seconds": secs, "cv_score": win["mean"], "cv_std": win["std"], "scoring": cfg.scoring,
                    "trained_on": "train+val" if not lazy.is_lazy(cache) else f"train+val sample of {len(y)} rows"},
                   log, on_val=False)
    paths["leaderboard"] = lb_path
    log(f"leaderboard in {lb_path} and .csv")
    return {"leaderboard": board, "best": win, "paths": paths, "estimator": est}


def train_val(cache, cfg, log=print):
    """(features, labels) of train+val. Past MEMORY_BUDGET (lazy rows): a stratified sample, seeded by
    HEAD_SEED, of the rows whose float64 copy takes half the budget (the other half: the folds' copies), read
    from the file in order and said in one line; the train views are left out."""
    tr, va = cache.splits["train"], cache.splits["val"]
    y = np.concatenate([tr.labels, va.labels])
    if not lazy.is_lazy(cache):
        return np.concatenate([tr.features, va.features]), y
    cap = max(1, lazy.parse_budget(cfg.memory_budget) // (2 * 8 * tr.features.shape[1]))
    keep = stratified_sample(y, cap, cfg.head_seed, cfg.cv)
    n = len(tr.labels)
    X = np.concatenate([tr.features[keep[keep < n]], va.features[keep[keep >= n] - n]])
    log(f"sweep: {os.path.basename(cache.path)} is past MEMORY_BUDGET={cfg.memory_budget}: cross-validating on "
        f"a stratified sample of {len(keep)} of {len(y)} train+val rows (HEAD_SEED={cfg.head_seed}"
        f"{', train views left out' if cache.views is not None else ''})")
    return X, y[keep]


def stratified_sample(y, cap, seed, least=1) -> np.ndarray:
    """Sorted indices of about ``cap`` rows of ``y`` (all of them when ``cap`` >= len(y)): each class its
    share, at least ``least`` rows (or all it has), drawn with ``seed``."""
    if cap >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    take = np.maximum(np.minimum(counts, least), np.floor(counts * cap / len(y)).astype(int))
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(y == c), k, replace=False)
                                   for c, k in zip(classes, take)]))


def search_head(name, cfg, fixed, X, y, folds, log):
    """One head's cross-validated grid search: its best row (with every candidate) or None when every fit
    failed. ``fixed``: the hyper-parameters not searched."""
    head = registry.get(name)
    back = {p.target: n for n, p in head.params.items()}
    grid = {k: v for k, v in head.search_grid().items() if back[k] not in fixed}
    # the Keras head's folds run in this process: a joblib worker would import TensorFlow (seconds, noise)
    jobs = 1 if head.kind == "keras" else cfg.jobs
    gs = GridSearchCV(head.build(fixed, seed=cfg.head_seed), grid, scoring=cfg.scoring,
                      cv=folds, n_jobs=jobs, refit=False, error_score=np.nan)
    t0 = time.perf_counter()
    gs.fit(X, y)
    r = gs.cv_results_
    rows = [{"params": {back[k]: artifacts.jsonable(v) for k, v in p.items()},
             "mean": float(m), "std": float(s), "fit_seconds": float(f)}
            for p, m, s, f in zip(r["params"], r["mean_test_score"], r["std_test_score"], r["mean_fit_time"])]
    ok = [row for row in rows if np.isfinite(row["mean"])]
    if not ok:
        log(f"{name}: every fit failed on this data; left out")
        return None
    best = max(ok, key=lambda row: row["mean"])  # first of equals: grids run from strong regularisation
    best = {**best, "params": {**{k: artifacts.jsonable(v) for k, v in fixed.items()}, **best["params"]}}
    log(f"  {name:<14} {best['mean']:.4f} ± {best['std']:.4f}  {head.describe(best['params'])}")
    return {"head": name, **best, "seconds": time.perf_counter() - t0, "candidates": rows}


def overlapped(search, names, jobs) -> list:
    """``search(name)`` of every head, in order of ``names``. The Keras heads' searches (one process, mostly
    one core) run in a thread beside the scikit-learn heads' (joblib workers) when those use more than one
    job, so the two kinds share the cores instead of waiting for each other."""
    keras_names = [n for n in names if registry.get(n).kind == "keras"]
    if jobs == 1 or not keras_names or len(keras_names) == len(names):
        return [search(n) for n in names]
    with ThreadPoolExecutor(1, thread_name_prefix="keras-heads") as pool:
        pending = pool.submit(lambda: {n: search(n) for n in keras_names})
        rows = {n: search(n) for n in names if n not in keras_names}
        rows.update(pending.result())
    return [rows[n] for n in names]


def leaderboard(board, scoring) -> str:
    """Rank, head, mean CV score of its best candidate, its spread over folds, its mean fit time, the
    wall time of the head's whole search, its best parameters."""
    lines = [f"{'rank':<5}{'head':<15}{scoring + ' (cv)':>18}{'± std':>9}{'fit s':>8}{'search s':>10}  "
             "best parameters"]
    for i, row in enumerate(board, 1):
        lines.append(f"{i:<5}{row['head']:<15}{row['mean']:>18.4f}{row['std']:>9.4f}{row['fit_seconds']:>8.2f}"
                     f"{row['seconds']:>10.1f}  {registry.get(row['head']).describe(row['params'])}")
    return "\n".join(lines)


def step(cfg: HeadConfig, extra: dict | None = None) -> None:
    """The ``sweep`` step."""
    sweep(cfg, extra)


def write_csv(path, board, scoring) -> None:
    """The leaderboard as CSV, one row per head (its best candidate), atomically."""
    with records.atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["rank", "head", f"{scoring}_cv", "std", "fit_seconds", "search_seconds", "params"])
            for i, row in enumerate(board, 1):
                w.writerow([i, row["head"], f"{row['mean']:.6f}", f"{row['std']:.6f}", f"{row['fit_seconds']:.3f}",
                            f"{row['seconds']:.2f}", registry.get(row["head"]).describe(row["params"])])


def grouped_folds(y_clean, view_image, cv, seed) -> list:
    """CV folds over the clean train+val rows (``y_clean``) followed by the train views (``view_image``: the
    clean row of each): the folds of StratifiedGroupKFold over the images; each fold fits on its images' clean
    rows and views and validates on the clean rows of the others only."""
    n = len(y_clean)
    groups = np.arange(n)
    rows_of = {}
    for r, img in enumerate(view_image):
        rows_of.setdefault(int(img), []).append(n + r)
    out = []
    for fit_rows, val_rows in StratifiedGroupKFold(cv, shuffle=True, random_state=seed).split(
            np.zeros(n), y_clean, groups):
        extra = [r for img in fit_rows for r in rows_of.get(int(img), ())]
        out.append((np.concatenate([fit_rows, np.asarray(extra, dtype=int)]), val_rows))
    return out
