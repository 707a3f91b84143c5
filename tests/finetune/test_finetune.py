"""``finetune``: unfreeze policies and parameter counts, BatchNorm frozen through a fit step, the model
starting from the cached head, an interrupted run resumed, reports and the export."""

import dataclasses
import json
import os
import subprocess

import keras
import numpy as np
import pytest
from conftest import MOBILENET_V2_FILE, ROOT, flowers_subset

from pipeline import cli, finetune, records
from pipeline.backbones import registry as backbones
from pipeline.cache import store
from pipeline.configs import FinetuneConfig
from pipeline.errors import PipelineError
from pipeline.finetune import artifact, unfreeze
from pipeline.finetune import job as ft_job
from pipeline.finetune import model as ft_model
from pipeline.finetune import train as ft_train
from pipeline.heads import artifacts, dense

N_CLASSES = 3


# --- structure: a random-weights MobileNetV2 (alpha 0.35) at 32 px ---------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    spec = backbones.get("mobilenet_v2")
    base = backbones.build_base(spec, 32, "none", alpha=0.35)
    keras.utils.set_random_seed(0)
    head = dense.build_model(1280, N_CLASSES, ())
    model = ft_model.build_model(spec, 32, base, "avg", head, ft_model.augmentation(seed=0))
    return spec, base, head, model


def n_params(weights):
    return sum(int(np.prod(w.shape)) for w in weights)


def non_bn_params(layers):
    return sum(n_params(layer.weights) for layer in layers if not isinstance(layer, keras.layers.BatchNormalization))


@pytest.mark.slow
def test_fit_step_with_partial_unfreeze_keeps_batchnorm_and_frozen_weights(tiny):
    spec, base, head, model = tiny
    info = unfreeze.apply_unfreeze(base, spec, unfreeze.parse_unfreeze("block_16"))
    assert info["from_layer"] == "block_16_expand" and info["batchnorm_frozen"] == 52
    ft_model.compile_model(model, "adam", 1e-3)
    bns = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and not any(layer.trainable for layer in bns)
    convs = [layer for layer in base.layers if hasattr(layer, "kernel") or hasattr(layer, "depthwise_kernel")]
    unfrozen = [layer.name for layer in convs if layer.name.startswith(("block_16_", "Conv_1"))]
    assert unfrozen == ["block_16_expand", "block_16_depthwise", "block_16_project", "Conv_1"]
    before = {w.path: w.numpy().copy() for w in model.weights}
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, 32, 32, 3)).astype(np.uint8)
    y = np.arange(8) % N_CLASSES
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    changed = {w.path for w in model.weights if not np.array_equal(before[w.path], w.numpy())}
    for layer in bns:  # moving statistics (and gamma/beta) untouched, in the unfrozen block too
        for w in (layer.moving_mean, layer.moving_variance, layer.gamma, layer.beta):
            assert w.path not in changed, w.path
    for layer in convs:
        kernel = layer.kernel if hasattr(layer, "kernel") else layer.depthwise_kernel
        assert (kernel.path in changed) == (layer.name in unfrozen), layer.name
    assert model.get_layer("dense_head").get_layer("head_output").kernel.path in changed
    # the head in the model is a copy: the cached head itself keeps its weights
    assert np.array_equal(before[head.get_layer("head_output").kernel.path], head.get_layer("head_output").kernel)
    expected = non_bn_params([layer for layer in base.layers if layer.name.startswith(("block_16_", "Conv_1"))])
    assert unfreeze.count_params(model)["trainable"] == expected + n_params(head.weights)


