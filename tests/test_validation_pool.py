"""Validation ranks the released pool only, like the report: a target the warehouse added to
the pool (someone's holdout target, not a published candidate) is never a hit."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from models.encoder import Encoder, ItemTables
from models.encoder_config import EncoderConfig
from models.validation import evaluate
from tests.test_training import arrays_1m, track_1m  # noqa: F401  (module fixtures)


def test_validation_targets_outside_the_released_pool_are_misses(arrays_1m):  # noqa: F811
    arrays = arrays_1m
    torch.manual_seed(0)
    model = Encoder(EncoderConfig.from_meta(arrays.meta, d_model=16, n_layers=1, n_heads=2, loss="softmax"))
    model.attach(ItemTables.from_arrays(arrays))
    index = np.arange(int(arrays.meta["num_val"]))
    kwargs = dict(actions=(1,), device=torch.device("cpu"), exclude_history=True)
    everything = evaluate(model, arrays, index, **kwargs)
    assert everything["popularity_hr@10"] > 0  # popular targets are hit when they are candidates

    # The same arrays, with every validation target's row taken out of the released pool.
    cand_rows = np.asarray(arrays.cand_rows)
    released = np.ones(len(cand_rows), bool)
    released[np.isin(cand_rows, np.asarray(arrays.val_target))] = False
    hidden = dataclasses.replace(arrays, a={**arrays.a, "cand_released": released})
    outside = evaluate(model, hidden, index, **kwargs)
    assert outside["hr@10"] == outside["popularity_hr@10"] == 0.0
    assert outside["users"] == everything["users"] == len(index)
