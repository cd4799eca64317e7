"""Training that finishes, and survives: the time budget, periodic checkpoints, a run killed
with SIGKILL and resumed, the torchrun child's arrays and settings, stale checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from models.train import train
from models.train_config import budget_plan, lr_at
from taac_dagster.paths import TrackPaths
from taac_dagster.settings import load_settings
from taac_dagster.steps.arrays import PrepareOptions, prepare_arrays
from taac_dagster.steps.training import track_run
from tests.test_training import TINY_MODEL, TINY_TRAIN, build, tiny_preset

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_track(tmp_path_factory) -> TrackPaths:
    return build(tmp_path_factory.mktemp("budget_data"), "1M", 300, 900)


@pytest.fixture(scope="module")
def small_arrays(small_track):
    # Short histories: cheap steps.
    options = PrepareOptions(val_users=100, max_len=20)
    return prepare_arrays(small_track.warehouse, small_track.checkpoints / "arrays", "1M", options)


class StepClock:
    """A clock on which every training step takes ``seconds_per_step``: it advances on each
    progress event (log_every=1) of the run it is given to, and validations and checkpoints
    take no time. It keeps the run's events."""

    def __init__(self, seconds_per_step: float) -> None:
        self.seconds_per_step, self.steps, self.events = seconds_per_step, 0, []

    def __call__(self) -> float:
        return self.steps * self.seconds_per_step

    def on_log(self, record: dict) -> None:
        self.events.append(record)
        if record["event"] == "progress":
            self.steps += 1

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["event"] == kind]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


# --- The time budget ----------------------------------------------------------------------------


def test_budget_plan_keeps_what_fits_with_its_validations():
    # 100 s left at 1 s a step, validations free: 100 more steps, validated every tenth of the run.
    assert budget_plan(remaining=100, step_seconds=1, validation_seconds=0, done=40, planned=10_000, interval=500) == (140, 14)
    # Validations cost time too: 10 s each, every 14 steps and one at the end.
    steps, every = budget_plan(remaining=100, step_seconds=1, validation_seconds=10, done=40, planned=10_000, interval=500)
    assert (steps, every) == (80, 8) and (steps - 40) + 10 * ((steps - 40) / every + 1) <= 100
    # A budget that is not binding changes nothing; an exhausted one stops where the run is.
    assert budget_plan(remaining=1e6, step_seconds=1, validation_seconds=5, done=40, planned=200, interval=50) == (200, 50)
    assert budget_plan(remaining=-5, step_seconds=1, validation_seconds=0, done=40, planned=200, interval=50) == (40, 4)
    # "At the end only" stays so.
    assert budget_plan(remaining=20, step_seconds=1, validation_seconds=0, done=40, planned=200, interval=0) == (60, 0)


def test_a_time_budget_shortens_the_run_its_schedule_and_survives_a_resume(small_arrays, tmp_path, monkeypatch):
    # Timed from step 10 to step 20 (20 and 20 in a real run, here fewer to keep the test short).
    monkeypatch.setattr("models.trainer.BUDGET_WARMUP_STEPS", 10)
    monkeypatch.setattr("models.trainer.BUDGET_WINDOW_STEPS", 10)
    # Two minutes, and a step takes 2 s: after 20 steps (40 s) the run sees room for 40 more.
    preset = tiny_preset(max_steps=1000, max_minutes=2, eval_every=50, log_every=1, patience=0)
    preset.model["members"] = 1  # one run's budget (an ensemble's members share it: test_encoder_ensemble.py)
    tc = preset.train
    clock = StepClock(2.0)
    full = train(small_arrays, preset, track=track_run("1M"), checkpoint_dir=tmp_path / "full", on_log=clock.on_log, clock=clock)
    [budget] = clock.of("budget")
    assert budget["step"] == 20 and budget["planned_steps"] == 1000 and budget["steps"] == 60
    assert budget["step_seconds"] == 2.0 and budget["validate_every"] == 6
    assert full.steps == full.planned_steps == len(full.losses) == 60 and not full.stopped_early
    # The learning rate follows the new length: the cosine ends at 10% of lr on the last step.
    progress = {e["step"]: e["lr"] for e in clock.of("progress")}
    assert progress[45] == pytest.approx(lr_at(44, tc, 60)) and progress[60] == pytest.approx(lr_at(59, tc, 60))
    assert progress[60] < 0.101 * tc.lr
    # Several validations in what is left: every 6 steps from the plan on.
    assert [e["step"] for e in full.evals if e["step"] > 20] == [24, 30, 36, 42, 48, 54, 60]
    ckpt = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    assert (ckpt["total_steps"], ckpt["planned_steps"], ckpt["budget_planned"], ckpt["step"]) == (60, 1000, True, 60)
    assert "n60-" in full.checkpoint_version and ckpt["checkpoint_version"] == full.checkpoint_version

    # Interrupted after the plan, resumed on a slower machine: the plan is kept, not made again
    # (planned again, 20 steps of 10 s would not fit in the 60 s left).
    first = StepClock(2.0)
    cut = train(small_arrays, preset, track=track_run("1M"), checkpoint_dir=tmp_path / "cut", on_log=first.on_log, clock=first,
                stop_after=30)
    assert cut.steps == 30 and cut.planned_steps == 60
    later = StepClock(10.0)
    resumed = train(small_arrays, preset, track=track_run("1M"), checkpoint_dir=tmp_path / "cut", on_log=later.on_log, clock=later)
    assert resumed.resumed_from == 30 and resumed.steps == resumed.planned_steps == 60 and not later.of("budget")
    assert resumed.losses == full.losses and resumed.evals == full.evals
    assert_same_weights(tmp_path / "full" / "last.pt", tmp_path / "cut" / "last.pt")
    assert resumed.checkpoint_version == full.checkpoint_version