@pytest.mark.slow
def test_trainable_counts_follow_each_policy(tiny):
    spec, base, head, model = tiny
    layers = unfreeze.backbone_layers(base)
    head_n = n_params(head.weights)
    bn_stats = sum(2 * layer.moving_mean.shape[0] for layer in layers
                   if isinstance(layer, keras.layers.BatchNormalization))
    top = [layer for layer in layers if layer.name.startswith(("block_16_", "Conv_1", "out_relu"))]
    expected = {
        "none": head_n,
        "all": non_bn_params(layers) + head_n,
        "3": 112 * 1280 + head_n,  # Conv_1, Conv_1_bn, out_relu: only Conv_1's 1x1 kernel (no bias) trains
        "layers:3": 112 * 1280 + head_n,
        "block_16": non_bn_params(top) + head_n,
        "blocks:2": non_bn_params(top) + head_n,  # block_16 and Conv_1
        "block_1": non_bn_params([layer for layer in layers if layer.name.startswith(("block_", "Conv_1"))])
                   + head_n,  # block_1 onwards, not block_16 only
        "0.5": non_bn_params(layers[-round(0.5 * len(layers)):]) + head_n,
        "Conv_1": 112 * 1280 + head_n,
    }
    assert len(set(expected.values())) == 6
    for text, count in expected.items():
        unfreeze.apply_unfreeze(base, spec, unfreeze.parse_unfreeze(text))
        assert unfreeze.count_params(model)["trainable"] == count, text
    rows = unfreeze.parameter_table(model, base, spec, unfreeze.parse_unfreeze("block_16"))
    total = n_params(model.weights)
    assert [r["total"] for r in rows] == [total] * 3
    assert rows[0]["trainable"] == total - bn_stats  # Keras' default: everything, BatchNorm gamma/beta included
    assert rows[1]["trainable"] == head_n and rows[1]["non_trainable"] == n_params(base.weights)
    assert rows[2]["trainable"] == expected["block_16"] and "from block_16_expand" in rows[2]["configuration"]
    assert unfreeze.count_params(model)["trainable"] == expected["block_16"]  # the chosen policy stays applied


@pytest.mark.slow
def test_unknown_unfreeze_name_lists_the_block_names(tiny):
    spec, base, _, _ = tiny
    with pytest.raises(PipelineError) as e:
        unfreeze.apply_unfreeze(base, spec, unfreeze.parse_unfreeze("block5"))
    msg = str(e.value)
    assert msg.startswith("UNFREEZE='block5': no layer or block of that name in mobilenet_v2; its blocks: ")
    assert "expanded_conv, block_1, block_2," in msg and "block_16, Conv_1" in msg
    for bad in ("blocks:0", "1.5", "-2", "layers:x"):
        with pytest.raises(PipelineError, match="UNFREEZE="):
            unfreeze.parse_unfreeze(bad)
    with pytest.raises(PipelineError, match="has 19 blocks"):
        unfreeze.apply_unfreeze(base, spec, unfreeze.parse_unfreeze("blocks:20"))


# --- end to end: a flowers5 subset, the real MobileNetV2 0.35 weights at 48 px --------------------------------

@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    flowers_subset(root / "data", per_class=8)
    cfg = FinetuneConfig(
        data=str(root / "data"), backbone="mobilenet_v2", weights=str(MOBILENET_V2_FILE), alpha=0.35, size=48,
        val_fraction=0.25, test_fraction=0.25, batch=8, cache_dir=str(root / "cache"),
        models_dir=str(root / "models"), reports_dir=str(root / "reports"), unfreeze="block_16",
        finetune_epochs=2, finetune_lr=1e-4, finetune_patience=5, verbose=0)
    return root, cfg, {"EPOCHS": "30"}


@pytest.mark.slow
def test_the_model_starts_from_the_cached_head(flowers):
    root, cfg, extra = flowers
    msgs = []
    job = ft_job.prepare(cfg, extra, log=msgs.append)
    assert any("training the dense head on the cache" in m for m in msgs)
    val = job.cache.splits["val"]
    assert [job.plan.ds.items[i].relpath for i in job.split("val")] == list(val.paths)
    cached = job.head.predict_proba(val.features)
    end_to_end = artifact.probabilities(artifact.compiled(job.model, job.size), job.images("val"))
    assert cached.shape == end_to_end.shape == (len(val.labels), 5)
    assert cached.std(axis=0).max() > 1e-2  # real, varied predictions
    np.testing.assert_allclose(end_to_end, cached, atol=2e-5)


class Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise KeyboardInterrupt


