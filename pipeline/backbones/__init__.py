"""Frozen pretrained backbones: the registry, the layers around them, the feature extractor, BatchNorm
folding, and the EfficientNet-Lite family read from its PyTorch checkpoints."""
