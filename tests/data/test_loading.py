"""decode.Batches: ordered, complete batches decoded ahead in threads, helped by the consumer."""

import threading
import time

import numpy as np
import pytest

from pipeline.data import loading as decode

SHAPE = (4, 4, 3)


def pixels(i):
    return np.full(SHAPE, i % 256, np.uint8)


def batches_of(items, size, tag="t"):
    return [((tag, k), items[k:k + size]) for k in range(0, len(items), size)]


def decode_threads():
    return [t for t in threading.enumerate() if t.name.startswith("decode-")]


@pytest.mark.parametrize("ahead,workers", [(1, 1), (3, 2), (8, 4)])
def test_batches_arrive_in_order_with_every_item(ahead, workers):
    spec = batches_of(list(range(23)), 5, "a") + batches_of(list(range(100, 107)), 4, "b")
    with decode.Batches(pixels, spec, SHAPE, ahead=ahead, workers=workers) as stream:
        got = list(stream)
    assert [tag for tag, _ in got] == [tag for tag, _ in spec]
    for (tag, x), (_, items) in zip(got, spec):
        assert x.dtype == np.uint8 and x.shape == (len(items), *SHAPE)
        assert np.array_equal(x, np.stack([pixels(i) for i in items]))
    assert not decode_threads()


def test_no_batches_is_an_empty_stream():
    with decode.Batches(pixels, [], SHAPE) as stream:
        assert list(stream) == []


def test_a_failing_image_raises_at_its_batch_after_the_earlier_ones():
    def load(i):
        if i == 7:
            raise ValueError("bad image 7")
        return pixels(i)

    got = []
    with pytest.raises(ValueError, match="bad image 7"):
        with decode.Batches(load, batches_of(list(range(12)), 3), SHAPE, ahead=4, workers=2) as stream:
            for tag, x in stream:
                got.append(tag)
    assert got == [("t", 0), ("t", 3)]
    assert not decode_threads()


def test_stopping_early_stops_the_workers():
    with decode.Batches(pixels, batches_of(list(range(1000)), 10), SHAPE, ahead=5, workers=3) as stream:
        next(stream)
        assert len(decode_threads()) == 3
    assert not decode_threads()


def test_the_consumer_decodes_what_slow_workers_have_not_started():
    """Workers that get (almost) no CPU never hold the consumer up for more than the images in their hands."""
    by_thread = {}

    def load(i):
        name = threading.current_thread().name
        by_thread.setdefault(name, []).append(i)
        if name.startswith("decode-"):
            time.sleep(0.05)
        return pixels(i)

    items = list(range(40))
    with decode.Batches(load, batches_of(items, 8), SHAPE, ahead=2, workers=1) as stream:
        out = np.concatenate([x for _, x in stream])
    assert np.array_equal(out, np.stack([pixels(i) for i in items]))
    mine = by_thread.get(threading.current_thread().name, [])
    assert len(mine) >= 30  # the one worker, 50 ms an image, could not have done more than a few