@pytest.mark.slow
def test_interrupted_fine_tune_resumes_then_reports_and_exports(flowers):
    root, cfg, extra = flowers
    with pytest.raises(KeyboardInterrupt):
        finetune.run(cfg, extra, log=lambda m: None, callbacks=[Interrupt()])
    stem = next(p for p in (root / "models").iterdir() if p.is_dir()).name  # not the .lock files beside it
    run_dir = root / "models" / stem / "finetune-run"
    assert json.loads((run_dir / "backup" / "training_metadata.json").read_text())["epoch"] == 1
    msgs = []
    out = finetune.run(cfg, extra, log=msgs.append)
    text = "\n".join(msgs)
    assert "training the dense head" not in text  # the saved one is loaded
    assert any(m.startswith("phase 1: dense head HIDDEN=none") and " from " in m for m in msgs)
    assert "resuming the interrupted fine-tune at epoch 2 of 2" in text
    assert out["result"]["resumed_at"] == 1 and [r["epoch"] for r in out["result"]["rows"]] == [0, 1]
    assert not (run_dir / "backup").exists()  # a finished fit removes its backup
    assert "head only (phase 1, on cached features) vs fine-tuned" in text and "test accuracy" in text
    assert "parameters of mobilenet_v2 (alpha 0.35) @48 + dense head" in text

    reports = root / "reports" / stem / "finetune"
    assert sorted(os.listdir(reports)) == ["confusion.png", "curves.png", "history.json", "metrics.json"]
    hist = json.loads((reports / "history.json").read_text())
    dense = artifacts.load_head(str(root / "models" / stem / "dense.json"))
    n1 = len(dense.history_["loss"])
    assert hist["phase2_start"] == n1 and len(hist["combined"]["val_accuracy"]) == n1 + 2
    assert hist["combined"]["loss"][:n1] == dense.history_["loss"]
    m = json.loads((reports / "metrics.json").read_text())
    assert m["epochs"] == 2 and m["test"]["n"] == len(store.load(out["job"].cache.path).splits["test"].labels)
    assert "top_3_accuracy" in m["test"]
    dense_rec = json.loads((root / "models" / stem / "dense.json").read_text())
    assert m["head_only"] == {s: dense_rec["metrics"][s] for s in ("val", "test")}  # phase 1, untouched
    assert f"{m['test']['accuracy']:.4f}" in text

    rec = json.loads((root / "models" / stem / "finetune.json").read_text())
    assert rec["format"] == artifact.FORMAT and rec["classes"] == ["daisy", "dandelion", "rose", "sunflower", "tulip"]
    assert rec["file"] == f"finetune-{rec['sha256'][:12]}.keras"
    assert rec["input_size"] == 48 and rec["sha256"] == records.file_digest(root / "models" / stem / rec["file"])
    assert rec["config"]["unfreeze"] == "block_16" and rec["metrics"] == m and {"keras", "tensorflow"} <= set(
        rec["versions"])
    # the exported file, reloaded, predicts as the in-memory model on raw images
    job = out["job"]
    loaded, _ = artifact.load(str(root / "models" / stem))
    pixels = np.concatenate([x.numpy() for x in job.images("test")])
    np.testing.assert_allclose(artifact.probabilities(artifact.compiled(loaded, 48), [pixels]),
                               artifact.probabilities(job.call, [pixels]), atol=1e-6)


