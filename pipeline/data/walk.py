"""Walking a class-folder tree: every real file once, links followed without loops or crossings into another
class folder, each refused link reported with its reason."""

from __future__ import annotations

import os
from collections import deque

from pipeline.data import images


class Walker:
    """One scan's memory, by real path. No folder is walked twice (a link back into the root, a split tree or
    a walked folder is a loop); no link into one class folder is followed from another; with ``dedupe`` no
    real file is counted twice. Links are followed after every folder reached without one, so a real
    path wins over a link to it; otherwise the first path found wins. What is left out is in ``skipped``."""

    def __init__(self, root, class_dirs, dedupe=True):
        self.root = os.path.realpath(root)
        self.classes = {os.path.realpath(d) for d in class_dirs}
        self.above = {self.root}  # the root and every folder holding it or a class folder: loops
        for real in (self.root, *self.classes):
            while os.path.dirname(real) != real:
                real = os.path.dirname(real)
                self.above.add(real)
        self.visited, self.files, self.dedupe = set(), {}, dedupe
        self.skipped, self.ignored = [], 0

    def claim(self, path) -> bool:
        """Mark folder ``path`` walked; False if it already was."""
        try:
            st = os.stat(path)
        except OSError:
            return True  # listing it reports why
        if (st.st_dev, st.st_ino) in self.visited:
            return False
        self.visited.add((st.st_dev, st.st_ino))
        return True

    def walk(self, top, prefix) -> list[tuple[str, str]]:
        """(relpath, path) of every file kept below class folder ``top``, relpaths under ``prefix``, in
        os.walk order (sorted, a folder's files before its sub-folders)."""
        own = os.path.realpath(top)
        if not self.claim(top):
            self.skipped.append((prefix, f"symlink loop / already scanned: points to {self._where(own)}"))
            return []
        kept, folders, links = [], [(top, own, prefix)], deque()
        while folders or links:
            if folders:
                self._list(*folders.pop(), folders, links, kept)
                continue
            path, rel, is_dir = links.popleft()
            real = os.path.realpath(path)
            why = self._link_problem(real, own, is_dir)
            if why is None and is_dir and not self.claim(path):
                why = f"symlink loop / already scanned: points to {self._where(real)}"
            if why:
                self.skipped.append((rel, why))
            elif is_dir:
                folders.append((path, real, rel))
            else:
                self._keep(rel, path, real, kept)
        kept.sort(key=lambda k: _walk_order(k[0]))
        return kept

    def _list(self, path, real, rel, folders, links, kept):
        """One folder: its files kept, its sub-folders queued, its links put aside for later."""
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            self.skipped.append((rel, f"unreadable folder: {e.strerror or e}"))
            return
        subdirs = []
        for e in entries:
            r, link, is_dir = os.path.join(rel, e.name), e.is_symlink(), _is_dir(e)
            if images.is_hidden(e.name):
                self.ignored += _count_files(e.path) if is_dir and not link else 1
            elif link:
                links.append((e.path, r, is_dir))
            elif is_dir:
                if self.claim(e.path):
                    subdirs.append((e.path, os.path.join(real, e.name), r))
                else:
                    self.skipped.append((r, "already scanned (reached by another path)"))
            else:
                self._keep(r, e.path, os.path.join(real, e.name), kept)
        folders.extend(reversed(subdirs))

    def _keep(self, rel, path, real, kept):
        if self.dedupe and real in self.files:
            self.skipped.append((rel, f"already scanned: same file as {self.files[real]}"))
            return
        self.files[real] = rel
        kept.append((rel, path))

    def _link_problem(self, real, own, is_dir):
        """Why a link to ``real`` found in class folder ``own`` is not followed, or None."""
        if is_dir and real in self.above:
            return f"symlink loop / already scanned: points to {self._where(real)}"
        owner = self._class_of(real)
        if owner is not None and owner != own:
            return f"link into another class folder: points to {self._where(real)}"
        return None

    def _class_of(self, real):
        """The real class folder ``real`` lies in (or is), else None."""
        while real not in self.classes:
            parent = os.path.dirname(real)
            if parent == real:
                return None
            real = parent
        return real

    def _where(self, real):
        if real == self.root:
            return "the data folder itself"
        if real.startswith(self.root + os.sep):
            return os.path.relpath(real, self.root)
        return real


def _walk_order(rel):
    """Sort key of os.walk's order: sorted names, a folder's files before its sub-folders."""
    parts = rel.split(os.sep)
    return [(1, p) for p in parts[:-1]] + [(0, parts[-1])]


def _is_dir(entry) -> bool:
    try:
        return entry.is_dir()  # follows a link
    except OSError:
        return False


def _count_files(top) -> int:
    """Files below a hidden folder (links not followed): what ignoring it ignores."""
    return sum(len(files) for _, _, files in os.walk(top))


def class_dirs(top):
    return sorted(d for d in os.listdir(top)
                  if os.path.isdir(os.path.join(top, d)) and not images.is_hidden(d))
