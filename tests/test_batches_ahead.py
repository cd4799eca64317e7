"""Batches built ahead by worker threads (what a GPU run uses) are the batches built inline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.batches import BatchMaker, NegativeSpec
from models.runtime import batches
from taac_dagster.steps.arrays import PrepareOptions, prepare_arrays
from tests.test_training import build


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    paths = build(tmp_path_factory.mktemp("ahead"), "1M", 300, 800)
    return prepare_arrays(paths.warehouse, paths.checkpoints / "arrays", "1M", PrepareOptions(val_users=50))


def test_threads_give_the_inline_batches_in_order_across_epochs(arrays):
    negatives = NegativeSpec(batch_items=64, sampled=16)
    maker = BatchMaker(arrays, 64, seed=3, negatives=negatives, length_buckets=2)
    stop = 3 * maker.steps_per_epoch + 1  # crosses epoch boundaries while workers race
    inline = list(batches(maker, 1, stop, ahead=0))
    threaded = list(batches(BatchMaker(arrays, 64, seed=3, negatives=negatives, length_buckets=2), 1, stop, ahead=4, pin=True))
    assert [s for s, _ in threaded] == list(range(1, stop)) == [s for s, _ in inline]
    for (_, a), (_, b) in zip(inline, threaded, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert isinstance(b[key], torch.Tensor)
            np.testing.assert_array_equal(np.asarray(a[key]), b[key].numpy(), err_msg=key)


def test_a_worker_error_reaches_the_consumer(arrays):
    maker = BatchMaker(arrays, 64, seed=0)
    calls = []

    def broken(step):
        calls.append(step)
        if step == 2:
            raise RuntimeError("bad batch 2")
        return {"step": np.array([step])}

    maker.batch = broken
    seen = []
    with pytest.raises(RuntimeError, match="bad batch 2"):
        for step, _ in batches(maker, 0, 10, ahead=3):
            seen.append(step)
    assert seen == [0, 1]
