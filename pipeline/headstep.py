"""``head`` and ``sweep``: train heads on the feature cache, evaluate them, save them with their record.

``head`` fits one head on the train split (the dense head early-stops on val), reports val accuracy and
the full test metrics, saves the head and its reports. ``sweep`` cross-validates every head's main
regularisation on train+val, prints a leaderboard, refits the winner on train+val and reports it on test.
"""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass

import numpy as np

from pipeline import artifacts, evaluate, heads, store
from pipeline.config import FeaturesConfig, asdict, fields, opt
from pipeline.errors import PipelineError

SCORINGS = ("accuracy", "balanced_accuracy", "f1_macro", "neg_log_loss")


@dataclass(frozen=True)
class HeadConfig(FeaturesConfig):
    """Options of ``head`` and ``sweep``: the features options select the cache; the rest the head."""

    head: str = opt("logreg", "head to train (see `python -m pipeline heads`)")
    cache: str = opt("", "cache file to train on (skips resolving it from the features options)")
    extract: bool = opt(True, "make the cache when it is missing (0: fail, naming the make features command)")
    head_seed: int = opt(0, "seed of the head: initial weights, shuffling, CV folds")
    models_dir: str = opt("models", "where heads are saved (<models>/<cache>/<head>.json + model file)")
    reports_dir: str = opt("reports", "where metrics and plots go (<reports>/<cache>/<head>/)")
    heads: str = opt("all", "sweep: comma list of heads (all = every head)")
    cv: int = opt(5, "sweep: stratified folds over train+val")
    scoring: str = opt("accuracy", "sweep: " + " | ".join(SCORINGS))
    jobs: int = opt(-1, "sweep: parallel fits through joblib (-1 = every core)")


def features_config(cfg: HeadConfig) -> FeaturesConfig:
    return FeaturesConfig(**{n: getattr(cfg, n) for n in fields(FeaturesConfig)})


def features_command(fcfg: FeaturesConfig) -> str:
    """The ``make features`` command that makes the cache of ``fcfg``."""
    default = FeaturesConfig()
    args = [f"{n.upper()}={getattr(fcfg, n)}" for n in fields(FeaturesConfig)
            if getattr(fcfg, n) != getattr(default, n)]
    return " ".join(["make features"] + [shlex.quote(a) for a in args])


def resolve_cache(cfg: HeadConfig, log=print) -> str:
    """The cache file to train on: ``CACHE``, else the one of the features options — made by running
    ``features`` (a no-op when up to date), or, with ``EXTRACT=0``, an error naming the command."""
    if cfg.cache:
        if not os.path.exists(cfg.cache):
            raise PipelineError(f"{cfg.cache}: no such cache file; make it with make features")
        return cfg.cache
    from pipeline import features

    fcfg = features_config(cfg)
    if cfg.extract:
        return features.run(fcfg, log=log)
    plan = features.Plan(fcfg, log=log)
    if not plan.up_to_date():
        raise PipelineError(f"no feature cache for this configuration ({plan.path}); make it with: "
                            f"{features_command(fcfg)}")
    return plan.path


def check_splits(cache: store.Cache, needed=("train", "val", "test")) -> None:
    """Every split present and holding every class: a clear error otherwise."""
    names = cache.class_names
    for s in needed:
        if s not in cache.splits or not len(cache.splits[s].labels):
            raise PipelineError(f"{cache.path}: no {s} split; remake the cache with VAL_FRACTION and "
                                f"TEST_FRACTION above 0 (or give the tree a {s}/ folder)")
        counts = np.bincount(cache.splits[s].labels, minlength=len(names))
        absent = [names[i] for i in np.flatnonzero(counts == 0)]
        if absent:
            raise PipelineError(f"{cache.path}: class {', '.join(absent)} has no image in the {s} split; "
                                "add images or change VAL_FRACTION/TEST_FRACTION/SEED")


def _fit(name, est, X, y, validation_data=None):
    t0 = time.perf_counter()
    try:
        if validation_data is not None and isinstance(est, heads.DenseHead):
            est.fit(X, y, validation_data=validation_data)
        else:
            est.fit(X, y)
    except ValueError as e:
        raise PipelineError(f"head {name!r} cannot be fitted on this cache: {str(e).splitlines()[0]}") \
            from None
    return time.perf_counter() - t0


