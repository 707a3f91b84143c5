"""Heads on the cached features: the registry and its parameters, the Keras dense head, training, the sweep, evaluation and saved artifacts."""
