"""Validating images once: each file hashed and decoded to check it, the result remembered by content hash
beside the cache, so later scans decode nothing they have checked before. A file's content hash is itself
remembered by its path, size, modification time, inode and inode change time (as DVC and git's index do): an
unchanged file is not read again; any change of those reads and hashes it afresh. Both memos live in the cache
folder's memo file (:mod:`pipeline.memo`)."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from pipeline import memo
from pipeline.data import images
from pipeline.data.loading import cores
from pipeline.progress import progress as show_progress
from pipeline.records import file_digest


WINDOW = 1024  # tasks in flight at once (a future each): the scan's memory does not grow with the file count


def windowed(pool, fn, items, window=WINDOW):
    """``pool.map(fn, items)``, results in order, with at most ``window`` tasks submitted ahead
    (``Executor.map`` submits every task at once)."""
    pending = deque()
    for item in items:
        if len(pending) >= window:
            yield pending.popleft().result()
        pending.append(pool.submit(fn, item))
    while pending:
        yield pending.popleft().result()


class CheckMemo:
    """Validation results by content hash, kept in the memo file of ``path`` (:func:`pipeline.memo.at`; None:
    kept for this run only): every image is decoded to check it once."""

    def __init__(self, path, max_pixels):
        self.path, self.max_pixels = memo.at(path) if path else None, max_pixels
        self.memo = memo.Table(self.path, "checks")
        self.hashes = HashMemo(self.path)

    def key(self, sha):
        return f"{sha}:{self.max_pixels}"

    def get(self, sha):
        """The reason a file of this content is refused (None: fine), or False when never checked."""
        return self.memo.get(self.key(sha), False)

    def put(self, sha, reason):
        self.memo.put(self.key(sha), reason)

    def header_ok(self, sha) -> bool:
        return self.memo.get(self.key(sha) + ":header", False) is None

    def put_header_ok(self, sha):
        self.memo.put(self.key(sha) + ":header", None)

    def decoded(self, sha):
        """What decoding this content for the backbone gave: None (fine), the reason it failed, or False."""
        return self.memo.get(self.key(sha) + ":decoded", False)

    def put_decoded(self, sha, reason):
        """Remember a decode for the backbone; a file that failed stays in the manifest (its row is marked
        skipped), so its cache keeps its key."""
        self.memo.put(self.key(sha) + ":decoded", reason)

    def save(self):
        self.memo.save()
        self.hashes.save()


class HashMemo:
    """Content hashes by path, size, mtime, inode and ctime, in the memo file ``db`` (None: this run only)."""

    def __init__(self, db):
        self.memo = memo.Table(db, "hashes")

    @staticmethod
    def stamp(st) -> list:
        """What says a file is unchanged: size, mtime, inode and the inode's change time (which, unlike the
        mtime, no user can set back: an in-place edit with its size and mtime restored still changes it)."""
        return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]

    def remembered(self, path, st=None) -> str | None:
        """The remembered content hash of ``path`` when its :meth:`stamp` is unchanged, else None."""
        st = st or os.stat(path)
        hit = self.memo.get(os.path.abspath(path))
        if isinstance(hit, list) and len(hit) == 5 and hit[:4] == self.stamp(st) and isinstance(hit[4], str):
            return hit[4]
        return None

    def digest(self, path) -> str:
        st = os.stat(path)
        if (sha := self.remembered(path, st)) is not None:
            return sha
        sha = file_digest(path)
        self.memo.put(os.path.abspath(path), [*self.stamp(st), sha])
        return sha

    def save(self):
        self.memo.save()


def check_files(candidates, memo, progress):
    """Hash every candidate and check, once, the header of those the memo has not seen (their pixels are
    checked when extraction decodes them, so a first run decodes each image once); returns {relpath:
    (sha256, reason it is refused or None, reason its decode failed or None)}."""

    def digest(arg):
        rel, path = arg
        try:
            if os.path.getsize(path) == 0:
                return rel, path, "", "empty file (0 bytes)"
            return rel, path, memo.hashes.digest(path), None
        except OSError as e:
            return rel, path, "", f"unreadable: {e.strerror}"

    def remembered(arg):
        """A file whose hash the memo holds, in this thread: a stat, cheaper than a task for the pool."""
        try:
            st = os.stat(arg[1])
        except OSError:
            return None
        sha = memo.hashes.remembered(arg[1], st) if st.st_size else None
        return (*arg, sha, None) if sha is not None else None

    def check(arg):
        rel, path, sha = arg
        reason = images.check_header(path, memo.max_pixels)
        if reason:
            memo.put(sha, reason)  # a bad header is final: the file never enters the manifest
        else:
            memo.put_header_ok(sha)
        return rel, reason

    results, todo = {}, []
    with ThreadPoolExecutor(max_workers=min(8, cores() * 2)) as pool:
        hits = [remembered(c) for c in candidates]
        hashed = windowed(pool, digest, (c for c, hit in zip(candidates, hits) if hit is None))
        for rel, path, sha, why in (hit or next(hashed) for hit in hits):
            known = memo.get(sha) if not why else why
            if known is not False:
                results[rel] = (sha, known, None)
            elif memo.decoded(sha) is not False:
                results[rel] = (sha, None, memo.decoded(sha))
            elif memo.header_ok(sha):
                results[rel] = (sha, None, None)
            else:
                todo.append((rel, path, sha))
        bar = None
        if progress and len(todo) > 1000:
            print("checking image headers")
            bar = show_progress(len(todo), "file")
        shas = {rel: sha for rel, _, sha in todo}
        for n, (rel, reason) in enumerate(windowed(pool, check, todo), 1):
            results[rel] = (shas[rel], reason, None)
            if bar and (n % 500 == 0 or n == len(todo)):
                bar.update(n)
    memo.save()
    return results