def test_checkpoints_are_written_by_time_and_by_steps(small_arrays, tmp_path):
    runs = iter(range(100))

    def checkpoint_steps(**overrides) -> list[int]:
        clock = StepClock(30.0)  # a minute every two steps
        train(small_arrays, tiny_preset(max_steps=6, log_every=1, **overrides), track=track_run("1M"),
              checkpoint_dir=tmp_path / str(next(runs)), on_log=clock.on_log, clock=clock)
        return [e["step"] for e in clock.of("checkpoint")]

    assert checkpoint_steps(checkpoint_minutes=1.0) == [2, 4, 6]
    assert checkpoint_steps() == [6]  # every 5 minutes: the end comes first
    assert checkpoint_steps(checkpoint_minutes=0) == [6]
    assert checkpoint_steps(checkpoint_minutes=0, checkpoint_every=4) == [4, 6]


# --- Killed and resumed ---------------------------------------------------------------------------

KILLED_RUN = """
import json, sys, time
from pathlib import Path

from models.data import load_arrays
from models.train_config import Preset, TrainConfig
from models.train import train
from taac_dagster.steps.training import track_run

spec = json.loads(sys.argv[1])


def wait_at_step(record):  # trained step ``hang_at`` (not yet validated or saved): wait to be killed
    if record["event"] == "progress" and record["step"] == spec["hang_at"]:
        Path(spec["marker"]).touch()
        time.sleep(3600)


preset = Preset("tiny", spec["model"], TrainConfig.from_dict(spec["train"]))
train(load_arrays(spec["arrays"]), preset, track=track_run("1M"), checkpoint_dir=Path(spec["checkpoint_dir"]), on_log=wait_at_step)
"""


