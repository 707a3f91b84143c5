"""``predict``: label image files and folders with any model this program saves, each loaded only after its
record checks out:

- the fine-tuned model (:mod:`pipeline.finetune.artifact`);
- a dense head, as one end-to-end Keras model: raw pixels -> the backbone's preprocessing -> backbone ->
  the cache's pooling -> the head (the fine-tune model without augmentation);
- a scikit-learn head, on the features of the new images from the extractor of ``make features``, rebuilt
  from the cache's record and checked against it (the weights digest); on a cache made with RUNTIME=openvino, a
  scikit-learn or dense head on the features of the cache's stored OpenVINO model, in the cache's precision;
- a head on a feature ensemble: each member's features from its rebuilt, checked extractor, joined with the
  standardisation the head's record holds (:mod:`pipeline.serve.open_ensemble`);
- an exported artifact (``make export``: .keras, SavedModel, ONNX, LiteRT, OpenVINO), run by its own runtime.

Whatever the model, a :class:`Runner` maps uint8 (N, size, size, 3) pixel batches to per-class scores.
"""