@pytest.mark.slow
def test_a_fine_tune_that_never_beats_the_head_returns_exactly_the_head_only_weights(flowers):
    """The promise kept with public Keras API only: every epoch worse on val (a rate that wrecks the weights)
    -> after fit the model holds the head-only weights, bit for bit."""
    root, cfg, extra = flowers
    wreck = dataclasses.replace(cfg, optimizer="sgd", finetune_lr=50.0, momentum=0.0, unfreeze="all",
                                finetune_epochs=2, finetune_patience=5, resume=False,
                                finetune_monitor="val_loss")  # a wrecked model can guess a tiny val set right
    job = ft_job.prepare(wreck, extra, log=lambda m: None)
    initial = job.model.get_weights()
    msgs = []
    result = ft_train.train(job, log=msgs.append)
    assert len(result["rows"]) == 2 and result["best_epoch"] == -1
    assert not any(r["val_loss"] < result["baseline"]["val_loss"] for r in result["rows"])
    assert any("keeping the head-only weights" in m for m in msgs)
    after = job.model.get_weights()
    assert len(after) == len(initial)
    for a, b in zip(after, initial):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_cli_unknown_unfreeze_fails_in_one_line_before_any_work(flowers, capsys, tmp_path):
    root, cfg, _ = flowers
    args = [f"{k.upper()}={v}" for k, v in (("data", cfg.data), ("backbone", "mobilenet_v2"), ("weights", "none"),
                                            ("alpha", 0.35), ("size", 32), ("cache_dir", tmp_path / "c"))]
    assert cli.main(["finetune", *args, "UNFREEZE=block_99"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: UNFREEZE='block_99': no layer or block") and "block_16, Conv_1" in err
    assert len(err.splitlines()) == 1 and not list((tmp_path / "c").glob("*.h5"))
    assert cli.main(["finetune", *args, "OPTIMIZER=rmsprop"]) == 2
    assert "unknown optimizer 'rmsprop'; valid: adam, sgd" in capsys.readouterr().err
    assert cli.main(["finetune", *args, "HEAD=svm"]) == 2
    assert "valid: dense" in capsys.readouterr().err
    assert cli.main(["finetune", *args, "PRECISION=bfloat16"]) == 2
    assert "PRECISION=bfloat16: fine-tuning trains in float32" in capsys.readouterr().err


def test_make_passes_finetune_options_and_head_parameters():
    out = subprocess.run(["make", "-n", "finetune", "UNFREEZE=block_16", "FINETUNE_LR=1e-4", "HIDDEN=64"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "-m pipeline finetune 'FINETUNE_LR=1e-4' 'HIDDEN=64' 'UNFREEZE=block_16'" in out
    cfg, extra = cli.parse("finetune", cli._steps()["finetune"], ["FINETUNE_LR=1e-4", "HIDDEN=64", "UNFREEZE=all"])
    assert cfg.finetune_lr == 1e-4 and cfg.unfreeze == "all" and cfg.head == "dense" and extra == {"HIDDEN": "64"}


@pytest.mark.slow
def test_backbone_stays_in_inference_mode_inside_fit():
    """EfficientNet's drop-connect Dropout layers must not switch on when fit calls with training=True."""
    spec = backbones.get("efficientnet_b0")
    base = backbones.build_base(spec, 32, "none")
    assert any(isinstance(layer, keras.layers.Dropout) for layer in base.layers)
    head = dense.build_model(1280, N_CLASSES, ())
    model = ft_model.build_model(spec, 32, base, "avg", head)
    unfreeze.apply_unfreeze(base, spec, unfreeze.parse_unfreeze("all"))
    features = keras.Model(model.inputs, model.get_layer("avg_pool").output)
    x = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)
    inferred = keras.ops.convert_to_numpy(features(x, training=False))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(features(x, training=True)), inferred, rtol=1e-4, atol=0)
    # and the plain call that Keras 3 overrides does differ: what the wrapper prevents
    raw = keras.ops.convert_to_numpy(base(keras.ops.cast(x, "float32"), training=True))
    plain = keras.ops.convert_to_numpy(base(keras.ops.cast(x, "float32"), training=False))
    assert not np.allclose(raw, plain, rtol=1e-4, atol=0)


# --- phase 2's rate schedule, AdamW, label smoothing ----------------------------------

class RateLog(keras.callbacks.Callback):
    """The optimizer's rate at the start of every training step (the rate that step uses)."""

    def __init__(self):
        super().__init__()
        self.rates = []

    def on_train_batch_begin(self, batch, logs=None):
        self.rates.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))


def test_cosine_schedule_warms_up_linearly_then_decays_to_zero_read_from_the_optimizer_during_fit():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(N_CLASSES, activation="softmax")])
    peak, total, warmup = 1e-3, 10, 0.2  # 2 warmup steps, then 8 of cosine decay
    ft_model.compile_model(model, "adam", peak, schedule="cosine", warmup=warmup, total_steps=total)
    x, y = np.random.default_rng(0).normal(size=(20, 4)).astype("float32"), np.arange(20) % N_CLASSES
    log = RateLog()
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[log])  # ceil(20 / 4) * 2 = 10 steps
    rates = np.array(log.rates)
    assert len(rates) == total
    assert rates[0] == 0.0 and np.isclose(rates[1], peak / 2) and np.isclose(rates[2], peak)  # warmup, peak
    assert rates.argmax() == 2 and np.all(np.diff(rates[2:]) < 0)  # then decreasing every step
    np.testing.assert_allclose(rates[2:], peak * 0.5 * (1 + np.cos(np.pi * np.arange(8) / 8)), rtol=1e-5)
    assert float(model.optimizer.learning_rate) == 0.0  # at the end of the schedule
    constant = ft_model.compile_model(model, "adam", peak, schedule="constant", total_steps=total)
    assert np.isclose(float(constant.optimizer.learning_rate), peak)
    for bad, match in ((dict(schedule="linear"), "unknown schedule 'linear'; valid: constant, cosine"),
                       (dict(warmup=1.0), r"WARMUP=1.0: must be in \[0, 1\)"),
                       (dict(label_smoothing=-0.1), "LABEL_SMOOTHING=-0.1"),
                       (dict(weight_decay=2.0), "WEIGHT_DECAY=2.0")):
        with pytest.raises(PipelineError, match=match):
            ft_model.compile_model(model, "adam", peak, **bad)


