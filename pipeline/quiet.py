"""TensorFlow imported without its start-up noise, by whichever step first needs it.
It is what imports TensorFlow lazily for everyone: a step that needs no TensorFlow never loads it."""

from __future__ import annotations

import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def tensorflow():
    """TensorFlow's C++ start-up lines ("Could not find cuda drivers", ...) reach fd 2 before any log level
    applies: hold them back, and show them only when the import fails (PIPELINE_TF_LOGS=1 shows them)."""
    if "tensorflow" in sys.modules or os.environ.get("PIPELINE_TF_LOGS"):
        import tensorflow as tf

        return tf

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices("GPU")  # CUDA's probe ("failed call to cuInit" without a GPU) too
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return tf
