"""One frozen config dataclass per step; each field is a CLI option and a make variable.

``help`` metadata is the option's one-line help. Field ``foo_bar`` is ``--foo-bar`` and ``FOO_BAR=``. This
module imports nothing heavy: ``--help`` and the listings read it without TensorFlow or scikit-learn.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb limit
SCORINGS = ("accuracy", "balanced_accuracy", "f1_macro", "neg_log_loss")
FLIPS = ("horizontal", "vertical", "horizontal_and_vertical", "none")
OPTIMIZERS = ("adam", "sgd")
MONITORS = ("val_accuracy", "val_loss")  # what picks the fine-tune's best epoch
UNFREEZE_HELP = ("a layer name or block prefix onwards (block_16, block5_conv1), N (the last N layers), "
                 "a fraction (0.3 of the layers), blocks:N (the last N blocks), all, none")
BENCH_SECTIONS = ("overhead", "caching", "ceiling", "memory", "noop", "quality", "headloop", "peer")
BENCH_OPT_IN = ("views", "scale", "audit", "export")  # long sections, run only when SECTIONS names them
# fine-tuning's defaults before the phase-2 schedule was measured (README: fine-tuning defaults)
OLD_FINETUNE = "old defaults: UNFREEZE=blocks:2 FINETUNE_LR=1e-5 SCHEDULE=constant"
DEFAULT_QUALITY = ("efficientnet_lite0::imagenet,"
                   "mobilenet_v2:0.35:{shared}/weights/mobilenet_v2_0.35_224_no_top.weights.h5,"
                   "mobilenet:0.25:{shared}/weights/keras/models/mobilenet_2_5_224_tf_no_top.h5")
DEFAULT_VIEWS_BENCH = ("efficientnet_lite0::imagenet,"
                       "mobilenet_v2:0.35:{shared}/weights/mobilenet_v2_0.35_224_no_top.weights.h5")


def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class FeaturesConfig:
    """Options of ``features``: which images, which frozen backbone, how to pool and store."""

    data: str = opt("digits", "class-folder tree (optionally train/val/test trees) or built-in: digits")
    backbone: str = opt("efficientnet_lite0", "backbone name (see `python -m pipeline backbones`)")
    weights: str = opt("imagenet", "imagenet (Keras cache / package), none (random), or a weights file")
    size: int = opt(0, "input size in pixels (0 = the backbone's default)")
    alpha: float = opt(0.0, "width multiplier for MobileNet families (0 = the family's default)")
    pooling: str = opt("avg", "avg | max | flatten | gem (generalised mean of the last feature map, exponent GEM_P)")
    gem_p: float = opt(3.0, "POOLING=gem: the exponent p of mean(x^p)^(1/p) (1 = avg; large tends to max); part of "
                            "the cache key only with POOLING=gem")
    interpolation: str = opt("bilinear", "resize: nearest | bilinear | bicubic | lanczos | area")
    dtype: str = opt("float32", "stored feature dtype: float32 | float16")
    precision: str = opt("float32", "backbone compute: float32 | bfloat16 | float16 (Keras mixed precision; "
                                    "a win only on hardware with fast bfloat16/float16, see make bench)")
    fold_batchnorm: bool = opt(True, "fold frozen BatchNorm into the convolution before it (faster; "
                                     "features equal to float rounding, ~1e-5)")
    runtime: str = opt("tensorflow", "what runs the backbone at extraction: tensorflow | openvino (pip install "
                                     "'pipeline[openvino]'; PRECISION is then its CPU precision hint)")
    batch: int = opt(32, "images per backbone call")
    chunk: int = opt(256, "rows per HDF5 chunk and flush (rounded up to a multiple of BATCH)")
    val_fraction: float = opt(0.15, "share of each class for validation (folder trees without split dirs)")
    test_fraction: float = opt(0.15, "share of each class for testing")
    seed: int = opt(0, "seed of the split and of random (weights=none) backbones")
    per_class: int = opt(0, "use at most this many images per class (0 = all), for quick runs")
    max_pixels: int = opt(MAX_PIXELS, "skip images with more pixels than this")
    cache_dir: str = opt("cache", "where cache files are written")
    wait: bool = opt(True, "wait for another run writing the same cache file (0: fail at once)")
    views: int = opt(0, "augmented views of every train image cached beside its clean row (0 = none); the "
                        "augmentation is FLIP, ROTATION, ZOOM, CONTRAST, drawn per (image content, view, SEED)")
    flip: str = opt("horizontal", "augmentation (views, fine-tuning): " + " | ".join(FLIPS))
    rotation: float = opt(0.1, "augmentation (views, fine-tuning): random rotation, fraction of a full turn (0 = off)")
    zoom: float = opt(0.1, "augmentation (views, fine-tuning): random zoom in/out, fraction of the size (0 = off)")
    contrast: float = opt(0.1, "augmentation (views, fine-tuning): random contrast factor (0 = off)")
    tta: bool = opt(False, "test-time augmentation: also cache a horizontally flipped row of every val and test "
                           "image (groups val_tta, test_tta); heads then report test accuracy with TTA too")
    keras_home: str = opt("", "Keras cache folder (its models/ holds ImageNet weights); default $KERAS_HOME or ~/.keras")
    engine: str = opt("inprocess", "who runs the backbone: inprocess (this process) | ray (shards over a Ray "
                                   "cluster's actors, one per GPU; `pip install -e '.[ray]'`)")
    ray_address: str = opt("", "ENGINE=ray: the cluster (auto, host:port; default $RAY_ADDRESS, else a local cluster)")
    workers: int = opt(0, "ENGINE=ray: extractor actors (0 = one per GPU of the cluster, else one per 4 CPUs)")
    shard: int = opt(1024, "ENGINE=ray: rows per shard (rounded up to a multiple of CHUNK)")


@dataclass(frozen=True)
class HeadConfig(FeaturesConfig):
    """Options of ``head`` and ``sweep``: the features options select the cache; the rest the head."""

    head: str = opt("logreg", "head to train (see `python -m pipeline heads`)")
    cache: str = opt("", "cache file to train on (skips resolving it from the features options)")
    extract: bool = opt(True, "make the cache when it is missing (0: fail, naming the make features command)")
    head_seed: int = opt(0, "seed of the head: initial weights, shuffling, CV folds")
    models_dir: str = opt("models", "where heads are saved (<models>/<cache>/<head>.json + model file)")
    reports_dir: str = opt("reports", "where metrics and plots go (<reports>/<cache>/<head>/)")
    heads: str = opt("all", "sweep: comma list of heads (all = every head)")
    backbones: str = opt("", "sweep: comma list of backbones (each may be an ensemble a+b), every one swept over "
                             "HEADS into one backbone x head leaderboard (empty = BACKBONE only)")
    cv: int = opt(5, "sweep: stratified folds over train+val")
    scoring: str = opt("accuracy", "sweep: " + " | ".join(SCORINGS))
    jobs: int = opt(-1, "sweep: parallel fits through joblib (-1 = every core)")
    memory_budget: str = opt("2GiB", "a cache whose rows, as float64, exceed this is read from disk a block at a "
                                     "time: logreg then streams (SGD), dense reads batches, the others refuse")
    calibrate: str = opt("none", "after fitting: none | temperature (fitted on val, stored in the head's record, "
                                 "applied by predict and the exports)")
    reject_recall: float = opt(0.95, "unknown images: a threshold on the max calibrated probability keeping this "
                                     "share of known val images, stored in the record (0 = none)")


def _like(cls, name):
    """A field of ``cls`` again, with its default and help (an option shared by two steps' configs)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return opt(f.default, f.metadata["help"])


@dataclass(frozen=True)
class AuditConfig(FeaturesConfig):
    """Options of ``audit``: the features options select the cache (as for ``head``); the rest the checks."""

    cache: str = _like(HeadConfig, "cache")
    extract: bool = _like(HeadConfig, "extract")
    memory_budget: str = _like(HeadConfig, "memory_budget")
    head_seed: int = _like(HeadConfig, "head_seed")
    reports_dir: str = opt("reports", "where the audit goes (<reports>/<cache>/audit/)")
    folds: int = opt(5, "label issues: stratified folds of the out-of-fold probabilities over train+val")
    neighbours: int = opt(10, "outliers and unknown-image scores: nearest neighbours in feature space (cosine)")
    near_quantile: float = opt(0.01, "near-duplicates: a val/test image is one when it is closer to a train image "
                                     "than this quantile of the train images' nearest-neighbour distances ...")
    near_fraction: float = opt(0.5, "... times this fraction (0 = no near-duplicate check)")
    reject_recall: float = opt(0.95, "unknown-image rejection: the share of known val images kept by the threshold")
    show: int = opt(24, "images shown per table on the page")


@dataclass(frozen=True)
class FinetuneConfig(HeadConfig):
    """Options of ``finetune``: the features options select the cache, the head options its dense head (its
    hyper-parameters are free NAME=value options as for ``head``); the rest shape phase 2."""

    head: str = opt("dense", "the cached head put on top: dense (trained on the cache first when missing)")
    unfreeze: str = opt("0.4", "backbone layers trained: " + UNFREEZE_HELP)
    finetune_epochs: int = opt(15, "fine-tuning epochs at most (early stopping on FINETUNE_MONITOR)")
    finetune_lr: float = opt(3e-4, "fine-tuning learning rate: the peak of the cosine schedule (README: measured)")
    optimizer: str = opt("adam", "adam (AdamW with WEIGHT_DECAY) | sgd (with MOMENTUM)")
    momentum: float = opt(0.9, "SGD momentum")
    schedule: str = opt("cosine", "phase-2 rate: cosine (linear warmup from 0 to FINETUNE_LR, then cosine decay to 0 "
                                  "at the last step of FINETUNE_EPOCHS) | constant (FINETUNE_LR throughout)")
    warmup: float = opt(0.1, "cosine schedule: fraction of phase 2's steps spent warming up")
    weight_decay: float = opt(0.0, "decoupled weight decay (biases excluded; OPTIMIZER=adam with it is AdamW)")
    label_smoothing: float = opt(0.0, "label smoothing of the fine-tuning loss (its val loss, and the head-only "
                                      "baseline's, are then smoothed too)")
    finetune_monitor: str = opt("val_accuracy", "what picks the best epoch, must beat the head alone and stops "
                                                "early: val_accuracy (ties: the first) | val_loss")
    finetune_patience: int = opt(4, "epochs without improvement before stopping (best weights kept); with "
                                    "SCHEDULE=cosine no epoch counts until the rate has fallen to a quarter of "
                                    "its peak (the defaults then always run all FINETUNE_EPOCHS)")
    resume: bool = opt(True, "resume an interrupted fine-tune from its backup (0: start over)")
    verbose: int = opt(1, "Keras progress: 1 = progress bars on a terminal (else as 2), 2 = one line per epoch, "
                          "0 = off")


@dataclass(frozen=True)
class PredictConfig:
    """Options of ``predict``: which images, which model (fine-tuned, any head, an export), how many labels each."""

    images: str = opt("", "image files and/or folders, space-separated (quote paths with spaces); "
                          "bare arguments are added")
    model: str = opt("", "a model record (.json: fine-tuned model, any head, an export), its model file or "
                         "folder (default: the newest <MODELS_DIR>/*/finetune.json, else the last sweep's "
                         "best.json, else the newest head)")
    models_dir: str = opt("models", "where make finetune, head and sweep saved their models")
    top_k: int = opt(3, "labels shown per image (most probable first)")
    batch: int = opt(32, "images per model call")
    output: str = opt("", "also write the predictions to this file (.json, else tab-separated)")


EXPORT_FORMATS = ("keras", "tf_saved_model", "onnx", "litert", "openvino")


@dataclass(frozen=True)
class ExportConfig:
    """Options of ``export``: which model, which format, where; the images it is verified on."""

    model: str = opt("", "the fine-tuned model, a dense or linear (logreg, linear_svm) head: its record, model "
                         "file or folder (default as for predict)")
    format: str = opt("keras", " | ".join(EXPORT_FORMATS))
    out: str = opt("", "the record to write (.json) or a folder (default: <the model's folder>/export/)")
    images: str = opt("", "verify on these image files/folders (default: test images of the model's cache)")
    verify_images: int = opt(64, "images the export is verified on, at most")
    tolerance: float = opt(1e-4, "largest absolute difference allowed between the artifact's and the Keras "
                                 "model's probabilities")
    score_tolerance: float = opt(1e-3, "decision values (linear SVM): largest difference allowed, relative to "
                                       "the largest |value| (at least 1)")
    models_dir: str = opt("models", "where make finetune, head and sweep saved their models")
    batch: int = opt(32, "images per model call")
    quantize: str = opt("none", "none | float16 | dynamic | int8 | int8_io (litert: all, int8_io with int8 input "
                                "and output; onnx: dynamic, int8, float16 with onnxconverter-common; openvino: "
                                "float16, int8 with nncf)")
    representative: int = opt(100, "QUANTIZE=int8 or int8_io: train images of the cache it is calibrated on")
    judge: bool = opt(False, "judge a float export on the whole test split too (quantised ones always are)")
    min_accuracy: float = opt(0.0, "refuse (exit 2) an export whose test accuracy (a fraction) is below this")
    max_drop: float = opt(100.0, "refuse (exit 2) an export more than this many points below the float model's "
                                 "test accuracy")
    latency_runs: int = opt(5, "judgement: timed runs per latency figure, each >= 0.2 s of calls (median reported)")


@dataclass(frozen=True)
class BenchConfig(FeaturesConfig):
    """Options of ``bench``: the features options pick data, backbone, size and batch; these the runs."""

    n: int = opt(512, "images for the speed sections (overhead, caching, memory, noop)")
    repeats: int = opt(3, "timed repeats of every figure (the median is reported, with min and max)")
    warmup: int = opt(1, "untimed runs before the timed ones")
    sections: str = opt(",".join(BENCH_SECTIONS), "comma list of sections: " + ", ".join(BENCH_SECTIONS)
                        + "; only when named: " + ", ".join(BENCH_OPT_IN))
    memory_factor: int = opt(10, "memory: the large run has this many times N images")
    memory_repeats: int = opt(1, "memory: runs at each size (peak RSS hardly varies; each run is a whole command)")
    matmul: int = opt(2048, "ceiling: side of the square float32 matrices multiplied")
    quality: str = opt(DEFAULT_QUALITY, "quality: comma list of backbone:alpha:weights ({shared} = the shared "
                                         "assets folder, $PIPELINE_SHARED or ../shared)")
    quality_heads: str = opt("logreg,linear_svm,dense", "quality: heads fitted on train; the best on val counts")
    raw_size: int = opt(32, "quality: side of the raw-pixel baseline's images")
    seeds: str = opt("", "quality: comma list of split seeds (e.g. 0,1,2): mean and spread over them of the best "
                         "single backbone, the best ensemble, each pooling and (FINETUNE=1) the fine-tune")
    poolings: str = opt("avg,gem", "quality with SEEDS: the poolings of BACKBONE compared")
    finetune: bool = opt(False, "quality: also fine-tune BACKBONE (slow)")
    finetune_compare: str = opt(OLD_FINETUNE + "; new defaults:", "quality: fine-tuning runs compared (FINETUNE=1), "
                                "'label: NAME=value ...' separated by ';' (new defaults: no options)")
    finetune_args: str = opt("", "quality: more NAME=value options of the finetune step, space-separated, "
                                 "e.g. 'FINETUNE_EPOCHS=2 UNFREEZE=blocks:1'")
    views_backbones: str = opt(DEFAULT_VIEWS_BENCH, "views: comma list of backbone:alpha:weights (as QUALITY)")
    views_counts: str = opt("0,4,8", "views: the VIEWS compared (one cache of the largest serves the others)")
    views_epochs: int = opt(20, "views: epochs of the dense heads and of the guide's end-to-end fit")
    scale_max: int = opt(100_000, "scale: the largest synthetic cache, in rows (10000, 100000 or 1000000)")
    scale_images_max: int = opt(100_000, "scale: the largest synthetic JPEG tree extracted, in images, at most "
                                 "SCALE_MAX (powers of ten from 1/100 of it; 0 = none)")
    audit_data: str = opt("{shared}/datasets/flowers5", "audit: the class-folder tree audited ({shared} as QUALITY)")
    audit_backbone: str = opt("", "audit: BACKBONE of its features, an ensemble a+b too (empty = BACKBONE)")
    audit_noise: float = opt(0.05, "audit: share of train+val labels flipped at random")
    audit_seeds: int = opt(3, "audit: seeds of the label flips (figures are their mean)")
    audit_split_seeds: str = opt("0,1,2", "audit: split seeds the heads' calibration is measured on (figures are "
                                          "their mean; the other measurements use SEED's split)")
    audit_plant: int = opt(10, "audit: train images planted into test as copies (exact, resized, JPEG)")
    export_data: str = opt("digits,{shared}/datasets/flowers5", "export: comma list of datasets (built-in or "
                           "class-folder trees, {shared} as QUALITY), a head on BACKBONE's features of each")
    export_head: str = opt("logreg", "export: the head exported (logreg, linear_svm or dense)")
    export_formats: str = opt("litert,onnx,openvino", "export: comma list of FORMAT (every QUANTIZE it has) or "
                              "FORMAT:MODE+MODE; the float32 export (none) always runs, the reference")
    export_representative: int = _like(ExportConfig, "representative")
    memory_budget: str = _like(HeadConfig, "memory_budget")
    reports_dir: str = opt("reports", "where bench-<date>.json and .md are written")
    tag: str = opt("", "suffix of the report names, e.g. before / after")


def fields(cls):
    return {f.name: f for f in dataclasses.fields(cls)}


def replace(cfg, **changes):
    return dataclasses.replace(cfg, **changes)


def asdict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def narrow(cfg, cls):
    """The ``cls`` config holding ``cfg``'s values of ``cls``'s fields (e.g. the features options of a head
    config)."""
    return cls(**{n: getattr(cfg, n) for n in fields(cls)})
