"""The exported model and ``predict``: same predictions after reloading, a folder with a bad file, files
refused when their record does not check out; predict with every kind of head on real flowers5 photos equals
the head's predictions on the cached features."""

import csv
import json
import os
import shutil
import subprocess

import keras
import numpy as np
import pytest
from conftest import MOBILENET_V2_FILE, ROOT, flowers_subset, write_image

from pipeline import cli, records
from pipeline.serve import predict
from pipeline.backbones import registry as backbones
from pipeline.data import images
from pipeline.errors import PipelineError
from pipeline.finetune import artifact
from pipeline.finetune import model as ft_model
from pipeline.heads import dense
from pipeline.serve import find

pytestmark = pytest.mark.slow

CLASSES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small end-to-end model (MobileNetV2 0.35 at 32 px, augmentation, a dense head) and its export."""
    folder = tmp_path_factory.mktemp("export")
    spec = backbones.get("mobilenet_v2")
    base = backbones.build_base(spec, 32, str(MOBILENET_V2_FILE), alpha=0.35)
    keras.utils.set_random_seed(1)
    head = dense.build_model(1280, len(CLASSES), (8,))
    model = ft_model.build_model(spec, 32, base, "avg", head, ft_model.augmentation(seed=1))
    rec = artifact.export(model, str(folder / "finetune.keras"), class_names=CLASSES, size=32,
                         interpolation="bilinear", extra={"config": {"note": "test"}})
    return model, rec


def test_export_reloads_with_the_same_predictions_on_raw_images(exported):
    model, rec_path = exported
    rec = json.loads(open(rec_path).read())
    assert rec["classes"] == CLASSES and rec["input_size"] == 32 and rec["config"] == {"note": "test"}
    assert rec["file"] == f"finetune-{rec['sha256'][:12]}.keras"
    assert rec["sha256"] == records.file_digest(rec_path.replace("finetune.json", rec["file"]))
    loaded, rec2 = artifact.load(rec_path)
    assert rec2 == rec and loaded.get_layer("augment") is not None  # augmentation inside, inert
    pixels = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3)).astype(np.uint8)
    ours = artifact.probabilities(artifact.compiled(model, 32), [pixels])
    call = artifact.compiled(loaded, 32)
    theirs = artifact.probabilities(call, [pixels])
    assert ours.shape == (6, 3) and ours.std(axis=0).max() > 1e-3
    np.testing.assert_allclose(ours, model(pixels, training=False).numpy(), atol=1e-5)  # BatchNorm folded
    np.testing.assert_allclose(theirs, ours, atol=1e-6)
    np.testing.assert_array_equal(artifact.probabilities(call, [pixels]), theirs)  # no random layer active


def test_predict_labels_a_folder_with_a_bad_file(exported, tmp_path, capsys):
    model, rec_path = exported
    folder = tmp_path / "photos"
    good = [write_image(folder / f"p{i}.jpg", (60 * i, 90, 200 - 50 * i), size=(50, 40), seed=i) for i in range(3)]
    good.append(write_image(folder / "sub" / "q.png", (10, 200, 10), size=(20, 30)))
    (folder / "x.jpg").write_text("not really a picture\n")
    (folder / "notes.txt").write_text("ignored\n")
    (folder / ".DS_Store").write_bytes(b"\0\1")
    missing = tmp_path / "missing.jpg"
    code = cli.main(["predict", f"IMAGES={missing}", str(folder), f"MODEL={rec_path}", "TOP_K=2",
                     f"OUTPUT={tmp_path / 'out.json'}"])
    out, err = capsys.readouterr()
    assert code == 1  # some input could not be labelled; the rest were
    assert f"skipped {folder / 'x.jpg'}: not an image (text)" in err and "labelled 4 image(s)" in err
    assert f"skipped {missing}: no such file or folder" in err and "2 could not be read" in err
    lines = {line.split()[0]: line.split()[1:] for line in out.strip().splitlines()}
    assert sorted(lines) == sorted(str(p) for p in good)
    pixels = np.stack([images.load_resized(p, 32) for p in good])
    probs = artifact.probabilities(artifact.compiled(model, 32), [pixels])
    for p, row in zip(good, probs):
        order = np.argsort(-row)[:2]
        assert lines[str(p)] == [v for i in order for v in (CLASSES[i], f"{row[i]:.3f}")]
    saved = json.loads((tmp_path / "out.json").read_text())
    assert len(saved["predictions"]) == 4 and {u["path"] for u in saved["unreadable"]} == {str(missing),
                                                                                           str(folder / "x.jpg")}


def test_loading_checks_the_record(exported, tmp_path):
    _, rec_path = exported
    rec = json.loads(open(rec_path).read())
    for name in (rec["file"], "finetune.json"):
        shutil.copy(rec_path.replace("finetune.json", name), tmp_path / name)
    (tmp_path / "finetune.json").write_text(json.dumps({**rec, "versions": {**rec["versions"], "keras": "2.15.0"}}))
    with pytest.raises(PipelineError, match="made with keras 2.15.0"):
        artifact.load(str(tmp_path / rec["file"]))
    assert artifact.find_record(str(tmp_path / "finetune.keras")) == str(tmp_path / "finetune.json")  # legacy
    (tmp_path / "finetune.json").write_text(json.dumps({**rec, "format": "pipeline-head/1"}))
    with pytest.raises(PipelineError, match="not a fine-tuned model record"):
        artifact.load(str(tmp_path))
    (tmp_path / "finetune.json").write_text(json.dumps(rec))
    with open(tmp_path / rec["file"], "ab") as f:
        f.write(b"\0")
    with pytest.raises(PipelineError, match="changed since it was saved"):
        artifact.load(str(tmp_path / "finetune.json"))


def test_make_passes_images_and_no_model_is_a_clear_error(tmp_path, capsys):
    out = subprocess.run(["make", "-n", "predict", "IMAGES=a.jpg photos/", "TOP_K=1"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "-m pipeline predict 'IMAGES=a.jpg photos/' 'TOP_K=1'" in out
    cfg, _ = cli.parse("predict", cli._steps()["predict"], ["IMAGES=a.jpg", "b c.jpg", "--top-k", "2"])
    assert predict.split_images(cfg.images) == ["a.jpg", "b c.jpg"] and cfg.top_k == 2
    write_image(tmp_path / "a.jpg")
    assert cli.main(["predict", str(tmp_path / "a.jpg"), f"MODELS_DIR={tmp_path / 'none'}"]) == 2
    assert "error: no model under" in capsys.readouterr().err


def tiny_model(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(3, "softmax")])


@pytest.mark.parametrize("kill", [KeyboardInterrupt, SystemExit])
def test_a_kill_between_the_export_and_its_record_keeps_the_previous_model(tmp_path, monkeypatch, kill):
    path = str(tmp_path / "finetune.keras")
    pixels = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3)).astype(np.float32)
    first = tiny_model(1)
    rec_path = artifact.export(first, path, class_names=CLASSES, size=8)
    rec_before = open(rec_path, "rb").read()

    def killed(*a, **k):
        raise kill()

    monkeypatch.setattr(records, "write_json", killed)
    with pytest.raises(kill):  # killed after the new model file is in place, before its record is written
        artifact.export(tiny_model(2), path, class_names=CLASSES, size=8)
    monkeypatch.undo()
    assert open(rec_path, "rb").read() == rec_before and len(os.listdir(tmp_path)) == 4  # + card, orphan
    rec, model_file = artifact.check(rec_path)
    assert os.path.basename(model_file) == rec["file"]
    loaded, _ = artifact.load(str(tmp_path))
    np.testing.assert_allclose(loaded(pixels).numpy(), first(pixels).numpy(), atol=1e-6)

    for f in ("finetune.keras", "finetune-0123456789ab.keras", ".finetune.keras.k1ll3d_x.tmp.keras",
              ".finetune.json.abc_123x.tmp"):  # legacy, older save, records.atomic_path's leftovers
        (tmp_path / f).write_bytes(b"old")
    (tmp_path / "finetune-run").mkdir()  # the fine-tune's checkpoints stay
    second = tiny_model(3)
    rec_path = artifact.export(second, path, class_names=CLASSES, size=8)
    rec, model_file = artifact.check(rec_path)
    assert sorted(os.listdir(tmp_path)) == sorted(["finetune-run", "finetune.json", "finetune.MODEL_CARD.md",
                                                  rec["file"]])
    for where in (rec_path, model_file, str(tmp_path)):
        np.testing.assert_allclose(artifact.load(where)[0](pixels).numpy(), second(pixels).numpy(), atol=1e-6)


def test_tsv_output_keeps_a_row_per_path_with_tabs_and_newlines(tmp_path):
    odd, bad = "a\tb\nc \"d\".jpg", "x\ty\r\nz.jpg"
    results = [{"path": odd, "top": [("cat", 0.75), ("dog", 0.25)]},
               {"path": "plain.jpg", "top": [("fox", 0.5), ("cat", 0.5)]}]
    predict.write_output(str(tmp_path / "out.tsv"), results, [(bad, "not an image (text)")])
    with open(tmp_path / "out.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows == [["path", "label_1", "probability_1", "label_2", "probability_2", "error"],
                    [odd, "cat", "0.750000", "dog", "0.250000", ""],
                    ["plain.jpg", "fox", "0.500000", "cat", "0.500000", ""],
                    [bad, "", "", "", "", "not an image (text)"]]
    assert [f for f in os.listdir(tmp_path) if f != "out.tsv"] == []  # written atomically, no temp file left


# --- predict with any head, on real flowers5 photos --------------------------------------------------------------

def flowers_models(root, heads, **options):
    """A flowers5 subset (6 photos per class) -> MobileNetV2 alpha 0.35 features at 64 px in a cache -> ``heads``
    ({name: hyper-parameters}) trained on it (with head ``options``). Returns (cache path, {head: record path},
    head config)."""
    from pipeline.cache import extract
    from pipeline.configs import FeaturesConfig, HeadConfig, asdict, replace
    from pipeline.heads import train as head_train

    data = flowers_subset(root / "data", per_class=6)
    fc = FeaturesConfig(data=str(data), backbone="mobilenet_v2", alpha=0.35, weights=str(MOBILENET_V2_FILE),
                        size=64, cache_dir=str(root / "cache"))
    cache_path = extract.run(fc, log=lambda m: None)
    hc = HeadConfig(**asdict(fc), models_dir=str(root / "models"), reports_dir=str(root / "reports"), **options)
    recs = {name: head_train.run_head(replace(hc, head=name), extra, log=lambda m: None)["record"]
            for name, extra in heads.items()}
    return cache_path, recs, hc


def cached_scores(rec_path, cache_path, split="test"):
    """(image files, class names, per-class scores) of a head on the cached features of a split: what predict
    must give on those images."""
    from pipeline.cache import store
    from pipeline.heads import artifacts
    from pipeline.heads import registry as heads

    cache = store.load(cache_path)
    sp = cache.splits[split]
    est = artifacts.load_head(rec_path)
    files = [os.path.join(cache.config["source_root"], p) for p in sp.paths]
    return files, [cache.class_names[int(c)] for c in est.classes_], heads.scores(est, sp.features)


HEADS = {"logreg": {}, "dense": {"HIDDEN": "8", "EPOCHS": "5"}, "linear_svm": {}, "knn": {"N_NEIGHBORS": "3"}}


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    return flowers_models(tmp_path_factory.mktemp("flowers"), HEADS)


@pytest.mark.parametrize("head", list(HEADS))
def test_predict_with_any_head_equals_its_predictions_on_the_cached_features(flowers, head, tmp_path, capsys):
    cache_path, recs, _ = flowers
    files, names, want = cached_scores(recs[head], cache_path)
    out = tmp_path / "preds.json"
    code = cli.main(["predict", *files, f"MODEL={recs[head]}", "TOP_K=5", f"OUTPUT={out}"])
    err = capsys.readouterr().err
    assert code == 0, err
    kind = "score" if head == "linear_svm" else "probability"  # LinearSVC has decision values only
    assert f"labelled {len(files)} image(s) with {recs[head]} ({head} head on mobilenet_v2 features)" in err
    assert ("decision values, not probabilities" in err) == (kind == "score")
    preds = json.loads(out.read_text())["predictions"]
    assert [p["path"] for p in preds] == files
    for p, row in zip(preds, want):
        assert p["top"][0]["label"] == names[int(np.argmax(row))]  # the cached head's label
        got = {t["label"]: t[kind] for t in p["top"]}
        np.testing.assert_allclose([got[n] for n in names], row, atol=1e-5)


def test_the_default_model_is_the_fine_tuned_one_else_the_last_sweep_else_the_newest_head(tmp_path):
    models = tmp_path / "models"
    made = []
    for i, rel in enumerate(["a/logreg.json", "b/svm.json", "a/best.json", "c/finetune.json"]):
        (models / rel).parent.mkdir(parents=True, exist_ok=True)
        fmt = artifact.FORMAT if rel.endswith("finetune.json") else "pipeline-head/1"
        (models / rel).write_text(json.dumps({"format": fmt}))
        os.utime(models / rel, (1000 + i, 1000 + i))
        made.append(str(models / rel))
    (models / "c" / "notes.json").write_text("{}")  # not a record: never picked
    os.utime(models / "c" / "notes.json", (2000, 2000))
    said = []
    assert find.find_model("", str(models), said.append) == made[3]
    os.remove(made[3])
    assert find.find_model("", str(models), said.append) == made[2] and "best head of the last sweep" in said[-1]
    os.remove(made[2])
    assert find.find_model("", str(models), said.append) == made[1] and "newest head" in said[-1]
    assert find.find_model(str(models / "a"), str(models)) == made[0]  # a folder with one record
    assert find.find_model(str(models / "a" / "logreg-0123456789ab.joblib")) == made[0]


def test_a_head_whose_cache_is_gone_runs_on_its_own_options_and_says_so(flowers, tmp_path):
    cache_path, recs, _ = flowers
    rec = json.loads(open(recs["logreg"]).read())
    shutil.copy(os.path.join(os.path.dirname(recs["logreg"]), rec["file"]), tmp_path / rec["file"])
    (tmp_path / "logreg.json").write_text(json.dumps({**rec, "cache_path": str(tmp_path / "gone.h5")}))
    runner = find.open_model(str(tmp_path / "logreg.json"))
    assert runner.kind == "sklearn" and "gone.h5 is gone" in runner.notes[0]
    assert "its weights cannot be checked" in runner.notes[0]
    files, _, want = cached_scores(recs["logreg"], cache_path)
    results, problems = predict.label(runner, files, top_k=5)
    assert not problems
    for r, row in zip(results, want):
        assert r["top"][0][1] == pytest.approx(row.max(), abs=1e-5)
    # trained on CACHE=...: its record does not say how the features were made
    (tmp_path / "logreg.json").write_text(json.dumps({**rec, "cache_path": str(tmp_path / "gone.h5"),
                                                      "config": {**rec["config"], "cache": "x.h5"}}))
    with pytest.raises(PipelineError, match="trained on CACHE=x.h5, so its record does not say"):
        find.open_model(str(tmp_path / "logreg.json"))


def test_an_extractor_with_other_weights_than_the_cache_is_refused(flowers, monkeypatch):
    _, recs, _ = flowers
    monkeypatch.setattr(backbones, "weights_digest", lambda model: "0" * 64)
    with pytest.raises(PipelineError, match="other weights .* than the cache was made with"):
        find.open_model(recs["dense"])
