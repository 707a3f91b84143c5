"""Validating images once: each file hashed and decoded to check it, the result remembered by content hash
beside the cache, so later scans decode nothing they have checked before."""

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


def check_files(candidates, memo, progress):
    """Hash and (once) decode every candidate; returns {relpath: (sha256, reason or None)}."""

    def one(arg):
        rel, path = arg
        try:
            if os.path.getsize(path) == 0:
                return rel, ("", "empty file (0 bytes)")
            sha = file_digest(path)
        except OSError as e:
            return rel, ("", f"unreadable: {e.strerror}")
        reason = memo.get(sha)
        if reason is False:
            reason = images.check_image(path, memo.max_pixels)
            memo.put(sha, reason)
        return rel, (sha, reason)

    results = {}
    bar = None
    if progress and len(candidates) > 200:
        print("checking images")
        bar = show_progress(len(candidates), "file")
    with ThreadPoolExecutor(max_workers=min(8, cores() * 2)) as pool:
        for n, (rel, res) in enumerate(pool.map(one, candidates), 1):
            results[rel] = res
            if bar and (n % 100 == 0 or n == len(candidates)):
                bar.update(n)
    memo.save()
    return results
