"""The scale section's measured children on a small synthetic cache: every op runs as a whole command, in
memory within the budget and lazily past it, with the same accuracy either way (the streamed head) and a plot."""

import pytest

from pipeline.bench import scale, synthetic
from pipeline.configs import BenchConfig
from pipeline.errors import PipelineError

pytestmark = pytest.mark.slow


@pytest.mark.slow
def test_children_measure_open_fit_predict_in_memory_and_lazily(tmp_path):
    path = synthetic.write_cache(tmp_path / "s.h5", 3000, dim=64, classes=4)
    eager = scale.measure(path, "2GiB", str(tmp_path))
    past = scale.measure(path, "1k", str(tmp_path))
    for res, lazy in ((eager, False), (past, True)):
        assert set(res) == set(scale.OPS)
        for op, r in res.items():
            assert r["op"] == op and r["lazy"] is lazy and r["seconds"] > 0 and r["rss_mib"] > 0
        assert 0.5 < res["predict"]["accuracy"] <= 1
    assert past["predict"]["accuracy"] >= eager["predict"]["accuracy"] - 0.02
    png = scale.plot({3000: eager, 30000: past}, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000 and png.endswith("p.png")


def test_sizes_and_options():
    assert scale.sizes(100_000) == [10_000, 100_000]
    assert scale.sizes(1_000_000) == [10_000, 100_000, 1_000_000]
    with pytest.raises(PipelineError, match="SCALE_MAX=10"):
        scale.check(BenchConfig(scale_max=10))
    with pytest.raises(PipelineError, match="MEMORY_BUDGET='x'"):
        scale.check(BenchConfig(memory_budget="x"))