def measure(est, cache, split) -> dict:
    """Metrics of a fitted head on one split of the cache."""
    sp = cache.splits[split]
    return evaluate.metrics(sp.labels, est.predict(sp.features), cache.class_names, heads.scores(est, sp.features))


def finish(est, cache, cfg, name, head, params, extra, log=print, on_val=True) -> dict:
    """Evaluate on val (``on_val``: when val was not trained on) and test, write the reports and save the
    head: the paths written."""
    val = measure(est, cache, "val") if on_val else None
    if val:
        log(f"val accuracy {val['accuracy']:.4f}, balanced {val['balanced_accuracy']:.4f}")
    label = name if name == head else f"{name} ({head})"
    test = measure(est, cache, "test")
    log(evaluate.table(test, f"{label}: test split ({len(cache.splits['test'].labels)} images)"))
    stem = artifacts.cache_stem(cache.path)
    out = os.path.join(cfg.reports_dir, stem, name)
    m = {"head": head, "params": {k: artifacts.jsonable(v) for k, v in params.items()}, **extra,
         **({"val": val} if val else {}), "test": test}
    history = getattr(est, "history_", None)
    paths = evaluate.write_reports(out, m, f"{label} on {stem}", history)
    paths["record"] = artifacts.save(est, name=name, head=head, params=params, cache=cache, config=asdict(cfg),
                                     metrics=m, models_dir=cfg.models_dir, history=history)
    log(f"saved {paths['record']} and reports in {out}/")
    return paths


def run_head(cfg: HeadConfig, extra: dict | None = None, log=print) -> dict:
    """Train head ``cfg.head`` (hyper-parameters in ``extra``) on the cache; returns the written paths."""
    head = heads.get(cfg.head)
    params = head.resolve(extra)
    cache = store.load(resolve_cache(cfg, log))
    check_splits(cache)
    tr, va = cache.splits["train"], cache.splits["val"]
    est = head.build(params, seed=cfg.head_seed)
    log(f"{head.name} {head.describe(params)} on {os.path.basename(cache.path)}: train {len(tr.labels)}, "
        f"val {len(va.labels)}, test {len(cache.splits['test'].labels)} x {tr.features.shape[1]}")
    secs = _fit(head.name, est, tr.features, tr.labels, (va.features, va.labels))
    epochs = len(est.history_["loss"]) if getattr(est, "history_", None) else None
    log(f"fitted in {secs:.2f} s" + (f" ({epochs} epochs)" if epochs else ""))
    return finish(est, cache, cfg, head.name, head.name, params, {"fit_seconds": secs, "trained_on": "train"},
                  log)


