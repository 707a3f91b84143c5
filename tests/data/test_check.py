"""Change detection of the scan: an image edited in place with its size and modification time restored is
hashed again (its inode change time moved), so features of its old content are not reused; the scan's tasks in
flight are bounded and its results keep their order."""

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from pipeline.data import sources as data
from pipeline.data.check import windowed


def _bmp(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(path, format="BMP")  # uncompressed


def test_an_image_edited_in_place_with_size_and_mtime_restored_is_hashed_again(tmp_path):
    root = tmp_path / "d"
    for cls, value in (("cat", 40), ("dog", 200)):
        for i in range(3):
            _bmp(root / cls / f"{cls}_{i}.bmp", value + i)
    memo_path = str(tmp_path / "cache" / "checked-images.json")
    target = root / "cat" / "cat_0.bmp"
    before = {it.relpath: it.sha256 for it in data.scan_tree(str(root), 0.0, 0.0, memo_path=memo_path,
                                                               progress=False).items}
    st = os.stat(target)
    time.sleep(0.05)  # past the clock tick of the inode change time
    with open(target, "r+b") as f:  # one pixel byte rewritten in place: same size
        f.seek(-1, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the modification time put back
    now = os.stat(target)
    assert (now.st_size, now.st_mtime_ns, now.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    assert now.st_ctime_ns != st.st_ctime_ns
    after = {it.relpath: it.sha256 for it in data.scan_tree(str(root), 0.0, 0.0, memo_path=memo_path,
                                                              progress=False).items}
    rel = os.path.join("cat", "cat_0.bmp")
    assert after[rel] == hashlib.sha256(target.read_bytes()).hexdigest() != before[rel]
    assert {r: s for r, s in after.items() if r != rel} == {r: s for r, s in before.items() if r != rel}
    assert int(np.sum(np.asarray(Image.open(target)) != 40)) == 1  # really one pixel value changed


def test_the_scan_keeps_results_in_order_with_a_bounded_number_of_tasks_in_flight():
    submitted, most = [0], [0]

    def items():
        for i in range(50):
            submitted[0] += 1
            yield i

    with ThreadPoolExecutor(4) as pool:
        got = []
        for r in windowed(pool, lambda i: i * i, items(), window=5):
            most[0] = max(most[0], submitted[0] - len(got))  # submitted, not yet handed back
            got.append(r)
    assert got == [i * i for i in range(50)]
    assert most[0] <= 6  # the window, plus the one whose submission made room
