"""``audit`` (run only when SECTIONS names it): the audit's checks measured on AUDIT_DATA's cache (made or
reused by the features step in CACHE_DIR), figures as rates and ratios: planted label noise (AUDIT_NOISE of
train+val flipped, AUDIT_SEEDS seeds) for each lever of the out-of-fold probabilities; each class held out in
turn as unknown and digits among the photos (far out-of-distribution) for each rejection score; test NLL and
ECE before and after temperature scaling per head, the mean over AUDIT_SPLIT_SEEDS; planted copies of train
images found and false pairs on the clean data; the audit command's cost and whether it imported TensorFlow.


What a measurement needs (TensorFlow, Keras, the steps it runs) is imported lazily, in the function that
measures: ``make bench`` imports only the sections it runs."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time

import numpy as np

from pipeline.bench import auditparts as parts
from pipeline.bench.common import features_args, features_config, quiet, run_command, seed_list, shared_dir
from pipeline.configs import replace
from pipeline.errors import PipelineError

AUDIT_FOLDS = 5  # the audit's FOLDS default
GOALS = {"auroc": 0.99, "top_n_precision": 0.85, "recall": 0.9, "near": 0.85, "far": 0.99, "ece": 0.03}
HEADS = ("logreg", "dense")
DEFAULT = "blend (default)"
# what the audit command cannot avoid importing: the floor under its time beyond the imports
FLOOR = "import pipeline.cli, pipeline.reports.audit.step, cleanlab.count, cleanlab.rank, matplotlib.pyplot"


def check(cfg) -> None:
    seed_list(cfg.audit_split_seeds, "AUDIT_SPLIT_SEEDS")
    if cfg.audit_seeds < 1 or not 0 < cfg.audit_noise < 1 or cfg.audit_plant < 1:
        raise PipelineError(f"AUDIT_SEEDS={cfg.audit_seeds}, AUDIT_NOISE={cfg.audit_noise}, AUDIT_PLANT="
                            f"{cfg.audit_plant}: seeds >= 1, noise in (0, 1), plant >= 1")


def data_path(cfg) -> str:
    return cfg.audit_data.replace("{shared}", shared_dir())


def cost(ctx, args) -> dict:
    """``python -m pipeline audit <args>`` (``CACHE=...``, or an ensemble's features options) as a whole command (run with ``-X importtime``: its log names every
    module it imported) and the floor of the imports it cannot avoid: wall seconds, beyond the floor, TensorFlow
    imported or not."""
    log, floor_log = os.path.join(ctx.work, "audit-cost.log"), os.path.join(ctx.work, "audit-floor.log")
    floor = run_command([sys.executable, "-c", FLOOR], floor_log, "the audit's import floor")
    r = run_command([sys.executable, "-X", "importtime", "-m", "pipeline", "audit", *args,
                     f"REPORTS_DIR={os.path.join(ctx.work, 'audit-reports')}"], log, "python -m pipeline audit")
    with open(log) as f:
        imported = {line.split("|")[-1].strip().split(".")[0] for line in f if line.startswith("import time:")}
    return {"seconds": r["seconds"], "floor_s": floor["seconds"], "beyond_s": r["seconds"] - floor["seconds"],
            "rss_mib": r["rss_mib"], "tensorflow": "tensorflow" in imported, "modules": len(imported)}


def plant_tree(cache, root, n) -> dict:
    """Copies of ``n`` train images (exact, resized to 3/4, re-encoded as JPEG at quality 70) and 10 digits per
    class (scikit-learn's, RGB as the digits source makes them) as one class-folder tree under ``root``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    src = cache.config.get("source_root")
    if not src:
        raise PipelineError(f"{cache.path}: no source folder to copy train images from (AUDIT_DATA must be a folder)")
    info = {"paths": [], "kinds": [], "names": []}
    step = max(1, len(cache.train.paths) // n)
    for k, rel in enumerate(map(str, cache.train.paths[::step][:n])):
        img = Image.open(os.path.join(src, rel)).convert("RGB")
        for kind in ("exact", "resized", "jpeg"):
            name = f"{kind}_{k:03d}" + os.path.splitext(rel)[1].lower() if kind == "exact" else f"{kind}_{k:03d}.jpg"
            dest = os.path.join(root, "planted", name)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            if kind == "exact":
                shutil.copyfile(os.path.join(src, rel), dest)
            elif kind == "resized":
                img.resize((max(1, img.width * 3 // 4), max(1, img.height * 3 // 4)), Image.BILINEAR).save(dest, quality=95)
            else:
                img.save(dest, quality=70)
            info["paths"].append(rel), info["kinds"].append(kind), info["names"].append(f"planted/{name}")
    d = load_digits()
    pixels = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    os.makedirs(os.path.join(root, "digits"), exist_ok=True)
    for i in np.concatenate([np.flatnonzero(d.target == c)[:10] for c in range(10)]):
        Image.fromarray(np.repeat(pixels[i][..., None], 3, axis=-1)).save(os.path.join(root, "digits", f"{i:04d}.png"))
    return info


def extras(ctx, members, cache) -> tuple[dict, np.ndarray]:
    """(planted copies with their features and content hashes, digits features), extracted by the features step
    for each member config and, for an ensemble, joined as its cache is (:func:`joined`)."""
    from pipeline.cache import extract, store

    root = os.path.join(ctx.work, "audit-extra")
    info = plant_tree(cache, root, ctx.cfg.audit_plant)
    planted, digits = [], []
    for i, fcfg in enumerate(members):
        ecfg = replace(fcfg, data=root, cache_dir=f"{root}-cache{i}", val_fraction=0.0, test_fraction=0.0, per_class=0)
        with quiet():
            sp = (extra := store.load(extract.run(ecfg, log=lambda m: None))).train
        row = {str(p): i for i, p in enumerate(sp.paths)}
        planted.append(sp.features[[row[n] for n in info["names"]]])
        digit = np.flatnonzero(sp.labels == extra.class_names.index("digits"))
        digits.append(sp.features[digit[np.argsort(sp.paths[digit].astype(str), kind="stable")]])
    if len(members) > 1:
        planted, digits = joined(cache, {"planted": planted, "digits": digits}).values()
    else:
        planted, digits = planted[0], digits[0]
    info["features"] = planted
    info["hashes"] = [_sha256(os.path.join(root, n)) for n in info["names"]]
    return info, digits


def joined(cache, rows: dict) -> dict:
    """{name: features} of other rows (``rows``: {name: [each member's features]}) normalised as the ensemble
    ``cache`` joined its own: with its members' train rows (matched by content hash) as the statistics."""
    from pipeline.cache import ensemble, store

    order, blocks = cache.hashes["train"], []
    for path in cache.members:
        member = store.load(path)
        sums = ensemble.hashes(member, path)["train"]
        where = dict(zip(sums, range(len(sums))))
        blocks.append(member.train.features[[where[sha] for sha in order]])
    out = ensemble.normalise({"train": blocks, **rows}, cache.config["ensemble"]["normalisation"])
    return {name: out[name] for name in rows}


def audit_features(cfg, **changes):
    """The features config of the audited cache: AUDIT_DATA, AUDIT_BACKBONE (else BACKBONE), no views."""
    return features_config(cfg, data=data_path(cfg), views=0, tta=False, backbone=cfg.audit_backbone or cfg.backbone,
                           **changes)


def load(cfg, **changes) -> tuple:
    """(AUDIT_DATA's cache made or reused by the features step, the features config of each member): with
    ``AUDIT_BACKBONE=a+b`` each member's cache, joined by image content as ``make audit`` joins them."""
    from pipeline.cache import ensemble, extract, store

    fcfg = audit_features(cfg, **changes)
    members = ensemble.member_configs(fcfg) if ensemble.is_ensemble(fcfg.backbone) else [fcfg]
    with quiet():
        paths = [extract.run(m, log=lambda m: None) for m in members]
    return (ensemble.join(paths, fcfg.backbone) if len(paths) > 1 else store.load(paths[0])), members


def _sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run(ctx):
    cfg = ctx.cfg
    cache, members = load(cfg)
    empty = [s for s in ("train", "val", "test") if s not in cache.splits or not len(cache.splits[s].labels)]
    if empty or len(cache.class_names) < 3:
        raise PipelineError(f"AUDIT_DATA={cfg.audit_data}: needs train, val and test images of at least 3 classes "
                            f"(empty: {', '.join(empty) or 'none'}; {len(cache.class_names)} classes)")
    X = np.concatenate([cache.train.features, cache.val.features]).astype(np.float32)
    y = np.concatenate([cache.train.labels, cache.val.labels])
    res = {"cache": cache.path, "counts": {s: int(len(sp.labels)) for s, sp in cache.splits.items()}}
    t0 = time.perf_counter()
    res["labels"] = parts.label_noise(X, y, cfg.audit_noise, range(cfg.audit_seeds), AUDIT_FOLDS)
    paths = np.concatenate([cache.train.paths, cache.val.paths])
    res["labels"]["clean_flagged_paths"] = [str(paths[i]) for i in res["labels"][DEFAULT]["clean_flagged"]]
    res["labels_s"] = time.perf_counter() - t0
    splits = [cache if split == cfg.seed else load(cfg, seed=split)[0]
              for split in seed_list(cfg.audit_split_seeds, "AUDIT_SPLIT_SEEDS")]
    res["open_set"] = _open_set(splits, cfg.seed)
    planted, digits = extras(ctx, members, cache)
    res["far_ood"] = parts.far_ood(cache, digits, cfg.seed)
    res["calibration"] = _calibration(splits, cfg.seed)
    res["leaks"] = parts.leak_check(cache, planted)
    res["cost"] = cost(ctx, [f"CACHE={cache.path}"] if len(members) == 1 else features_args(audit_features(cfg)))
    return report(cfg, res)


def _open_set(splits, seed) -> dict:
    """Each class held out in turn, on the cache of each of AUDIT_SPLIT_SEEDS: per split, and the mean over them
    (one split's AUROC moves by a point or two with the images that land in test)."""
    runs = [parts.open_set(c, seed) for c in splits]
    mean = {s: {k: float(np.mean([r["mean"][s][k] for r in runs])) for k in runs[0]["mean"][s]} for s in parts.SCORES}
    return {"per_split": runs, "mean": mean}


def _calibration(splits, seed) -> dict:
    """Per head: T, test NLL and ECE before and after, the mean over the caches of AUDIT_SPLIT_SEEDS (one split's
    ECE on a few hundred test images spans several hundredths)."""
    per = {h: [parts.calibrate(*_probs(c, h, seed)) for c in splits] for h in HEADS}
    return {h: parts.mean_calibration(runs) for h, runs in per.items()}


def _probs(cache, head, seed):
    with quiet():
        pv, pt = parts.head_probs(cache, head, seed)
    return pv, cache.val.labels, pt, cache.test.labels, seed


def _labels(lab, m, show) -> list:
    met = []
    for i, (name, r) in enumerate((k, v) for k, v in lab.items() if isinstance(v, dict) and "mean" in v):
        mean, key = r["mean"], f"l{i}"
        for fig, label in (("auroc", "AUROC of the label quality, flipped vs not"),
                           ("top_n_precision", f"precision of the {r['flipped']} lowest"),
                           ("recall", "recall of the flagged"), ("precision", "precision of the flagged"),
                           ("flagged", "flagged"), ("extra", "flagged, not flipped"),
                           ("extra_on_clean", "  of which flagged on the clean labels too")):
            m[f"{key}_{fig}"] = (mean[fig], "mean of seeds")
            goal = f" (goal >= {GOALS[fig]})" if fig in GOALS and name == DEFAULT else ""
            show.append((f"{name}: {label}{goal}" if fig == "auroc" else f"  {label}{goal}", f"{key}_{fig}"))
        m[f"{key}_clean"] = (len(r["clean_flagged"]), "images")
        show.append(("  flagged on the clean labels", f"{key}_clean"))
        if name == DEFAULT:
            met = [mean[f] >= GOALS[f] for f in ("auroc", "top_n_precision", "recall")]
    return met


def _rejection(name, r, m, show, goal) -> bool:
    mean = r.get("mean", r)
    for s in parts.SCORES:
        splits = ", ".join(f"{x['mean'][s]['auroc']:.3f}" for x in r.get("per_split", []))
        m[f"{name}_{s}"] = (mean[s]["auroc"], f"AUROC (splits: {splits})" if splits else "AUROC")
        m[f"{name}_{s}_rej"] = (mean[s]["rejected"], "rejected")
        show += [(f"{name}: {s}{f' (goal >= {goal})' if s == 'combined' else ''}", f"{name}_{s}"),
                 (f"  {s}: unknowns rejected at 95% known val recall", f"{name}_{s}_rej")]
    return mean["combined"]["auroc"] >= goal


def report(cfg, res) -> dict:
    m, show, verdicts = {}, [], []
    label_met = _labels(res["labels"], m, show)
    near_met = _rejection("near OOD (class held out, mean of classes and splits)", res["open_set"], m, show,
                          GOALS["near"])
    far_met = _rejection("far OOD (digits among photos)", res["far_ood"], m, show, GOALS["far"])
    cal_met = []
    for h, c in res["calibration"].items():
        for when in ("before", "after"):
            each = ", ".join(f"{r[when]['ece']:.3f}" for r in c["per_seed"])
            m[f"{h}_nll_{when}"], m[f"{h}_ece_{when}"] = (c[when]["nll"], "NLL"), (c[when]["ece"], f"ECE (splits: {each})")
            show += [(f"{h} (T={c['temperature']:.2f}): test NLL {when}", f"{h}_nll_{when}"),
                     (f"  test ECE {when}{' (goal <= 0.03)' if when == 'after' else ''}", f"{h}_ece_{when}")]
        m[f"{h}_nll_delta"] = (c["after"]["nll"] - c["before"]["nll"], "NLL after - before")
        show.append(("  test NLL change (goal < 0)", f"{h}_nll_delta"))
        cal_met.append(c["after"]["nll"] < c["before"]["nll"] and c["after"]["ece"] <= GOALS["ece"])
    lk = res["leaks"]
    for kind, rate in lk["near_found"].items():
        m[f"leak_{kind}"] = (rate, "found")
        show.append((f"planted {kind} copies found (near)", f"leak_{kind}"))
    m["leak_exact"] = (lk["exact_found"], "found")
    m["leak_pairs"], m["leak_false"] = (lk["clean_pairs"], "pairs"), (lk["clean_false"], "pairs (goal 0)")
    show += [("planted exact copies found (content hash)", "leak_exact"), ("near pairs on the clean data", "leak_pairs"),
             ("  of which not the same photo", "leak_false")]
    leak_met = min(lk["near_found"].values()) == 1 and lk["exact_found"] in (1, None) and lk["clean_false"] == 0
    c = res["cost"]
    m["cost_wall"], m["cost_floor"] = (c["seconds"], "s"), (c["floor_s"], "s")
    m["cost_audit"], m["cost_tf"] = (c["beyond_s"], "s"), ("yes" if c["tensorflow"] else "no", "")
    show += [("python -m pipeline audit: whole command", "cost_wall"), (f"  floor: python -c '{FLOOR}'", "cost_floor"),
             ("  the audit beyond the floor", "cost_audit"), ("  TensorFlow imported", "cost_tf")]
    for name, ok in (("label noise", all(label_met)), ("open set near", near_met), ("open set far", far_met),
                     ("calibration", all(cal_met)), ("leaks", leak_met), ("no TensorFlow", not c["tensorflow"])):
        verdicts.append((f"goal: {name}", "met" if ok else "NOT met"))
    return {**res, "metrics": m, "show": show, "verdicts": verdicts,
            "goal": "label noise, open set near and far, calibration, leaks, no TensorFlow (see docs/audit.md)",
            "met": all(ok == "met" for _, ok in verdicts),
            "note": f"AUDIT_DATA={cfg.audit_data} ({', '.join(f'{s} {n}' for s, n in res['counts'].items())}); "
                    f"label noise: {cfg.audit_noise:g} of train+val flipped to another class, seeds 0..{cfg.audit_seeds - 1}, "
                    f"{AUDIT_FOLDS} folds; open set: logreg on train, T and threshold on known val; "
                    f"open set near and calibration: mean of split seeds {cfg.audit_split_seeds}; "
                    f"leaks: {cfg.audit_plant} train images planted as test copies three ways"}