def test_progress_bars_only_on_a_terminal(tmp_path):
    main, follower = os.openpty()
    with open(follower, "w") as tty, open(tmp_path / "log", "w") as log:
        assert [dense.fit_verbose(v, tty) for v in (0, 1, 2)] == [0, 1, 2]
        assert [dense.fit_verbose(v, log) for v in (0, 1, 2)] == [0, 2, 2]
    os.close(main)


def test_optimizers_adamw_decays_weights_but_not_biases():
    assert type(ft_model.make_optimizer("adam", 1e-3)) is keras.optimizers.Adam
    assert type(ft_model.make_optimizer("sgd", 1e-3, momentum=0.5)) is keras.optimizers.SGD
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, kernel_initializer="ones",
                                                                    bias_initializer="ones")])
    ft_model.compile_model(model, "adam", 0.1, weight_decay=0.5)
    assert type(model.optimizer) is keras.optimizers.AdamW and model.optimizer.weight_decay == 0.5
    zero = [np.zeros((3, 2), "float32"), np.zeros(2, "float32")]
    model.optimizer.apply(zero, model.trainable_variables)  # zero gradients: only the decay moves weights
    np.testing.assert_allclose(model.layers[0].kernel.numpy(), 1 - 0.5 * 0.1, rtol=1e-6)
    np.testing.assert_array_equal(model.layers[0].bias.numpy(), 1.0)


@pytest.mark.slow
def test_phase2_schedule_steps_label_smoothing_plain_progress_lines_and_the_resume_identity(flowers, capsys):
    root, cfg, extra = flowers
    smooth = dataclasses.replace(cfg, label_smoothing=0.2, warmup=0.3, resume=False, finetune_epochs=2,
                                 weight_decay=0.01, verbose=1)
    job = ft_job.prepare(smooth, extra, log=lambda m: None)
    n_train = len(job.split("train"))
    assert ft_train.steps_per_epoch(job) == -(-n_train // cfg.batch) and ft_train.total_steps(job) == 2 * (
        -(-n_train // cfg.batch))
    log, msgs = RateLog(), []
    capsys.readouterr()
    result = ft_train.train(job, callbacks=[log], log=msgs.append)
    out = capsys.readouterr().out  # VERBOSE=1 into what is not a terminal: one plain line per epoch, no bars
    assert out.count("Epoch ") == 2 and "val_loss" in out and not any(c in out for c in "\x1b\x08\r")
    assert len(log.rates) == ft_train.total_steps(job)  # the whole schedule ran: one rate per step
    warm = round(0.3 * ft_train.total_steps(job))
    assert log.rates[0] == 0.0 and np.isclose(max(log.rates), cfg.finetune_lr) and np.argmax(log.rates) == warm
    assert type(job.model.optimizer) is keras.optimizers.AdamW
    assert any("AdamW lr 0.0001 (cosine, warmup 0.3) weight decay 0.01, label smoothing 0.2" in m for m in msgs)
    # the baseline is the head's val loss under the same smoothed loss as the val losses it is compared with
    va = job.cache.splits["val"]
    p = job.head.predict_proba(va.features)
    target = np.eye(5)[va.labels] * 0.8 + 0.2 / 5
    want = float(np.mean(-(target * np.log(np.clip(p, 1e-7, 1))).sum(1)))
    assert np.isclose(result["baseline"]["val_loss"], want, rtol=1e-4)
    assert len(result["rows"]) == 2 and all(np.isfinite(r["val_loss"]) for r in result["rows"])
    # every phase-2 option is part of the identity a backup must match
    ident = ft_train.identity(job)
    for change in (dict(schedule="constant"), dict(warmup=0.1), dict(finetune_epochs=3), dict(weight_decay=0.0),
                   dict(label_smoothing=0.0), dict(finetune_lr=1e-3)):
        assert ft_train.identity(dataclasses.replace(job, cfg=dataclasses.replace(job.cfg, **change))) != ident, change
    constant = dataclasses.replace(job, cfg=dataclasses.replace(job.cfg, schedule="constant"))
    assert ft_train.identity(constant)["schedule_steps"] is None and ft_train.identity(
        dataclasses.replace(constant, cfg=dataclasses.replace(constant.cfg, finetune_epochs=7))) == ft_train.identity(
        constant)  # with a constant rate more epochs can resume a backup


# --- early stopping never ends the run inside its warmup + cosine schedule's high-rate part ----------------------

@pytest.mark.parametrize("epochs,steps,warmup", [(10, 3, 0.1), (10, 50, 0.1), (4, 7, 0.0), (30, 2, 0.3)])
def test_protected_epochs_end_where_the_schedule_has_fallen_to_a_quarter_of_its_peak(epochs, steps, warmup):
    n = ft_model.protected_epochs(epochs, steps, "cosine", warmup)
    rate = ft_model.learning_rate_schedule(1.0, "cosine", epochs * steps, warmup)  # the optimizer's own schedule
    assert 0 < n <= epochs
    assert float(rate(n * steps)) <= ft_model.PROTECT_RATE + 1e-6 < float(rate((n - 1) * steps))
    assert ft_model.protected_epochs(epochs, steps, "constant", warmup) == 0  # nothing decays: nothing to protect


def test_with_the_defaults_the_schedule_runs_to_its_end():
    cfg = FinetuneConfig()
    n = ft_model.protected_epochs(cfg.finetune_epochs, 10, cfg.schedule, cfg.warmup)
    assert n + max(cfg.finetune_patience, 2) >= cfg.finetune_epochs  # the earliest stop is the last epoch


class ConstantVal(keras.callbacks.Callback):
    """The same val loss every epoch (set before EarlyStopping reads it)."""

    def on_epoch_end(self, epoch, logs=None):
        logs["val_loss"], logs["val_accuracy"] = 1.0, 0.5


def test_constant_val_loss_cannot_stop_inside_the_protected_epochs_then_stops():
    cfg = FinetuneConfig(finetune_epochs=10, finetune_patience=1, warmup=0.1)
    stop = ft_train.early_stopping(cfg, steps=5, baseline=0.5)
    assert stop.monitor == "val_accuracy" and cfg.finetune_monitor == "val_accuracy"
    n = ft_model.protected_epochs(10, 5, "cosine", 0.1)
    assert stop.start_from_epoch == n == 7
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(N_CLASSES, activation="softmax")])
    model.compile("sgd", "sparse_categorical_crossentropy")
    x, y = np.zeros((20, 4), "float32"), np.arange(20) % N_CLASSES
    history = model.fit(x, y, batch_size=4, epochs=10, verbose=0, callbacks=[ConstantVal(), stop])
    # the first epoch counted beats Keras' initial best (inf) but not the baseline; the next spends patience 1
    assert len(history.epoch) == n + 2
    unprotected = FinetuneConfig(finetune_epochs=10, finetune_patience=1, schedule="constant")
    history = model.fit(x, y, batch_size=4, epochs=10, verbose=0,
                        callbacks=[ConstantVal(), ft_train.early_stopping(unprotected, 5, 0.5)])
    assert len(history.epoch) == 2  # a constant rate protects nothing


