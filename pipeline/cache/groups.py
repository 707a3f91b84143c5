"""The row groups of a cache file and what plugs them into the engine: each split's clean rows, and the groups
VIEWS and TTA add (``train_views``: K augmented views of every train image, image-major; ``val_tta`` and
``test_tta``: every val and test image mirrored left to right, row for row its split). A group is its rows'
dataset items and a kind; :class:`Pixels` is the per-group transform of a batch's decoded clean pixels, and
:meth:`Group.key` the identity under which a row is lent by an earlier cache (:mod:`pipeline.cache.reuse`):
the image's content hash, with the view index or ``tta`` for the added groups.
The augmentation (Keras) is imported lazily, where views are made: a head on a current cache loads no Keras."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.cache import store

CLEAN, VIEW, TTA = "clean", "view", "tta"
HASHES = "content_sha256"  # per-row column: the content hash of the image the row was made from


def lend_key(kind, sha, view=None) -> str:
    """The identity of a row of ``kind`` made from the image of content ``sha`` (view ``view``)."""
    if kind == VIEW:
        return f"{sha}:view:{int(view)}"
    return f"{sha}:tta" if kind == TTA else sha


def kind_of(name) -> str | None:
    """The kind of the file's group ``name`` (None: not a group of rows)."""
    if name == store.VIEWS:
        return VIEW
    if name in store.TTA.values():
        return TTA
    return CLEAN if name in ("train", "val", "test") else None


@dataclass(frozen=True)
class Group:
    """Rows of one group: ``items`` (the dataset item of each row), ``kind``; for views each row's ``view``
    and ``image`` (its clean train row)."""

    name: str
    items: tuple
    kind: str = CLEAN
    view: tuple | None = None
    image: tuple | None = None

    def key(self, ds, row) -> str:
        return lend_key(self.kind, ds.items[self.items[row]].sha256, self.view[row] if self.view else None)

    def cut(self, start, stop) -> "Group":
        """Rows [start, stop), their items renumbered 0.. (those of :func:`pipeline.cache.ray_actor.part`)."""
        def sl(v):
            return None if v is None else tuple(v[start:stop])
        return Group(self.name, tuple(range(stop - start)), self.kind, sl(self.view), sl(self.image))


def of(plan) -> dict:
    """{name: Group} of ``plan``'s cache in file order: the splits (every row: the manifest's layout), then the
    train views (VIEWS=K), then the TTA groups (TTA=1)."""
    ds, cfg = plan.ds, plan.cfg
    out = {s: Group(s, tuple(ds.split(s, all_rows=True))) for s in ds.splits()}
    if cfg.views and "train" in out:
        train, k = out["train"].items, cfg.views
        out[store.VIEWS] = Group(store.VIEWS, tuple(i for i in train for _ in range(k)), VIEW,
                                 tuple(j for _ in train for j in range(k)),
                                 tuple(n for n in range(len(train)) for _ in range(k)))
    if cfg.tta:
        for s, name in store.TTA.items():
            if s in out:
                out[name] = Group(name, out[s].items, TTA)
    return out


def layout(ds, groups) -> dict:
    """The Writer's layout of ``groups``: {name: (labels, paths, {columns})}; views add ``image`` and ``view``,
    every group ``content_sha256``."""
    out = {}
    for name, g in groups.items():
        columns = {}
        if g.kind == VIEW:
            columns = {"image": np.asarray(g.image, np.int32), "view": np.asarray(g.view, np.int16)}
        columns[HASHES] = np.asarray([ds.items[i].sha256 for i in g.items], dtype="S64")
        out[name] = ([ds.items[i].label for i in g.items], [ds.items[i].relpath for i in g.items], columns)
    return out


class Pixels:
    """``pixels(ds, group, rows, x)``: a batch's clean pixels ``x`` (rows ``rows`` of ``group``) as that group's
    rows see them: as they are, mirrored (TTA), or each augmented as view j of its image's content (VIEWS;
    the augmenter built on first use, in the process that runs it)."""

    def __init__(self, cfg):
        self.cfg, self.views = cfg, None

    def __call__(self, ds, group, rows, x):
        if group.kind == TTA:
            return np.ascontiguousarray(x[:, :, ::-1])
        if group.kind != VIEW:
            return x
        if self.views is None:
            from pipeline.data.augment import Views  # Keras: only where views are made

            c = self.cfg
            self.views = Views(c.flip, c.rotation, c.zoom, c.contrast, c.seed)
        return self.views.batch(x, [(ds.items[group.items[r]].sha256, group.view[r]) for r in rows])
