"""The contact sheet of the most confidently wrong test images: the real photos, placed pixel for pixel."""

import numpy as np
from conftest import FLOWERS, require_shared
from PIL import Image

from pipeline.data import images
from pipeline.reports import errors


def _rows(n):
    require_shared()
    daisies = sorted(p.name for p in (FLOWERS / "daisy").iterdir())[:n]
    return [{"path": f"daisy/{name}", "true": "daisy", "predicted": "rose", "probability": 0.9 - i / 100}
            for i, name in enumerate(daisies)]


def test_sheet_shows_the_photos_in_order_of_the_rows(tmp_path):
    rows = _rows(6)
    rows.insert(2, {**rows[0], "path": "daisy/missing.jpg"})  # unreadable: skipped, the next one takes its place
    out = tmp_path / "errors.png"
    assert errors.plot_sheet(str(out), rows, str(FLOWERS), "title")
    sheet = np.asarray(Image.open(out).convert("RGB"))
    shown = [r for r in rows if r["path"] != "daisy/missing.jpg"]
    cols = 4
    assert sheet.shape == (errors.TITLE + 2 * errors.CELL_H, cols * errors.CELL_W, 3)
    for k, r in enumerate(shown):
        y, x = errors.thumb_origin(k, cols)
        thumb = images.load_resized(str(FLOWERS / r["path"]), errors.THUMB)
        got = sheet[y:y + errors.THUMB, x:x + errors.THUMB].astype(int)
        assert np.abs(got - thumb).max() <= 1, f"thumbnail {k} ({r['path']}) is not where the sheet puts it"
    y, x = errors.thumb_origin(len(shown), cols)  # the empty last cell stays white
    assert (sheet[y:y + errors.THUMB, x:x + errors.THUMB] == 255).all()
    y, x = errors.thumb_origin(0, cols)
    label = sheet[y - errors.LABEL:y, x:x + errors.THUMB]
    assert (label.min(axis=2) < 200).sum() > 50, "no label text drawn above the first photo"


def test_sheet_stops_at_its_size_and_needs_a_readable_photo(tmp_path):
    rows = _rows(errors.SHEET + 3)
    out = tmp_path / "errors.png"
    assert errors.plot_sheet(str(out), rows, str(FLOWERS))
    rows_shown = -(-errors.SHEET // 4)
    assert Image.open(out).size == (4 * errors.CELL_W, errors.TITLE + rows_shown * errors.CELL_H)
    assert not errors.plot_sheet(str(tmp_path / "none.png"), rows, "")  # no source folder: nothing to show
    assert not (tmp_path / "none.png").exists()
