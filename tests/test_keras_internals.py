"""Each private Keras/TensorFlow name the pipeline relies on (pipeline/keras_internals.py), exercised
against the installed Keras and TensorFlow on tiny models: a failure names the internal and the versions."""

import contextlib
import inspect
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline import keras_internals

EXERCISED = {"functional", "graph_nodes", "call_count", "run_graph", "int_seed", "fixed_seed_generator",
             "frozen_graph_def"}


@contextlib.contextmanager
def internal(name):
    """Any failure inside, an assertion's too, reported as the internal ``name`` having moved."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - whatever broke, the message names the internal
        pytest.fail(f"keras_internals.{name} no longer works with Keras {keras.__version__} / TensorFlow "
                    f"{tf.__version__} (update pipeline/keras_internals.py): {type(e).__name__}: {e}",
                    pytrace=False)


def tiny():
    """Input -> Conv2D -> BatchNormalization -> ReLU, with its conv and BatchNorm."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 3))
    conv = keras.layers.Conv2D(4, 3, name="conv")
    bn = keras.layers.BatchNormalization(name="bn")
    outputs = keras.layers.ReLU()(bn(conv(inputs)))
    return keras.Model(inputs, outputs), conv, bn


def test_every_internal_is_exercised_here():
    names = {n for n, f in inspect.getmembers(keras_internals, inspect.isfunction)
             if not n.startswith("_") and f.__module__ == keras_internals.__name__}
    assert names == EXERCISED


def test_functional():
    model, conv, _ = tiny()
    with internal("functional"):
        assert keras_internals.functional(model)
        assert not keras_internals.functional(conv)


def test_graph_nodes_and_the_public_node_attributes_read_from_them():
    model, conv, bn = tiny()
    with internal("graph_nodes"):
        nodes = keras_internals.graph_nodes(model)
        assert len(nodes) == 4 and sum(n.is_input for n in nodes) == 1
        node = next(n for n in nodes if n.operation is bn)
        assert len(node.input_tensors) == 1 and len(node.outputs) == 1
        assert [p.operation for p in node.parent_nodes] == [conv]


def test_call_count():
    model, conv, bn = tiny()
    with internal("call_count"):
        assert keras_internals.call_count(conv) == 1 and keras_internals.call_count(bn) == 1
        conv(keras.Input((5, 5, 3)))
        assert keras_internals.call_count(conv) == 2


def test_run_graph_runs_the_model_with_operations_replaced():
    model, conv, bn = tiny()
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype(np.float32)
    with internal("run_graph"):
        same = keras_internals.run_graph(model, x, lambda op: op)
        np.testing.assert_allclose(np.asarray(same), np.asarray(model(x)), atol=1e-6)
        no_bn = keras_internals.run_graph(model, x, lambda op: (lambda t, **_: t) if op is bn else op)
        np.testing.assert_allclose(np.asarray(no_bn), np.maximum(np.asarray(conv(x)), 0), atol=1e-6)


@pytest.mark.parametrize("seed", [7, 2**31 + 5, 2**32 - 1])
def test_int_seed_is_the_seed_keras_draws_an_integer_seed_with(seed):
    with internal("int_seed"):
        np.testing.assert_array_equal(np.asarray(keras_internals.int_seed(seed)),
                                      np.asarray(keras.random.SeedGenerator(seed).next()))


def test_fixed_seed_generator_draws_as_the_integer_seed_does_also_traced():
    with internal("fixed_seed_generator"):
        want = np.asarray(keras.random.uniform((5,), seed=123))
        fixed = keras_internals.fixed_seed_generator(keras_internals.int_seed(123))
        for _ in range(2):  # nothing advances
            np.testing.assert_array_equal(np.asarray(keras.random.uniform((5,), seed=fixed)), want)
        traced = tf.function(lambda s: keras.random.uniform((5,), seed=keras_internals.fixed_seed_generator(s)))
        np.testing.assert_array_equal(np.asarray(traced(keras_internals.int_seed(123))), want)
        flip = keras.layers.RandomFlip("horizontal", seed=0)
        one = keras.ops.zeros((1, 4, 4, 3))
        a = flip.get_random_transformation(one, training=True, seed=keras_internals.fixed_seed_generator(
            keras_internals.int_seed(9)))
        b = flip.get_random_transformation(one, training=True, seed=9)
        np.testing.assert_array_equal(np.asarray(a["flips"]), np.asarray(b["flips"]))


def test_frozen_graph_def_makes_variables_constants():
    v = tf.Variable([1.5, -2.0, 3.25])
    concrete = tf.function(lambda x: x * v).get_concrete_function(tf.TensorSpec([3], tf.float32))
    with internal("frozen_graph_def"):
        graph = keras_internals.frozen_graph_def(concrete)
        ops = {n.op for n in graph.node}
        assert not ops & {"VarHandleOp", "ReadVariableOp", "ResourceGather"}
        consts = [tf.make_ndarray(n.attr["value"].tensor) for n in graph.node if n.op == "Const"]
        assert any(c.shape == (3,) and np.array_equal(c, [1.5, -2.0, 3.25]) for c in consts)


def test_importing_the_module_loads_neither_keras_nor_tensorflow():
    code = "import sys, pipeline.keras_internals; print('keras' in sys.modules, 'tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
