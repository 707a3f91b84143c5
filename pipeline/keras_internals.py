"""Every private Keras/TensorFlow name the pipeline uses, each behind one small function whose comment says
why no public API serves. Nothing else in ``pipeline`` touches a private name; when Keras or TensorFlow moves
one, tests/test_keras_internals.py names it. Keras and TensorFlow are imported lazily, inside the
functions: importing this module must not load them (the head loop imports its callers)."""

from __future__ import annotations

import functools


def functional(op) -> bool:
    """Whether ``op`` is a functional model, one whose graph of nodes :func:`graph_nodes` and
    :func:`run_graph` can walk."""
    import keras

    # keras.Model(inputs, outputs) builds the private class keras.src.models.functional.Functional; no public
    # name or attribute tells it apart from a Sequential or subclassed model. What we use of it is checked.
    return isinstance(op, keras.Model) and hasattr(op, "_run_through_graph") and hasattr(op, "_nodes_by_depth")


def graph_nodes(model) -> list:
    """The nodes (``keras`` ``Node``: ``operation``, ``input_tensors``, ``outputs``, ``parent_nodes``) of a
    functional ``model``'s own graph, nested models as one node each."""
    # Public API gives a model's operations (model.operations, model.layers), not the calls of them that make
    # its graph: an operation may be called more than once, in this graph or in others.
    return [n for nodes in model._nodes_by_depth.values() for n in nodes]


def call_count(layer) -> int:
    """How many times ``layer`` was called on symbolic tensors, in any graph (its inbound nodes)."""
    # Public API (layer.input, layer.output) only reads the first call, and raises when there is none.
    return len(layer._inbound_nodes)


def run_graph(model, inputs, operation_fn):
    """``model``'s graph run on ``inputs`` with ``operation_fn(op)`` called in place of each operation ``op``
    (Keras' own executor of a functional model)."""
    # Public API runs a model only as built; keras.models.clone_model(clone_function=...) would replace
    # operations but builds a new graph, adding nodes to the original layers (see call_count).
    return model._run_through_graph(inputs, operation_fn=operation_fn)


def int_seed(seed: int):
    """The seed tensor Keras' random ops draw with for integer ``seed`` (what ``keras.random.*(seed=seed)``
    uses)."""
    # keras.random.SeedGenerator(seed).next() gives the same value but makes a variable per seed: eager cost
    # per image. The function Keras itself converts an integer seed with is private.
    from keras.src.random.seed_generator import draw_seed

    return draw_seed(seed)


def fixed_seed_generator(value):
    """A ``keras.random.SeedGenerator`` whose every draw is the seed tensor ``value`` (as from :func:`int_seed`):
    random layers given it draw as if seeded with that integer, and ``value`` may be a traced tensor."""
    return _fixed_class()(value)


@functools.cache
def _fixed_class():
    import keras

    # Keras' random ops only call next() on a SeedGenerator they are given (keras.src.random.seed_generator.
    # draw_seed); no public API takes a seed tensor. No state variable is made (no super().__init__): nothing
    # advances, and none is created inside a traced function.
    class Fixed(keras.random.SeedGenerator):
        def __init__(self, value):
            self.value = value

        def next(self, ordered=True):
            return self.value

    return Fixed


def frozen_graph_def(concrete):
    """The GraphDef of a TensorFlow concrete function with its variables made constants."""
    # TensorFlow's only public freezing, tf.compat.v1.graph_util.convert_variables_to_constants, takes a v1
    # Session; the TF2 one (used by tf2onnx, Keras' ONNX export) lives in tensorflow.python.
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    return convert_variables_to_constants_v2(concrete).graph.as_graph_def()
