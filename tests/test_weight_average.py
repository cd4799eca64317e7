"""The exponential moving average of the weights (TrainConfig.ema_decay): its arithmetic, the
swap for validation, the tables it leaves out, and that the kept checkpoint holds the average."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.weight_average import WeightAverage, averaged_names


def test_the_shadow_moves_a_share_of_the_way_each_update():
    """Decay (1 + t) / (10 + t) while that is under the cap: 0.1 then 2/11 (the first updates
    follow the weights closely), then the cap itself."""
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    average = WeightAverage(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    average.update(model)
    assert average.shadow["weight"].item() == pytest.approx(0.9)  # 0.1 * 0 + 0.9 * 1
    average.update(model)
    assert average.shadow["weight"].item() == pytest.approx(2 / 11 * 0.9 + 9 / 11)
    average.updates = 1000
    assert average.current_decay() == 0.9  # (1001 / 1010) is over the cap


def test_applied_swaps_the_average_in_and_the_weights_back():
    model = nn.Linear(2, 2)
    average = WeightAverage(model, decay=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update(model)  # decay 0.1: shadow = before + 0.9
    with average.applied(model):
        assert torch.allclose(model.weight, before["weight"] + 0.9)
    assert torch.allclose(model.weight, before["weight"] + 1.0)
    with pytest.raises(RuntimeError), average.applied(model):  # restored on an error too
        raise RuntimeError("validation failed")
    assert torch.allclose(model.weight, before["weight"] + 1.0)


def test_sparse_tables_are_not_averaged():
    model = nn.ModuleDict({"ids": nn.Embedding(10, 4, sparse=True), "features": nn.Embedding(10, 4), "out": nn.Linear(4, 4)})
    assert averaged_names(model) == ["features.weight", "out.weight", "out.bias"]
    with pytest.raises(ValueError, match="ema_decay must be in"):
        WeightAverage(model, decay=1.0)


def test_the_kept_weights_are_the_average(tmp_path):
    """Validated once, at the end: the published model holds the average's weights (not the last
    step's) for every averaged parameter, and the raw ones for the sparse id table."""
    from models.train import train
    from taac_dagster.steps.arrays import PrepareOptions, prepare_arrays
    from taac_dagster.steps.training import track_run
    from tests.test_training import build, tiny_preset  # the small generated track of the training tests

    paths = build(tmp_path, "1M", 300, 800)
    arrays = prepare_arrays(paths.warehouse, paths.checkpoints / "arrays", "1M", PrepareOptions(val_users=100))
    train(arrays, tiny_preset(ema_decay=0.5, eval_every=0), track=track_run("1M"), checkpoint_dir=tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    shadow = ckpt["weight_average"]["shadow"]
    assert ckpt["weight_average"]["updates"] == ckpt["step"] and shadow and all(torch.equal(ckpt["model"][name], value) for name, value in shadow.items())
    assert any(name not in shadow for name in ckpt["model"] if name.endswith("weight"))  # the sparse id table
