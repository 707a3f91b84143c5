"""The audit page rendered by headless Chromium (Debian's ``chromium`` package): every section's heading is in
the rendered DOM and every embedded image decodes. Deselect with ``-m "not browser"`` where Chromium is absent."""

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from audit_data import planted
from PIL import Image

import pipeline
from pipeline.reports.audit import step

pytestmark = [pytest.mark.slow, pytest.mark.browser]

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def chromium():
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if not found:
        pytest.fail("no headless Chromium found (apt-get install chromium); deselect with -m 'not browser'")
    return [found, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=10000"]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    path, _ = planted(tmp_path_factory, size=96)
    return Path(pipeline.audit(cache=path, reports_dir=str(tmp_path_factory.mktemp("reports")), show=8)["page"])


@pytest.mark.browser
def test_the_page_renders_its_sections_and_images_in_chromium(page, tmp_path):
    done = subprocess.run([*chromium(), "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    headings = re.findall(r"<h2>(.*?)</h2>", dom)
    assert headings == [title for _, title, _ in step.SECTIONS]
    loaded = re.search(r'<body data-images="(\d+)/(\d+)"', dom)
    assert loaded, "the page's load script did not run"
    ok, total = map(int, loaded.groups())
    assert total == dom.count("<img ") >= 20 and ok == total, f"{total - ok} of {total} images did not load"
    shot = tmp_path / "page.png"
    done = subprocess.run([*chromium(), "--window-size=1200,2400", f"--screenshot={shot}", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2400, 1200) and pixels.std() > 20, "the screenshot is blank"
