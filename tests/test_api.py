"""The Python API for notebooks: the README's example runs as written; loading needs no TensorFlow."""

import pytest
import re
import subprocess
import sys

from conftest import ROOT, SHARED, require_shared
from synthetic import write_cache

import pipeline


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_example_runs_as_written(tmp_path):
    require_shared()
    code = readme_example().replace('"../shared/', f'"{SHARED}/')
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()  # the features step says what it does, then the example prints
    assert any(line.startswith("['daisy', 'dandelion', 'rose', 'sunflower', 'tulip'] (") for line in lines), lines
    acc = float(lines[-1].split()[-1])
    assert acc > 0.6, p.stdout  # real features: far above the 0.2 of guessing among five classes


def test_load_cache_needs_no_tensorflow_and_names_what_is_wrong(tmp_path):
    path = write_cache(tmp_path / "c.h5")
    code = ("import sys; sys.modules['tensorflow'] = None; sys.modules['keras'] = None\n"
            "import pipeline\n"
            f"c = pipeline.load_cache({str(path)!r})\n"
            "print(c.train.X.shape, c.train.y.shape, len(c.train.paths), c.class_names)\n"
            "try:\n"
            f"    pipeline.load_cache({str(tmp_path / 'missing.h5')!r})\n"
            "except pipeline.errors.PipelineError as e:\n"
            "    print('error:', e)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    first, second = p.stdout.strip().splitlines()
    assert first == "(90, 16) (90,) 90 ['cat', 'dog', 'fox']"
    assert second.startswith("error: ") and "missing.h5: no such cache file" in second


def test_public_names_and_unknown_options():
    assert sorted(pipeline.__all__) == ["Embedder", "audit", "features", "load_cache", "predict"]
    import pytest

    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="unknown option.*colour; valid: data, backbone"):
        pipeline.features(colour="red")
    with pytest.raises(PipelineError, match="unknown option.*colour; valid: data, backbone.*reject_recall"):
        pipeline.audit(colour="red")
