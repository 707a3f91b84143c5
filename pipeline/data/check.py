"""Validating images once: each file hashed and decoded to check it, the result remembered by content hash
beside the cache, so later scans decode nothing they have checked before. A file's content hash is itself
remembered by its path, size, modification time and inode (as DVC and git's index do): an unchanged file is
not read again; any change of those reads and hashes it afresh."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

from pipeline.data import images
from pipeline.data.loading import cores
from pipeline.progress import progress as show_progress
from pipeline.records import atomic_write_text, file_digest


class CheckMemo:
    """Validation results by content hash, kept beside the cache: every image is decoded to check it once."""

    def __init__(self, path, max_pixels):
        self.path, self.max_pixels = path, max_pixels
        self.memo = {}
        if path:
            try:
                with open(path) as f:
                    self.memo = json.load(f)
            except (OSError, ValueError):
                pass
        self.dirty = False
        self.hashes = HashMemo(path)

    def key(self, sha):
        return f"{sha}:{self.max_pixels}"

    def get(self, sha):
        return self.memo.get(self.key(sha), False)

    def put(self, sha, reason):
        self.memo[self.key(sha)] = reason
        self.dirty = True

    def save(self):
        if self.dirty and self.path:
            atomic_write_text(self.path, json.dumps(self.memo))
        self.hashes.save()


class HashMemo:
    """Content hashes by (path, size, mtime, inode), in ``<memo>.hashes.json``."""

    def __init__(self, path):
        self.path = path + ".hashes.json" if path else None
        self.memo, self.dirty = {}, False
        if self.path:
            try:
                with open(self.path) as f:
                    self.memo = json.load(f)
            except (OSError, ValueError):
                pass
        if not isinstance(self.memo, dict):
            self.memo = {}

    def digest(self, path) -> str:
        st = os.stat(path)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        key = os.path.abspath(path)
        hit = self.memo.get(key)
        if isinstance(hit, list) and hit[:3] == stamp and len(hit) == 4:
            return hit[3]
        sha = file_digest(path)
        self.memo[key] = [*stamp, sha]
        self.dirty = True
        return sha

    def save(self):
        if self.dirty and self.path:
            try:
                atomic_write_text(self.path, json.dumps(self.memo))
            except OSError:
                pass  # only costs the next scan its hashing


def check_files(candidates, memo, progress):
    """Hash every candidate and decode, once, those the memo has not seen; returns {relpath: (sha256, reason
    or None)}. Progress is shown for the decoding, when there is much of it."""

    def digest(arg):
        rel, path = arg
        try:
            if os.path.getsize(path) == 0:
                return rel, path, "", "empty file (0 bytes)"
            return rel, path, memo.hashes.digest(path), None
        except OSError as e:
            return rel, path, "", f"unreadable: {e.strerror}"

    def check(arg):
        rel, path, sha = arg
        reason = images.check_image(path, memo.max_pixels)
        memo.put(sha, reason)
        return rel, reason

    results, todo = {}, []
    with ThreadPoolExecutor(max_workers=min(8, cores() * 2)) as pool:
        for rel, path, sha, why in pool.map(digest, candidates):
            if why or memo.get(sha) is not False:
                results[rel] = (sha, why or memo.get(sha))
            else:
                todo.append((rel, path, sha))
        bar = None
        if progress and len(todo) > 200:
            print("checking images")
            bar = show_progress(len(todo), "file")
        shas = {rel: sha for rel, _, sha in todo}
        for n, (rel, reason) in enumerate(pool.map(check, todo), 1):
            results[rel] = (shas[rel], reason)
            if bar and (n % 100 == 0 or n == len(todo)):
                bar.update(n)
    memo.save()
    return results
