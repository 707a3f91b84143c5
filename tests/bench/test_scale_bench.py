"""The scale section's measured children on a small synthetic cache: every op runs as a whole command, in
memory within the budget and lazily past it, with the same accuracy either way (the streamed head) and a plot;
the audit's sections on the cache (refused past the budget); the extraction of tiny synthetic JPEG trees."""

from types import SimpleNamespace

import pytest

from pipeline.bench import scale, scale_audit, scale_images, synthetic
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
    assert scale_images.sizes(BenchConfig()) == [1000, 10_000, 100_000]
    assert scale_images.sizes(BenchConfig(scale_max=1_000_000)) == [1000, 10_000, 100_000]
    assert scale_images.sizes(BenchConfig(scale_max=10_000)) == [100, 1000, 10_000]
    assert scale_images.sizes(BenchConfig(scale_images_max=100)) == [10, 100]
    assert scale_images.sizes(BenchConfig(scale_images_max=0)) == []
    with pytest.raises(PipelineError, match="SCALE_IMAGES_MAX=5"):
        scale.check(BenchConfig(scale_images_max=5))


@pytest.mark.slow
def test_audit_sections_measured_as_commands_and_refused_past_the_budget(tmp_path):
    path = synthetic.write_cache(tmp_path / "s.h5", 3000, dim=64, classes=4, hashes=True)
    res = scale.measure(path, "2GiB", str(tmp_path), scale_audit.OPS, scale_audit.__name__)
    assert set(res) == set(scale_audit.OPS)
    for op, r in res.items():
        assert r["op"] == op and r["lazy"] is False and r["seconds"] > r["op_seconds"] > 0 and r["rss_mib"] > 0
    assert 0 <= res["labels"]["summary"]["flagged"] < res["labels"]["summary"]["images"] == 2550
    assert res["duplicates"]["summary"]["exact_groups"] == 0 and res["duplicates"]["summary"]["near"] >= 0
    assert scale_audit.refusal(path, "2GiB") is None
    assert "MEMORY_BUDGET=1k" in scale_audit.refusal(path, "1k")

    cache_ops = scale.measure(path, "2GiB", str(tmp_path))
    small = {"write_seconds": 1.0, **cache_ops, **res}
    large = {"write_seconds": 2.0, **cache_ops, **{op: {"refused": "not run: too large"} for op in scale_audit.OPS}}
    m, show, ratios = scale.figures({3000: small, 30000: {**small, "write_seconds": 3.0}, 300000: large})
    for op in scale.OPS + scale_audit.OPS:
        assert m[f"ratio_{op}_30000"] == pytest.approx(m[f"{op}_30000"]["median"] / m[f"{op}_3000"]["median"])
    assert m["labels_300000"] == ("not run: too large", "") and "ratio_labels_300000" not in m
    assert m["open_own_3000"]["median"] == cache_ops["open"]["open_seconds"]  # inside the command: the open
    assert m["fit_own_3000"]["median"] == cache_ops["fit"]["op_seconds"]
    assert len(ratios["ops"]) == 2 * len(scale.OPS) and len(ratios["audit"]) == len(scale_audit.OPS)
    assert {key for _, key in show} <= set(m)


@pytest.mark.slow
def test_jpeg_trees_extracted_as_commands_with_consistent_ratios_and_a_plot(tmp_path):
    cfg = BenchConfig(backbone="mobilenet_v2", alpha=0.35, weights="none", size=32, batch=4, scale_images_max=100,
                      cache_dir=str(tmp_path / "cache"))
    ctx = SimpleNamespace(cfg=cfg, work=str(tmp_path), log=lambda m: None)
    out = scale_images.run(ctx)
    by, m = out["by_images"], out["metrics"]
    assert sorted(by) == [10, 100]
    for n, r in by.items():
        assert len(list((tmp_path / f"jpeg-{n}").rglob("*.jpg"))) == n and (tmp_path / f"jpeg-{n}.complete").exists()
        assert r["images"] == n and r["extract_ips"] > 0 and r["rss_mib"] > 0
        assert r["seconds"] > r["extract_seconds"] > 0  # the whole command holds the extraction
        assert not (tmp_path / f"jpeg-{n}-cache").exists()
    assert by[100]["steady_ips"] > 0
    for key in ("extract_ips", "extract_rss"):
        assert m[f"{key}_ratio"] == pytest.approx(m[f"{key}_100"]["median"] / m[f"{key}_10"]["median"])
    assert {key for _, key in out["show"]} <= set(m)
    # 32 MiB decode-ahead: both trees are decoded ahead whole, so no steady verdict
    assert [v[0] for v in out["verdicts"]] == ["extraction rate 100 / 10 JPEGs (start-up included)",
                                               "features peak RSS 100 / 10 JPEGs"]
    before = (tmp_path / "jpeg-10" / "class0" / "img_0000000.jpg").stat().st_mtime_ns
    scale_images.write_tree(str(tmp_path / "jpeg-10"), 10)  # reused: not written again
    assert (tmp_path / "jpeg-10" / "class0" / "img_0000000.jpg").stat().st_mtime_ns == before

    path = synthetic.write_cache(tmp_path / "s.h5", 2000, dim=32, classes=4)
    res = {"write_seconds": 1.0, **scale.measure(path, "2GiB", str(tmp_path)),
           **{op: {"refused": "not run"} for op in scale_audit.OPS}}
    png = scale.plot({2000: res, 20000: res}, str(tmp_path / "p.png"), by)
    assert (tmp_path / "p.png").stat().st_size > 1000 and png.endswith("p.png")


def test_extraction_ratios_pair_the_smallest_and_largest_tree_with_each_figure():
    def r(ips, steady, rss):
        return {"extract_ips": ips, "steady_ips": steady, "rss_mib": rss, "seconds": 20.0}

    by = {10: r(2.0, None, 1000.0), 100: r(20.0, 40.0, 1010.0), 1000: r(30.0, 24.0, 1300.0),
          10000: r(31.0, 23.0, 1250.0)}
    m, show, verdicts = scale_images.figures(by, ahead=30)  # the 100 tree: decoded ahead whole, the backbone alone
    assert m["extract_ips_ratio"] == pytest.approx(15.5) and m["steady_ips_ratio"] == pytest.approx(23 / 24)
    assert m["extract_rss_ratio"] == pytest.approx(1.25) and "steady_ips_10" not in m
    assert verdicts == [("extraction rate 10000 / 10 JPEGs (start-up included)", "met (goal >= 0.9: 15.500)"),
                        ("steady rate 10000 / 1000 JPEGs (trees of at least 4 x the 30 images decoded ahead)",
                         "met (goal >= 0.9: 0.958)"),
                        ("features peak RSS 10000 / 10 JPEGs", "NOT met (goal <= 1.2: 1.250)")]
    assert {key for _, key in show} <= set(m)
    m, show, verdicts = scale_images.figures({100: r(20.0, 40.0, 1.0), 1000: r(17.0, 24.0, 1.0)}, ahead=250)
    assert "steady_ips_ratio" not in m and verdicts[0] == ("extraction rate 1000 / 100 JPEGs (start-up included)",
                                                           "NOT met (goal >= 0.9: 0.850)")
