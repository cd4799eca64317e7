"""The data- and device-dependent ``auto`` settings (models/auto_settings.py)."""

from __future__ import annotations

import pytest
import torch

from models.auto_settings import (
    choose_loss,
    matmul_gflops,
    positions_per_step,
    resolve_model_settings,
    resolve_train_settings,
    softmax_seconds_per_step,
)
from models.train_config import TrainConfig

# The shapes the rule was set against: Amazon Toys (prepared arrays' figures) and the 3,000-user,
# 30,000-item Hub-layout dataset whose full-softmax steps took ~6 s each on 2 cores.
TOYS = {"num_sequences": 19_412, "num_events": 143_323, "num_softmax_rows": 11_925, "num_item_rows": 11_925,
        "max_len": 100, "id_rows": 11_925}
MID = {"num_sequences": 3_000, "num_events": 215_000, "num_softmax_rows": 30_000, "num_item_rows": 30_000,
       "max_len": 100, "id_rows": 30_000}


def test_positions_follow_the_mean_history_capped_at_the_window():
    assert positions_per_step(TOYS, 256) == pytest.approx(256 * 143_323 / 19_412)
    long = {**TOYS, "num_events": 19_412 * 500}
    assert positions_per_step(long, 256) == 256 * 100


def test_full_softmax_cost_is_six_products_of_positions_rows_width():
    seconds = softmax_seconds_per_step(MID, 256, 64, gflops=100.0)
    assert seconds == pytest.approx(6 * 256 * (215_000 / 3_000) * 30_000 * 64 / 100e9)


@pytest.mark.parametrize("gflops", [15.0, 30.0, 100.0])
def test_toys_keeps_the_full_softmax_on_two_cores_even_when_busy(gflops):
    loss, why = choose_loss(TrainConfig(), TOYS, 64, gflops)
    assert loss == "softmax", why


@pytest.mark.parametrize("gflops", [30.0, 100.0, 200.0])
def test_a_mid_size_catalogue_with_long_histories_samples_on_a_cpu(gflops):
    loss, why = choose_loss(TrainConfig(), MID, 64, gflops)
    assert loss == "infonce" and "softmax_step_seconds" in why


def test_a_fast_device_keeps_the_full_softmax_up_to_the_row_cap():
    assert choose_loss(TrainConfig(), MID, 64, 50_000.0)[0] == "softmax"
    big = {**MID, "num_softmax_rows": 100_001}
    assert choose_loss(TrainConfig(), big, 64, 1e9)[0] == "infonce"
    # Unweighed (no speed given): the catalogue size alone decides, as before.
    assert choose_loss(TrainConfig(), MID, 64, None)[0] == "softmax"


def test_resolved_loss_uses_the_measured_speed():
    tc = TrainConfig()
    assert resolve_model_settings({"d_model": 64}, tc, MID, gflops=40.0)["loss"] == "infonce"
    assert resolve_model_settings({"d_model": 64}, tc, MID, gflops=40_000.0)["loss"] == "softmax"
    assert resolve_model_settings({"d_model": 64, "loss": "softmax"}, tc, MID, gflops=1.0)["loss"] == "softmax"


def test_measured_speed_is_remembered_at_its_best(tmp_path, monkeypatch):
    import json

    from models import auto_settings

    cache = tmp_path / "speed.json"
    monkeypatch.setenv("TAAC_DEVICE_SPEED_CACHE", str(cache))
    monkeypatch.setattr(auto_settings, "_speed_cache", {})
    first = matmul_gflops("cpu", 16, 256, repeats=2)
    assert first > 0.1  # any CPU multiplies 2048 x 16 x 256 faster than 0.1 GFLOP/s
    assert matmul_gflops("cpu", 16, 256, repeats=2) == first  # one figure per process
    (name, recorded), = json.loads(cache.read_text()).items()
    assert name.startswith("cpu:") and name.endswith("|16x256") and recorded == pytest.approx(first, abs=1e-3)
    # A busy moment measures less than an earlier quiet one: the quiet figure decides.
    cache.write_text(json.dumps({name: 1e6}))
    monkeypatch.setattr(auto_settings, "_speed_cache", {})
    assert matmul_gflops("cpu", 16, 256, repeats=2) == 1e6
    # An unreadable cache is a miss, not an error.
    cache.write_text("{not json")
    monkeypatch.setattr(auto_settings, "_speed_cache", {})
    assert 0.1 < matmul_gflops("cpu", 16, 256, repeats=2) < 1e6


def test_the_gpu_batch_scales_the_learning_rate_by_the_square_root():
    tc = TrainConfig(batch_size=256, lr=2e-3, cuda_batch_size=1024)
    assert resolve_train_settings(tc, TOYS, torch.device("cpu")) is tc
    gpu = resolve_train_settings(tc, TOYS, torch.device("cuda"))
    assert (gpu.batch_size, gpu.lr) == (1024, pytest.approx(4e-3))
    # Never so large that an epoch has fewer than 8 steps; never below the preset's batch.
    small = resolve_train_settings(tc, {**TOYS, "num_sequences": 4_000}, torch.device("cuda"))
    assert small.batch_size == 500 and small.lr == pytest.approx(2e-3 * (500 / 256) ** 0.5)
    tiny = resolve_train_settings(tc, {**TOYS, "num_sequences": 300}, torch.device("cuda"))
    assert tiny.batch_size == 256 and tiny.lr == 2e-3
    assert resolve_train_settings(TrainConfig(batch_size=256), TOYS, torch.device("cuda")).batch_size == 256


def test_the_softmax_leaves_history_out_when_the_ranking_does():
    """``loss_excludes_history: auto`` follows the evaluation's history filter (passed to the
    training as ``exclude_history``); an explicit value is kept, and a preset without the key
    gets auto, like every data-adaptive setting it leaves out."""
    on, off = TrainConfig(exclude_history=True), TrainConfig(exclude_history=False)
    assert resolve_model_settings({"loss_excludes_history": "auto"}, on, MID)["loss_excludes_history"] is True
    assert resolve_model_settings({"loss_excludes_history": "auto"}, off, MID)["loss_excludes_history"] is False
    assert resolve_model_settings({"loss_excludes_history": False}, on, MID)["loss_excludes_history"] is False
    assert resolve_model_settings({}, on, MID)["loss_excludes_history"] is True
    assert resolve_model_settings({}, off, MID)["loss_excludes_history"] is False
    assert resolve_model_settings({}, on, MID)["dropout"] == resolve_model_settings({"dropout": "auto"}, on, MID)["dropout"]
