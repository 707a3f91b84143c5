"""The heads' standardisation: scikit-learn's StandardScaler with a floor under each feature's scale.

Pooled features often have near-constant dimensions (a channel that almost never fires: on ``digits``, 45 of
efficientnet_lite0's 1280 have a train std below 1e-3, the smallest 8e-6). Dividing by such a std turns any
noise there into huge standardised values, and a linear head folded into one layer (``coef / std``) gets
coefficients 3e4 times wider than its typical one, which 8-bit weights cannot hold: every int8 export collapsed
to chance. Each scale is ``sqrt(std**2 + (floor * median std)**2)``: dimensions with a real spread keep theirs,
near-constant ones no longer dominate."""

from __future__ import annotations

import numpy as np
from sklearn.preprocessing import StandardScaler

FLOOR = 0.1  # of the median feature std


class FlooredScaler(StandardScaler):
    """StandardScaler whose ``scale_`` is at least ``floor`` times the median feature std (added in quadrature)."""

    def __init__(self, *, floor=FLOOR, copy=True, with_mean=True, with_std=True):
        super().__init__(copy=copy, with_mean=with_mean, with_std=with_std)
        self.floor = floor

    def partial_fit(self, X, y=None, sample_weight=None):
        super().partial_fit(X, y, sample_weight)
        if self.with_std and self.floor > 0:
            std = np.sqrt(self.var_)
            self.scale_ = np.sqrt(self.var_ + (self.floor * np.median(std)) ** 2)
            self.scale_[self.scale_ == 0] = 1.0  # every dimension constant: as StandardScaler
        return self
