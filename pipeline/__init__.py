"""pipeline: cached-feature transfer learning for images on Keras 3."""

__version__ = "0.1.0"
