"""``audit``: the data looked at through the cache. Resolves the cache as ``head`` does (made first when
missing; TensorFlow is imported only then), runs every section in order, and writes ``<REPORTS_DIR>/<cache>/
audit/``: index.html (every section, the skipped ones with their reason), summary.json and each section's CSV."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from pipeline import records
from pipeline.cache import resolve, store
from pipeline.cache.resolve import load_cache
from pipeline.configs import AuditConfig
from pipeline.errors import PipelineError
from pipeline.reports import html
from pipeline.reports.audit import Skipped, scored, sections

SECTIONS = (
    ("labels", "Label issues", sections.label_issues),
    ("duplicates", "Duplicates and leaks", sections.duplicates),
    ("outliers", "Outliers", sections.outlier_images),
    ("balance", "Class balance", sections.class_balance),
    ("calibration", "Calibration", scored.calibrate),
    ("unknown", "Unknown-image rejection", scored.unknown),
)


@dataclass
class Context:
    """What the sections share: the cache, the options, the output folder, and the head fitted once."""

    cache: store.Cache
    cfg: AuditConfig
    out: str
    log: object = print
    probs: dict | None = None
    temperature: float | None = None
    _thumbs: dict = field(default_factory=dict)

    @property
    def names(self) -> list:
        return self.cache.class_names

    def split(self, name):
        """The split ``name``, or None when the cache has none or it is empty."""
        sp = self.cache.splits.get(name)
        return sp if sp is not None and len(sp.labels) else None

    def rows(self, names) -> tuple:
        """(features, labels, paths, split of each row) of the splits ``names`` together."""
        parts = [(s, sp) for s in names if (sp := self.split(s)) is not None]
        if not parts:
            return np.zeros((0, 0), np.float32), np.zeros(0, int), np.zeros(0, str), np.zeros(0, str)
        return (np.concatenate([sp.features for _, sp in parts]), np.concatenate([sp.labels for _, sp in parts]),
                np.concatenate([sp.paths for _, sp in parts]),
                np.concatenate([np.full(len(sp.labels), s) for s, sp in parts]))

    def thumb(self, path):
        """The thumbnail of a row's photo (memoised), or None for an in-memory dataset or an unreadable file."""
        if path not in self._thumbs:
            self._thumbs[path] = html.thumbnail(self.cache.config.get("source_root"), path)
        return self._thumbs[path]


def check_options(cfg: AuditConfig) -> None:
    if cfg.folds < 2:
        raise PipelineError(f"FOLDS={cfg.folds}: needs at least 2")
    if not 0 < cfg.reject_recall <= 1:
        raise PipelineError(f"REJECT_RECALL={cfg.reject_recall}: a share of the known images, in (0, 1]")
    if cfg.neighbours < 1 or cfg.show < 0:
        raise PipelineError(f"NEIGHBOURS={cfg.neighbours}, SHOW={cfg.show}: NEIGHBOURS >= 1 and SHOW >= 0")
    if not 0 <= cfg.near_quantile <= 1 or cfg.near_fraction < 0:
        raise PipelineError(f"NEAR_QUANTILE={cfg.near_quantile}, NEAR_FRACTION={cfg.near_fraction}: the "
                            "quantile in [0, 1], the fraction >= 0")
    records.writable_dir(cfg.reports_dir, "REPORTS_DIR")


def audit_cache(cache: store.Cache, cfg: AuditConfig, log=print) -> dict:
    """Every section on a loaded cache; writes the audit folder; {"page", "summary", section: summary}."""
    stem = resolve.stem(cache.path)
    out = os.path.join(cfg.reports_dir, stem, "audit")
    os.makedirs(out, exist_ok=True)
    counts = ", ".join(f"{s} {len(sp.labels)}" for s, sp in cache.splits.items())
    page = html.Page(f"Audit of {stem}", f"{len(cache.class_names)} classes; {counts} images; "
                     f"cache {cache.path}; source {cache.config.get('source_root') or cache.config.get('data', '-')}.")
    ctx, summary = Context(cache, cfg, out, log), {"cache": cache.path}
    for key, title, run in SECTIONS:
        sec = page.section(title)
        try:
            summary[key] = run(ctx, sec)
        except Skipped as e:
            sec.skipped(str(e))
            summary[key] = {"skipped": str(e)}
            log(f"{title.lower()}: skipped: {e}")
    summary["page"] = page.write(os.path.join(out, "index.html"))
    summary["summary"] = os.path.join(out, "summary.json")
    records.write_json(summary["summary"], summary)
    log(f"wrote {summary['page']}")
    return summary


def run(cfg: AuditConfig, log=print) -> dict:
    """The audit of the cache of ``cfg`` (made first when missing and EXTRACT=1)."""
    check_options(cfg)
    return audit_cache(load_cache(cfg, log), cfg, log)


def step(cfg: AuditConfig, extra: dict | None = None) -> None:
    """The ``audit`` step."""
    run(cfg)
