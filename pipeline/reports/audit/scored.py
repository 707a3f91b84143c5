"""The sections that score images with the audit's logistic head fitted on train: calibration (ECE,
reliability, temperature fitted on val) and unknown-image rejection (scores, threshold on val)."""

from __future__ import annotations

import os

import numpy as np
from threadpoolctl import threadpool_limits

from pipeline.reports.audit import Skipped, calibration, labels, openset, plots
from pipeline.reports.audit.sections import write_csv


def fit_head(ctx) -> dict:
    """{split: probabilities (N, classes)} of val/test (and train) from the logistic head fitted on train,
    fitted once per audit."""
    if ctx.probs is None:
        train = ctx.split("train")
        if train is None or len(np.unique(train.labels)) < 2:
            raise Skipped("needs a train split with at least two classes")
        model = labels.logistic(ctx.cfg.head_seed)
        with threadpool_limits(1, user_api="blas"):
            model.fit(train.features, train.labels)
        classes = model.classes_
        ctx.probs = {}
        for s in ("train", "val", "test"):
            if (sp := ctx.split(s)) is not None:
                p = np.full((len(sp.labels), len(ctx.names)), 1e-12)
                p[:, classes] = model.predict_proba(sp.features)
                ctx.probs[s] = p / p.sum(axis=1, keepdims=True)
    return ctx.probs


def calibrate(ctx, sec) -> dict:
    probs = fit_head(ctx)
    if "val" not in probs:
        raise Skipped("needs a val split to fit the temperature on")
    t = calibration.fit_temperature(probs["val"], ctx.split("val").labels)
    ctx.temperature = t
    table, curves, out = [], {}, {"temperature": t}
    for s in ("val", "test"):
        if s not in probs:
            continue
        y, before = ctx.split(s).labels, probs[s]
        after = calibration.scaled(before, t)
        row = {"split": s, "accuracy": float((before.argmax(1) == y).mean()),
               "nll_before": calibration.nll(before, y), "nll_after": calibration.nll(after, y),
               "ece_before": calibration.ece(before, y), "ece_after": calibration.ece(after, y)}
        out[s] = row
        table.append(tuple(row.values()))
        curves = {"before": calibration.reliability(before, y), f"after (T={t:.2f})": calibration.reliability(after, y)}
        shown = s
    sec.text(f"Logistic head fitted on train; temperature T = {t:.3f} fitted on val (T > 1: the head was "
             f"over-confident, T < 1: under-confident). ECE over {calibration.BINS} equal-width bins; the "
             "reliability diagram is on the " + shown + " split.")
    sec.table(("split", "accuracy", "NLL before", "NLL after", "ECE before", "ECE after"), table)
    sec.figure(plots.reliability(curves, f"reliability on {shown}"), f"reliability diagram on {shown}")
    last = out[shown]
    ctx.log(f"calibration: T={t:.3f}; {shown} NLL {last['nll_before']:.4f} -> {last['nll_after']:.4f}, "
            f"ECE {last['ece_before']:.4f} -> {last['ece_after']:.4f}")
    return out


def unknown(ctx, sec) -> dict:
    probs, train, cfg = fit_head(ctx), ctx.split("train"), ctx.cfg
    if "val" not in probs:
        raise Skipped("needs a val split to choose the threshold on")
    t = ctx.temperature or 1.0
    density = openset.train_density(train.features, cfg.neighbours)
    gaussians = openset.fit_gaussians(train.features, train.labels)
    raw = {s: openset.raw_scores(calibration.scaled(probs[s], t), ctx.split(s).features, train.features, gaussians,
                                 cfg.neighbours, density) for s in ("val", "test") if s in probs}
    stats = openset.standardiser(raw["val"])
    score = {s: openset.combined(r, stats) for s, r in raw.items()}
    threshold = openset.choose_threshold(score["val"], cfg.reject_recall)
    rate = {s: float(openset.rejected(v, threshold).mean()) for s, v in score.items()}
    rows = [{"split": s, "path": str(p), "label": ctx.names[y], "max_probability": float(raw[s]["max_probability"][i]),
             "train_similarity": float(raw[s]["train_similarity"][i]),
             "relative_similarity": float(raw[s]["relative_similarity"][i]),
             "relative_mahalanobis": float(raw[s]["relative_mahalanobis"][i]), "score": float(score[s][i]),
             "rejected": bool(score[s][i] < threshold)}
            for s in score for i, (p, y) in enumerate(zip(ctx.split(s).paths, ctx.split(s).labels))]
    rows.sort(key=lambda r: r["score"])
    path = os.path.join(ctx.out, "unknown_scores.csv")
    write_csv(path, ("split", "path", "label", "max_probability", "train_similarity", "relative_similarity",
                     "relative_mahalanobis", "score", "rejected"), rows)
    w = openset.WEIGHTS
    sec.text(f"Score of each image (higher = more like the known classes): {w['max_probability']:g} x its max "
             f"calibrated probability + {w['relative_similarity']:g} x its mean cosine similarity to its "
             f"{cfg.neighbours} nearest train images minus those train images' own mean similarity to their nearest "
             f"train images (how far it sits outside their neighbourhood) + {w['relative_mahalanobis']:g} x minus "
             "its relative Mahalanobis distance (to the nearest class Gaussian, less that to the Gaussian of all "
             f"train images), each standardised on val. Threshold {threshold:.4f} keeps {cfg.reject_recall:.0%} of "
             "the known val images; below it an image would be labelled unknown. "
             + ", ".join(f"{s}: {rate[s]:.1%} rejected" for s in rate) + ". Scores: unknown_scores.csv.")
    sec.figure(plots.histograms(score, threshold, "combined score"), "score histograms with the threshold")
    sec.table(("", "split", "path", "label", "max probability", "train similarity", "relative similarity",
               "relative Mahalanobis", "score"),
              [(ctx.thumb(r["path"]), r["split"], r["path"], r["label"], r["max_probability"], r["train_similarity"],
                r["relative_similarity"], r["relative_mahalanobis"], r["score"]) for r in rows[:cfg.show]])
    ctx.log(f"unknown images: threshold {threshold:.4f} (val recall {cfg.reject_recall:g}); "
            + ", ".join(f"{s} {rate[s]:.1%} rejected" for s in rate))
    return {"threshold": threshold, "temperature": t, "standardiser": stats, "rejected": rate, "csv": path}