@pytest.mark.slow
def test_a_real_fine_tune_with_a_constant_val_loss_runs_through_its_protected_epochs(flowers):
    """A rate so small that no weight changes: val loss the same every epoch, never better than the head."""
    root, cfg, extra = flowers
    still = dataclasses.replace(cfg, finetune_lr=1e-30, finetune_epochs=10, finetune_patience=1, warmup=0.1,
                                resume=False)
    job = ft_job.prepare(still, extra, log=lambda m: None)
    msgs = []
    result = ft_train.train(job, log=msgs.append)
    n = ft_model.protected_epochs(10, ft_train.steps_per_epoch(job), "cosine", 0.1)
    losses = [r["val_loss"] for r in result["rows"]]
    assert n == 7 and np.ptp(losses) < 1e-6
    assert n + 2 <= len(result["rows"]) <= n + 3 <= 10  # never inside the protected epochs; stops after them
    assert any(f"not stopping before epoch {n + 2}" in m for m in msgs)


def test_the_best_epoch_is_the_first_best_on_the_monitor_that_beats_the_head():
    """Val accuracy climbing while val loss rises (an over-confident fine-tune): the accuracy monitor keeps
    the best-accuracy epoch (the first of equals, the one ModelCheckpoint saved), the loss monitor the head."""
    rows = [{"epoch": 0, "val_loss": 0.49, "val_accuracy": 0.84}, {"epoch": 1, "val_loss": 0.28, "val_accuracy": 0.92},
            {"epoch": 2, "val_loss": 0.30, "val_accuracy": 0.93}, {"epoch": 3, "val_loss": 0.33, "val_accuracy": 0.93}]
    assert ft_train._best(rows, 0.916, "val_accuracy") == (0.93, 2)
    assert ft_train._best(rows, 0.27, "val_loss") == (0.27, -1)
    assert ft_train._best(rows, 0.29, "val_loss") == (0.28, 1)
    assert ft_train._best(rows, 0.95, "val_accuracy") == (0.95, -1)