def _sweep_names(text):
    if text.strip().lower() in ("all", ""):
        return list(heads.HEADS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        heads.get(n)
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
        owners = [n for n in names if key.lower() in heads.get(n).params]
        if not owners:
            valid = sorted({p.upper() for n in names for p in heads.get(n).params})
            raise PipelineError(f"no swept head ({', '.join(names)}) has parameter {key!r}; valid: "
                                f"{', '.join(valid)}")
        for n in owners:
            out[n][key.lower()] = heads.get(n).resolve({key: text})[key.lower()]
    return out


def sweep(cfg: HeadConfig, extra: dict | None = None, log=print) -> dict:
    """Cross-validated grid search of every head's main regularisation on train+val; the leaderboard,
    the winner refitted on train+val and reported on test. ``extra``: fixed hyper-parameters
    ({NAME: text}, applied to the swept heads that have them). Returns {"leaderboard", "best", "paths"}."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    names = _sweep_names(cfg.heads)
    fixed = fixed_params(names, extra)
    if cfg.scoring not in SCORINGS:
        raise PipelineError(f"unknown scoring {cfg.scoring!r}; valid: {', '.join(SCORINGS)}")
    cache = store.load(resolve_cache(cfg, log))
    check_splits(cache)
    X = np.concatenate([cache.splits["train"].features, cache.splits["val"].features])
    y = np.concatenate([cache.splits["train"].labels, cache.splits["val"].labels])
    check_folds(y, cache.class_names, cfg.cv)
    folds = StratifiedKFold(cfg.cv, shuffle=True, random_state=cfg.head_seed)
    log(f"sweep over {', '.join(names)}: {cfg.cv}-fold CV on train+val ({len(y)} x {X.shape[1]}), "
        f"scoring {cfg.scoring}, jobs {cfg.jobs}")
    board = []
    for name in names:
        head = heads.get(name)
        back = {p.target: n for n, p in head.params.items()}
        grid = {k: v for k, v in head.search_grid().items() if back[k] not in fixed[name]}
        search = GridSearchCV(head.build(fixed[name], seed=cfg.head_seed), grid, scoring=cfg.scoring,
                              cv=folds, n_jobs=cfg.jobs, refit=False, error_score=np.nan)
        t0 = time.perf_counter()
        search.fit(X, y)
        r = search.cv_results_
        rows = [{"params": {back[k]: artifacts.jsonable(v) for k, v in p.items()},
                 "mean": float(m), "std": float(s), "fit_seconds": float(f)}
                for p, m, s, f in zip(r["params"], r["mean_test_score"], r["std_test_score"], r["mean_fit_time"])]
        ok = [row for row in rows if np.isfinite(row["mean"])]
        if not ok:
            log(f"{name}: every fit failed on this data; left out")
            continue
        best = max(ok, key=lambda row: row["mean"])  # first of equals: grids run from strong regularisation
        best = {**best, "params": {**{k: artifacts.jsonable(v) for k, v in fixed[name].items()}, **best["params"]}}
        board.append({"head": name, **best, "seconds": time.perf_counter() - t0, "candidates": rows})
        log(f"  {name:<14} {best['mean']:.4f} ± {best['std']:.4f}  {head.describe(best['params'])}")
    if not board:
        raise PipelineError("sweep: no head could be fitted on this cache")
    board.sort(key=lambda row: -row["mean"])
    log(leaderboard(board, cfg.scoring))
    win = board[0]
    head = heads.get(win["head"])
    params = head.resolve(win["params"])
    est = head.build(params, seed=cfg.head_seed)
    log(f"best: {win['head']} {head.describe(params)}; refitting on train+val")
    secs = _fit(win["head"], est, X, y)
    stem = artifacts.cache_stem(cache.path)
    lb_path = os.path.join(cfg.reports_dir, stem, "sweep", "leaderboard.json")
    evaluate.write_json(lb_path, {"scoring": cfg.scoring, "cv": cfg.cv, "seed": cfg.head_seed,
                                  "leaderboard": board})
    paths = finish(est, cache, cfg, "best", win["head"], params,
                   {"fit_seconds": secs, "cv_score": win["mean"], "cv_std": win["std"], "scoring": cfg.scoring,
                    "trained_on": "train+val"}, log, on_val=False)
    paths["leaderboard"] = lb_path
    return {"leaderboard": board, "best": win, "paths": paths, "estimator": est}


def leaderboard(board, scoring) -> str:
    """Rank, head, mean CV score of its best candidate, its spread over folds, its mean fit time, the
    wall time of the head's whole search, its best parameters."""
    lines = [f"{'rank':<5}{'head':<15}{scoring + ' (cv)':>18}{'± std':>9}{'fit s':>8}{'search s':>10}  "
             "best parameters"]
    for i, row in enumerate(board, 1):
        lines.append(f"{i:<5}{row['head']:<15}{row['mean']:>18.4f}{row['std']:>9.4f}{row['fit_seconds']:>8.2f}"
                     f"{row['seconds']:>10.1f}  {heads.get(row['head']).describe(row['params'])}")
    return "\n".join(lines)


def list_heads() -> str:
    lines = []
    for h in heads.HEADS.values():
        lines.append(f"{h.name}  ({h.kind}{', class weights' if h.class_weights else ''}): {h.help}")
        for n, p in h.params.items():
            grid = f"  sweep: {', '.join(map(heads._show, h.grid[n]))}" if n in h.grid else ""
            lines.append(f"    {n.upper():<20} {heads._show(p.default):<10} {p.help}{grid}")
    return "\n".join(lines)