def test_a_run_killed_with_sigkill_resumes_to_the_weights_of_an_uninterrupted_one(small_arrays, tmp_path):
    # Validated and saved every step, stopped after 3 validations without improvement.
    train_settings = {**TINY_TRAIN, "max_steps": 40, "checkpoint_every": 1, "eval_every": 1, "patience": 3,
                      "log_every": 1}
    preset = tiny_preset(**train_settings)
    full = train(small_arrays, preset, track=track_run("1M"), checkpoint_dir=tmp_path / "full")
    assert full.stopped_early and full.best_step == full.steps - 3
    # Killed in the step that stops the run: what it resumes from holds two validations without
    # improvement and the best weights before them, so a resume that lost any of that differs.
    stop = full.steps
    killed, marker = tmp_path / "killed", tmp_path / "waiting"
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN)
    spec = {"arrays": str(small_arrays.folder), "model": TINY_MODEL, "train": train_settings,
            "checkpoint_dir": str(killed), "marker": str(marker), "hang_at": stop}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([sys.executable, str(script), json.dumps(spec)], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert process.poll() is None, "the run ended before it was killed: " + process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, f"the run did not reach step {stop} within 120 s"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    ckpt = torch.load(killed / "last.pt", weights_only=True)
    assert ckpt["step"] == stop - 1 and not ckpt["finished"]
    early = ckpt["early_stopping"]
    assert (early["best_step"], early["bad"]) == (full.best_step, 2) and early["best_model"] is not None

    resumed = train(small_arrays, preset, track=track_run("1M"), checkpoint_dir=killed)
    assert resumed.resumed_from == stop - 1 and resumed.steps == stop and resumed.stopped_early
    assert resumed.losses == full.losses and resumed.evals == full.evals and resumed.best_step == full.best_step
    assert_same_weights(killed / "last.pt", tmp_path / "full" / "last.pt")


# --- The torchrun child -----------------------------------------------------------------------------


def test_the_torchrun_child_trains_on_the_runs_arrays_and_settings(tmp_path):
    from assets.training import torchrun_command
    from taac_dagster.steps.train_cli import parse_command

    settings = load_settings("1M", {
        "data_root": str(tmp_path), "max_history": 20, "embedding_families": [], "hub_token": "s3cret",
        "training": {"val_users": 37, "max_minutes": 30, "checkpoint_minutes": 2, "nproc_per_node": 2},
    })
    paths = TrackPaths(tmp_path, "1M")
    command = torchrun_command(settings, "1M", arrays_dir=tmp_path / "prepared")
    assert "s3cret" not in " ".join(command)
    child = parse_command(command[command.index("taac_dagster.steps.train_cli") + 1:])
    assert child.arrays_dir == tmp_path / "prepared" and not child.prepare
    assert child.settings is not None and child.settings.max_history == 20 and child.settings.embedding_families == []
    assert child.settings.model_dump(exclude={"hub_token"}) == settings.model_dump(exclude={"hub_token"})
    tc = child.preset.train
    assert (tc.val_users, tc.max_minutes, tc.checkpoint_minutes, tc.exclude_history) == (37, 30, 2, True)
    assert child.checkpoint_dir == paths.checkpoints / "default" and child.paths == paths
    # Without prepared arrays, rank 0 prepares them from the same settings.
    command = torchrun_command(settings, "1M")
    child = parse_command(command[command.index("taac_dagster.steps.train_cli") + 1:])
    assert child.prepare and child.arrays_dir == paths.checkpoints / "arrays" and child.settings.max_history == 20


# --- A checkpoint of other arrays -------------------------------------------------------------------


def test_a_checkpoint_trained_on_other_arrays_is_refused(small_track, small_arrays, tmp_path):
    from models.checkpoint_fit import CheckpointMismatchError, StaleCheckpointError, check_checkpoint_fits
    from taac_dagster.steps.trained_encoder import load_model

    result = train(small_arrays, tiny_preset(max_steps=1), track=track_run("1M"), checkpoint_dir=tmp_path / "checkpoints" / "tiny")
    ckpt = torch.load(result.checkpoint, weights_only=True)
    assert check_checkpoint_fits(ckpt, small_arrays, result.checkpoint) == []
    # The same warehouse prepared with other settings: same shapes, another data version.
    other = prepare_arrays(small_track.warehouse, tmp_path / "other", "1M", PrepareOptions(val_users=50, max_len=20))
    assert other.data_version != small_arrays.data_version
    paths = SimpleNamespace(checkpoints=tmp_path / "checkpoints", track="1M")
    with pytest.raises(StaleCheckpointError) as error:
        load_model(paths, "tiny", other, torch.device("cpu"))
    message = str(error.value)
    assert str(result.checkpoint) in message and "Re-materialize encoder_checkpoint" in message
    assert small_arrays.data_version in message and other.data_version in message
    assert isinstance(error.value, CheckpointMismatchError)  # what the report's optional presets leave out
    assert load_model(paths, "tiny", small_arrays, torch.device("cpu")).warnings == []


def test_set_values_in_exponent_notation_are_numbers(tmp_path):
    """PyYAML reads ``1e-3`` as a string (YAML 1.1 needs ``1.0e-3``); ``--set`` must hand the
    optimizer a number, and leave real strings and other types as YAML reads them."""
    from taac_dagster.steps.train_cli import parse_command

    command = parse_command(["--data-root", str(tmp_path), "--arrays", str(tmp_path), "--set", "train.lr=1e-3",
                             "--set", "train.sampler=uniform", "--set", "train.batch_size=128",
                             "--set", "model.dropout=auto"])
    tc = command.preset.train
    assert tc.lr == 0.001 and isinstance(tc.lr, float)
    assert (tc.sampler, tc.batch_size, command.preset.model["dropout"]) == ("uniform", 128, "auto")
