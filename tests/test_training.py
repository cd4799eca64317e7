"""Training on small generated warehouses: arrays, resume, DDP, learning, the Dagster asset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
import yaml

from models.batches import BatchMaker, NegativeSpec
from models.checkpoint import load_encoder
from models.data import load_arrays
from models.encoder_ensemble import EncoderEnsemble
from models.train import train
from models.train_config import Preset, TrainConfig
from taac_dagster.paths import TrackPaths
from taac_dagster.raw import materialize_raw
from taac_dagster.settings import load_settings
from taac_dagster.steps.arrays import PrepareOptions, prepare_arrays
from taac_dagster.steps.training import load_preset, progress_line, track_run
from taac_dagster.warehouse import build_warehouse

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL = dict(d_model=16, n_layers=1, n_heads=2, mlp_ratio=2.0, dropout=0.1, sparse_threshold=100)
TINY_TRAIN = dict(
    batch_size=64, max_steps=6, lr=3e-3, warmup_steps=2, schedule="cosine", grad_clip=1.0, weight_decay=0.01,
    in_batch_negatives=32, sampled_negatives=32, action_weights={0: 0.5, 1: 1.0}, val_users=100, log_every=0,
    threads=1,  # robust timing on a shared 2-core machine (two spinning OpenMP threads stall under load)
)


def build(root: Path, track: str, users: int, items: int) -> TrackPaths:
    settings = load_settings(track, {"data_root": str(root), "synthetic": {"num_users": users, "num_items": items}})
    paths = TrackPaths(root, track)
    manifest = materialize_raw(settings, paths)
    build_warehouse(Path(manifest.root), paths, settings)
    return paths


@pytest.fixture(scope="module")
def track_1m(tmp_path_factory) -> TrackPaths:
    return build(tmp_path_factory.mktemp("train_data"), "1M", 800, 2000)


@pytest.fixture(scope="module")
def arrays_1m(track_1m):
    return prepare_arrays(track_1m.warehouse, track_1m.checkpoints / "arrays", "1M", PrepareOptions(val_users=300))


def tiny_preset(**train_overrides) -> Preset:
    return Preset("tiny", dict(TINY_MODEL), TrainConfig.from_dict({**TINY_TRAIN, **train_overrides}))


# --- Arrays ---------------------------------------------------------------------------------------


def test_arrays_match_the_warehouse(track_1m, arrays_1m):
    a = arrays_1m
    con = duckdb.connect(str(track_1m.warehouse), read_only=True)
    seqs = con.execute("SELECT user_id, item_ids, action_types, timestamps FROM sequences ORDER BY user_id").fetchall()
    n_events = con.execute("SELECT sum(length) FROM sequences").fetchall()[0][0]
    cands = con.execute("SELECT creative_id, item_id FROM candidates ORDER BY retrieval_id").fetchall()
    con.close()
    assert a.seq_items.shape == (len(seqs), 100) and a.seq_items.dtype == np.int32
    validated = set(a.val_users.tolist())
    plain = [i for i, row in enumerate(seqs) if row[0] not in validated]
    for i in (plain[0], plain[7], plain[-1]):
        user, items, actions, times = seqs[i]
        n = len(items)
        assert a.seq_users[i] == user
        assert a.seq_items[i, -n:].tolist() == items and not a.seq_items[i, :-n].any()
        assert a.seq_actions[i, -n:].tolist() == actions
        assert (a.seq_times[i, -n:].astype(np.int64) + a.meta["time_origin"]).tolist() == times
    # Popularity counts what training sees: the validation users' sequences stop at their
    # validation target (test_validation_never_sees_a_test_target).
    cut = sum(len(row[1]) for row in seqs if row[0] in validated) - int((a.val_items > 0).sum())
    assert cut > 0
    assert int(a.item_counts.sum()) == int((a.seq_items > 0).sum()) == n_events - cut == a.meta["num_events"]
    # Every candidate has a row: its re-id, or a row past id_rows for a cold one without.
    assert a.cand_creative.tolist() == [c for c, _ in cands]
    for row, (creative, item) in zip(a.cand_rows.tolist(), cands):
        assert a.item_creative[row] == creative
        assert (row == item) if item is not None else (row >= a.meta["id_rows"])
    cold = a.cand_rows[a.cand_rows >= a.meta["id_rows"]]
    assert len(cold) == a.meta["num_cold_rows"] > 0 and a.item_feats[cold].any()
    assert len(a.val_users) == a.meta["num_val"] == 300 and np.all(np.diff(a.val_hold_row) > 0)


def test_validation_never_sees_a_test_target(track_1m, arrays_1m):
    """Validation targets are each user's click before its test target; the user's training
    sequence ends strictly before it; the test history keeps it as input."""
    a = arrays_1m
    con = duckdb.connect(str(track_1m.warehouse), read_only=True)
    rows = con.execute(
        """SELECT h.user_id, h.target_position,
                  (SELECT max(e.position) FROM events e WHERE e.user_id = h.user_id AND e.action_type = 1
                      AND NOT e.action_type_missing AND e.position < h.target_position) AS previous_click
           FROM holdout h ORDER BY h.user_id"""
    ).fetchall()
    events = {
        (u, p): (i, act) for u, p, i, act in con.execute("SELECT user_id, position, item_id, action_type FROM events").fetchall()
    }
    con.close()
    previous = {u: (tp, pc) for u, tp, pc in rows}
    assert a.meta["num_val_eligible"] == sum(pc is not None for _, pc in previous.values()) > 300
    seq_row = {int(u): i for i, u in enumerate(a.seq_users)}
    hold_row = {int(u): i for i, u in enumerate(a.hold_users)}
    for v, user in enumerate(a.val_users.tolist()):
        test_position, val_position = previous[user]
        assert val_position is not None and val_position < test_position
        assert a.val_target[v] == events[(user, val_position)][0] and a.val_target_action[v] == 1
        # The holdout's window (the 100 events before the test target), cut at the validation target.
        history = [events[(user, p)][0] for p in range(max(0, test_position - 100), val_position)]
        n = len(history)
        assert a.val_items[v, a.val_items.shape[1] - n:].tolist() == history and not a.val_items[v, : a.val_items.shape[1] - n].any()
        # Training stops where validation starts: the validation target and everything after it
        # (the test target included) never reach a training sequence.
        np.testing.assert_array_equal(a.seq_items[seq_row[user]], a.val_items[v])
        # The test history still has the validation target as its input.
        assert events[(user, val_position)][0] in a.hold_items[hold_row[user]].tolist()
    # Users outside the validation sample train on everything before their test target.
    others = [u for u in hold_row if u not in set(a.val_users.tolist())][:20]
    for user in others:
        np.testing.assert_array_equal(a.seq_items[seq_row[user]], a.hold_items[hold_row[user]])


def test_arrays_are_reused_and_rebuilt_when_the_warehouse_changes(track_1m, arrays_1m, tmp_path):
    again = prepare_arrays(track_1m.warehouse, track_1m.checkpoints / "arrays", "1M", PrepareOptions(val_users=300))
    assert again.data_version == arrays_1m.data_version
    other = prepare_arrays(track_1m.warehouse, tmp_path / "arrays", "1M", PrepareOptions(val_users=300, max_len=20))
    assert other.seq_items.shape[1] == 20 and other.data_version != arrays_1m.data_version


def test_arrays_streamed_in_small_user_ranges_are_byte_identical(track_1m, arrays_1m, tmp_path):
    """The holdout and the sequences are read one range of users at a time (bounded memory at
    any size); ranges of 37 users, none aligned with anything, give the same bytes as one range."""
    options = PrepareOptions(val_users=300, chunk_users=37)
    small = prepare_arrays(track_1m.warehouse, tmp_path / "small", "1M", options)
    whole = prepare_arrays(track_1m.warehouse, tmp_path / "whole", "1M", PrepareOptions(val_users=300, chunk_users=10**7))
    assert len(small.seq_users) > 37 * 10
    assert small.data_version == whole.data_version == arrays_1m.data_version
    assert np.all(np.diff(small.seq_users) > 0) and np.all(np.diff(small.hold_users) > 0)


def test_batches_are_vectorized_slices_and_ranks_split_the_global_batch(arrays_1m):
    spec = NegativeSpec(in_batch=16, sampled=16)
    single = BatchMaker(arrays_1m, 64, seed=3, negatives=spec).batch(5)
    halves = [BatchMaker(arrays_1m, 64, seed=3, negatives=spec, rank=r, world=2).batch(5) for r in (0, 1)]
    # Trimmed to the longest history of the global batch: no column is all padding.
    assert single["items"].shape[0] == 64 and (single["items"][:, 0] > 0).any()
    np.testing.assert_array_equal(np.concatenate([h["items"] for h in halves]), single["items"])
    np.testing.assert_array_equal(halves[0]["neg_items"], single["neg_items"])
    # scale = world / global weight total, so the rank losses average to the global loss
    assert halves[0]["loss_scale"] == pytest.approx(2 * single["loss_scale"])


def test_batch_item_negatives_are_every_item_of_the_batch_with_inclusion_log_q(arrays_1m):
    spec = NegativeSpec(batch_items=100_000, sampled=64, sampler="popularity", alpha=0.75)
    maker = BatchMaker(arrays_1m, 64, seed=2, negatives=spec)
    batch = maker.batch(1)
    items = batch["items"]
    neg = batch["neg_items"]
    # Sorted, distinct, and every item of the batch's sequences is among them.
    assert np.all(np.diff(neg) > 0) and set(items[items > 0].tolist()) <= set(neg.tolist())
    log_q = batch["neg_logq"]
    assert np.isfinite(log_q).all() and (log_q <= 0).all()
    # The inclusion probability grows with an item's share of training positions.
    share = maker.position_p[neg]
    order = np.argsort(share)
    assert log_q[order[-1]] > log_q[order[0]]
    # The positive's correction is the same log Q (Yi et al.), or none when switched off.
    pos = items > 0
    lookup = dict(zip(neg.tolist(), log_q.tolist()))
    np.testing.assert_allclose(batch["pos_logq"][pos], [lookup[i] for i in items[pos].tolist()], rtol=1e-6)
    off = BatchMaker(arrays_1m, 64, seed=2, negatives=NegativeSpec(batch_items=100_000, logq_positive=False)).batch(1)
    assert not off["pos_logq"].any()
    # Capped: a uniform subset of the batch's items, each less likely to be included.
    capped = BatchMaker(arrays_1m, 64, seed=2, negatives=NegativeSpec(batch_items=50)).batch(1)
    assert len(capped["neg_items"]) == 50 and set(capped["neg_items"].tolist()) <= set(neg.tolist())
    full_q = dict(zip(neg.tolist(), BatchMaker(arrays_1m, 64, seed=2, negatives=NegativeSpec(batch_items=100_000)).batch(1)["neg_logq"].tolist()))
    assert all(q < full_q[i] for i, q in zip(capped["neg_items"].tolist(), capped["neg_logq"].tolist()))


def test_length_buckets_group_similar_histories_and_keep_every_sequence(arrays_1m):
    plain = BatchMaker(arrays_1m, 32, seed=4)
    bucketed = BatchMaker(arrays_1m, 32, seed=4, length_buckets=8)
    used = plain.steps_per_epoch * 32
    # Same sequences in the epoch, another order.
    assert sorted(bucketed.order(0)[:used].tolist()) == sorted(plain.order(0)[:used].tolist())
    width = lambda maker: np.mean([maker.batch(s)["items"].shape[1] for s in range(plain.steps_per_epoch)])  # noqa: E731
    assert width(bucketed) < 0.8 * width(plain)


def test_prefetched_batches_equal_inline_ones(arrays_1m):
    from models.runtime import batches

    maker = BatchMaker(arrays_1m, 32, seed=1, negatives=NegativeSpec(sampled=8))
    inline = list(batches(maker, 2, 6, ahead=0))
    ahead = list(batches(maker, 2, 6, ahead=2))
    assert [s for s, _ in ahead] == [2, 3, 4, 5]
    for (_, a), (_, b) in zip(inline, ahead):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# --- Resume, checkpoints --------------------------------------------------------------------------


@pytest.mark.parametrize("ema_decay", [0.0, 0.5])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(arrays_1m, tmp_path, ema_decay):
    """With a weight average too: its shadow weights travel in the checkpoint (a resumed run that
    started a new average from the step-3 weights would keep other weights)."""
    preset = tiny_preset(ema_decay=ema_decay)
    full = train(arrays_1m, preset, track=track_run("1M"), checkpoint_dir=tmp_path / "full")
    cut = train(arrays_1m, preset, track=track_run("1M"), checkpoint_dir=tmp_path / "cut", stop_after=3)
    assert cut.steps == 3
    resumed = train(arrays_1m, preset, track=track_run("1M"), checkpoint_dir=tmp_path / "cut")
    assert resumed.resumed_from == 3 and resumed.steps == 6
    assert resumed.losses == full.losses
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert "sparse" in a["optim"]  # the id table went through SparseAdam
    # A finished run of the same config and data is not trained again.
    again = train(arrays_1m, preset, track=track_run("1M"), checkpoint_dir=tmp_path / "full")
    assert again.resumed_from == 6 and again.metrics == full.metrics
    # Another config starts afresh.
    other = train(arrays_1m, tiny_preset(lr=1e-3), track=track_run("1M"), checkpoint_dir=tmp_path / "full")
    assert other.resumed_from == 0


def test_a_checkpoint_rebuilds_the_model_on_its_own(arrays_1m, tmp_path):
    result = train(arrays_1m, tiny_preset(max_steps=2), track=track_run("1M"), checkpoint_dir=tmp_path)
    model, ckpt = load_encoder(result.checkpoint)  # no preset, no config file
    assert ckpt["step"] == 2 and ckpt["data_version"] == arrays_1m.data_version
    # A consumer keeps what describes the model, not the state only resuming needs.
    assert not {"model", "optim", "negative_queue"} & set(ckpt) and "best_model" not in ckpt["early_stopping"]
    saved = torch.load(result.checkpoint, weights_only=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved["model"][name]), name
    rows = torch.from_numpy(arrays_1m.cand_rows[:50].astype(np.int64))
    vectors = model.item_vectors(rows)
    assert vectors.shape == (50, 16) and torch.isfinite(vectors).all()


def test_an_ensemble_is_its_members_trained_as_single_runs_of_their_seeds(arrays_1m, tmp_path):
    """members: 2 trains seed 0, then seed 1, each an ordinary run (resumable on its own), and
    joins their kept weights into last.pt; cut after 3 steps and run again, it ends the same."""
    preset = Preset("tiny", {**TINY_MODEL, "members": 2}, TrainConfig.from_dict(TINY_TRAIN))
    records: list[dict] = []
    full = train(arrays_1m, preset, track=track_run("1M"), checkpoint_dir=tmp_path / "full", on_log=records.append)
    assert [r["seed"] for r in records if r["event"] == "member"] == [0, 1]
    [joined] = [progress_line(r) for r in records if r["event"] == "ensemble"]
    assert joined.startswith("the 2 members joined: validation HR@10 ")
    assert full.finished and full.steps == 12 and len(full.losses) == 12 and full.model_config["members"] == 2
    cut = train(arrays_1m, preset, track=track_run("1M"), checkpoint_dir=tmp_path / "cut", stop_after=3)
    assert not cut.finished and cut.steps == 3 and not (tmp_path / "cut" / "last.pt").exists()
    resumed = train(arrays_1m, preset, track=track_run("1M"), checkpoint_dir=tmp_path / "cut")
    assert resumed.resumed_from == 3 and resumed.losses == full.losses
    assert resumed.checkpoint_version == full.checkpoint_version
    model, ckpt = load_encoder(full.checkpoint)
    assert isinstance(model, EncoderEnsemble) and [m["seed"] for m in ckpt["members"]] == [0, 1]
    # Member 1 is the single model of seed 1, weight for weight.
    alone = train(arrays_1m, tiny_preset(seed=1), track=track_run("1M"), checkpoint_dir=tmp_path / "alone")
    single, _ = load_encoder(alone.checkpoint)
    for name, tensor in single.state_dict().items():
        assert torch.equal(model.members[1].state_dict()[name], tensor), name
    # The joined vectors are the members', and the run's figures are the ensemble's validation.
    rows = torch.from_numpy(arrays_1m.cand_rows[:50].astype(np.int64))
    assert model.item_vectors(rows).shape == (50, 32) and model.cfg.vector_dim == 32
    assert full.metrics["users"] == 100 and full.metrics["hr@10"] == ckpt["evals"][-1]["hr@10"]
    # Run again with nothing changed: no member retrains and the joined file is kept as it is.
    before = (tmp_path / "full" / "last.pt").stat().st_mtime_ns
    again = train(arrays_1m, preset, track=track_run("1M"), checkpoint_dir=tmp_path / "full")
    assert again.resumed_from == 12 and again.metrics == full.metrics
    assert (tmp_path / "full" / "last.pt").stat().st_mtime_ns == before
    # Without validation users the members are joined all the same, with no figures to report.
    blind = train(arrays_1m, Preset("tiny", {**TINY_MODEL, "members": 2}, TrainConfig.from_dict({**TINY_TRAIN, "val_users": 0})),
                  track=track_run("1M"), checkpoint_dir=tmp_path / "blind")
    assert blind.finished and blind.metrics == {} and blind.evals == []


# --- Distributed --------------------------------------------------------------------------------


def run_cli(args: list[str], *, torchrun: bool) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun else [sys.executable]
    done = subprocess.run([*prefix, "-m", "taac_dagster.steps.train_cli", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow  # two torchrun ranks on CPU: ~20-35 s
def test_ddp_with_two_processes_follows_the_single_process_trajectory(track_1m, arrays_1m, tmp_path):
    preset = {
        "model": {**TINY_MODEL, "dropout": 0.0},
        "train": {**TINY_TRAIN, "max_steps": 5, "schedule": "constant", "warmup_steps": 0, "val_users": 50},
    }
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(preset))
    common = ["--config", str(config), "--data-root", str(track_1m.data_root), "--track", "1M", "--arrays", str(arrays_1m.folder)]
    run_cli([*common, "--checkpoint-dir", str(tmp_path / "one"), "--report", str(tmp_path / "one.json")], torchrun=False)
    run_cli([*common, "--checkpoint-dir", str(tmp_path / "two"), "--report", str(tmp_path / "two.json")], torchrun=True)
    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two"))
    assert two["world"] == 2 and one["world"] == 1
    assert len(one["losses"]) == len(two["losses"]) == 5
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-4, atol=1e-5)
    assert (tmp_path / "two" / "last.pt").is_file()  # written by rank 0


# --- Learning ------------------------------------------------------------------------------------


def test_trained_model_beats_popularity_on_validation(arrays_1m):
    # The default preset, narrower and shorter so that the test takes seconds.
    preset = load_preset("default", {
        "model": {"d_model": 32, "n_layers": 1},
        "train": {"batch_size": 64, "epochs": 3, "in_batch_negatives": 128, "sampled_negatives": 128,
                  "val_users": 300, "log_every": 0, "threads": 1},
    })
    result = train(arrays_1m, preset, track=track_run("1M"))
    m = result.metrics
    assert m["users"] == 300
    assert m["hr@10"] >= 2 * m["popularity_hr@10"] and m["hr@10"] - m["popularity_hr@10"] >= 0.05, m
    assert m["score"] > m["popularity_score"]
    assert result.losses[-1] < result.losses[0]


def test_10m_track_trains_with_conversions(tmp_path):
    """Conversions (action 2) are targets of their own weight: a batch gives their positions
    2.5 where clicks weigh 1 and exposures 0.5, and the loss moves with that weight."""
    paths = build(tmp_path, "10M", 200, 600)
    arrays = prepare_arrays(paths.warehouse, paths.checkpoints / "arrays", "10M")
    assert arrays.meta["n_actions"] == 3 and arrays.item_counts[:, 2].sum() > 0
    weights = {0: 0.5, 1: 1.0, 2: 2.5}
    batch = BatchMaker(arrays, 64, seed=0, action_weights=weights).batch(0)
    real = batch["items"] > 0
    assert (real & (batch["actions"] == 2)).sum() > 0  # the batch holds conversions
    for action, weight in weights.items():
        assert (batch["weights"][real & (batch["actions"] == action)] == weight).all(), action
    assert (batch["weights"][~real] == 0).all()
    heavy = train(arrays, tiny_preset(max_steps=2, action_weights=weights), track=track_run("10M"))
    plain = train(arrays, tiny_preset(max_steps=2, action_weights={**weights, 2: 1.0}), track=track_run("10M"))
    assert heavy.steps == plain.steps == 2 and np.isfinite(heavy.losses).all() and "hr@10" in heavy.metrics
    # Same seed, same batches: only the conversions' weight differs, and so does the first loss.
    assert abs(heavy.losses[0] - plain.losses[0]) > 1e-4 * abs(plain.losses[0])


def test_baseline_preset_runs(arrays_1m):
    preset = load_preset("baseline", {"train": {"batch_size": 64, "max_steps": 2, "val_users": 50, "log_every": 0, "threads": 1}})
    assert preset.model["loss"] == "bce" and preset.model["d_model"] == 32
    result = train(arrays_1m, preset, track=track_run("1M"))
    assert result.steps == 2 and np.isfinite(result.losses).all()


# --- The Dagster asset ----------------------------------------------------------------------------


@pytest.mark.slow
def test_encoder_checkpoint_asset(tmp_path, monkeypatch):
    from dagster import AssetKey, DagsterInstance, materialize

    from assets.raw import raw_dataset
    from assets.training import encoder_checkpoint
    from assets.warehouse import warehouse_tables
    from taac_dagster.resources import TaacConfig

    chain = [raw_dataset, warehouse_tables]
    try:
        from assets.semantic_ids import semantic_id_codebooks

        chain.append(semantic_id_codebooks)
    except ImportError:
        pass
    monkeypatch.setenv("TAAC_TRAINING__THREADS", "1")
    config = TaacConfig(data_root=str(tmp_path / "data"), synthetic={"num_users": 300, "num_items": 900})
    with DagsterInstance.ephemeral(tempdir=str(tmp_path / "home")) as instance:
        result = materialize([*chain, encoder_checkpoint], partition_key="1M", resources={"taac": config}, instance=instance)
        assert result.success
        events = [e for e in result.get_asset_materialization_events() if e.asset_key == AssetKey("encoder_checkpoint")]
        meta = events[0].materialization.metadata
        checkpoint = Path(meta["checkpoint"].value)
        assert checkpoint.is_file() and meta["steps"].value > 0 and meta["resumed_from_step"].value == 0
        assert "val_popularity_hr@10" in meta
        assert len(meta["loss_curve"].value) == meta["steps"].value
        assert meta["semantic_ids"].value == (len(chain) == 3)
        model, ckpt = load_encoder(checkpoint)
        assert ckpt["preset"] == "default" and ckpt["track"] == "1M"
        # 300 training sequences: the default sequence budget buys the most members (members: auto).
        assert meta["members"].value == 3 and isinstance(model, EncoderEnsemble) and len(model.members) == 3
        # The validation figures reported are those of the weights kept (the checkpoint's record).
        [kept] = [e for e in ckpt["evals"] if e["step"] == ckpt["weights_step"]]
        assert meta["best_step"].value == ckpt["weights_step"] and 0 < meta["val_hr@10"].value <= 1
        assert meta["val_hr@10"].value == pytest.approx(kept["hr@10"], abs=1e-5)
        assert meta["val_score"].value == pytest.approx(kept["score"], abs=1e-5)
        version = events[0].materialization.tags["dagster/data_version"]
        assert version == meta["checkpoint_version"].value == ckpt["checkpoint_version"]
        # Materialized again with nothing changed: the finished checkpoint is kept, not retrained.
        again = materialize([encoder_checkpoint], partition_key="1M", resources={"taac": config}, instance=instance)
        meta2 = again.get_asset_materialization_events()[0].materialization.metadata
        assert meta2["resumed_from_step"].value == meta["steps"].value
        assert meta2["val_score"].value == meta["val_score"].value


@pytest.mark.slow  # two torchrun ranks on CPU: ~20-35 s
def test_encoder_checkpoint_through_torchrun_and_pipes(tmp_path, monkeypatch):
    """The cluster path: the asset launches torchrun (2 CPU ranks, DDP); rank 0 reports via Pipes.
    The ranks train on the arrays the asset prepared with the run's settings (its run config,
    not only TAAC_*)."""
    from dagster import AssetKey, DagsterInstance, materialize

    from assets.raw import raw_dataset
    from assets.semantic_ids import semantic_id_codebooks
    from assets.training import encoder_checkpoint
    from assets.warehouse import warehouse_tables
    from taac_dagster.resources import TaacConfig

    monkeypatch.setenv("TAAC_TRAINING__LAUNCHER", "torchrun")
    monkeypatch.setenv("TAAC_TRAINING__NPROC_PER_NODE", "2")
    monkeypatch.setenv("TAAC_TRAINING__MAX_STEPS", "4")
    monkeypatch.setenv("TAAC_TRAINING__THREADS", "1")
    config = TaacConfig(data_root=str(tmp_path / "data"), synthetic={"num_users": 300, "num_items": 900},
                        max_history=20, training={"val_users": 37})
    chain = [raw_dataset, warehouse_tables, semantic_id_codebooks, encoder_checkpoint]
    with DagsterInstance.ephemeral(tempdir=str(tmp_path / "home")) as instance:
        result = materialize(chain, partition_key="1M", resources={"taac": config}, instance=instance)
        assert result.success
        events = [e for e in result.get_asset_materialization_events() if e.asset_key == AssetKey("encoder_checkpoint")]
        assert len(events) == 1  # one report: rank 0 only
        meta = events[0].materialization.metadata
        assert meta["steps"].value == 4
        checkpoint = Path(meta["checkpoint"].value)
        assert checkpoint.is_file()
        _, ckpt = load_encoder(checkpoint)
        assert events[0].materialization.tags["dagster/data_version"] == ckpt["checkpoint_version"]
        arrays = load_arrays(ckpt["arrays_dir"])
        assert Path(ckpt["arrays_dir"]) == TrackPaths(tmp_path / "data", "1M").checkpoints / "arrays"
        assert arrays.meta["max_len"] == 20 and ckpt["data_version"] == arrays.data_version
        assert ckpt["train_config"]["val_users"] == 37 and meta["val_users"].value == 37
        # Rank 0's training events reached the run's log through Pipes, before its final report.
        logs = instance.all_logs(result.run_id)
        lines = [(i, e.user_message) for i, e in enumerate(logs)]
        progress = [i for i, m in lines if "step 4/4 (epoch" in m and "sequences/s" in m]
        validation = [i for i, m in lines if m.startswith("validation at step 4 (37 users")]
        reported = [i for i, e in enumerate(logs) if e.dagster_event and e.dagster_event.is_step_materialization
                    and e.dagster_event.asset_key == AssetKey("encoder_checkpoint")]
        assert progress and validation and reported, [m for _, m in lines][-30:]
        assert max(progress[0], validation[0]) < reported[0]


def test_model_settings_adapt_to_the_catalogue():
    from models.auto_settings import resolve_model_settings

    tc = TrainConfig(full_softmax_items=1000, max_id_table_bytes=3 * 4 * 64 * 500)
    small = {"num_item_rows": 800, "id_rows": 400, "item_vocab": [10], "mm_dims": [], "sid_vocab": []}
    large = {**small, "num_item_rows": 5000, "id_rows": 4000}
    assert resolve_model_settings({"d_model": 64}, tc, small) == {
        "d_model": 64, "loss": "softmax", "id_init_std": 0.0, "id_buckets": 0, "dropout": 0.3,
        "loss_excludes_history": tc.exclude_history,
    }
    # Past the thresholds: sampled negatives, and the id table hashed into the rows that fit.
    resolved = resolve_model_settings({"d_model": 64, "loss": "auto", "id_buckets": "auto"}, tc, large)
    assert resolved["loss"] == "infonce" and resolved["id_buckets"] == 500
    # Dropout follows the amount of training data.
    dropouts = [resolve_model_settings({"dropout": "auto"}, tc, {**small, "num_events": n})["dropout"] for n in (10**5, 10**7, 10**9)]
    assert dropouts == [0.3, 0.2, 0.1]
    # Ids get a spread only when they are all an item has; explicit values are kept.
    bare = {**small, "item_vocab": []}
    assert resolve_model_settings({}, tc, bare)["id_init_std"] == 0.02
    assert resolve_model_settings({"use_item_features": False}, tc, small)["id_init_std"] == 0.02
    explicit = {"loss": "bce", "id_buckets": 7, "id_init_std": 0.1, "dropout": 0.2, "loss_excludes_history": False}
    assert resolve_model_settings(explicit, tc, large) == explicit


def test_a_checkpoint_that_would_run_code_is_refused(arrays_1m, tmp_path):
    import pickle

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model": {}, "x": Exploit()}, tmp_path / "last.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_encoder(tmp_path / "last.pt", arrays_1m)


def test_softmax_classes_are_the_items_that_train_or_can_be_recommended(arrays_1m):
    from models.encoder import ItemTables

    tables = ItemTables.from_arrays(arrays_1m)
    classes = tables.classes.numpy()
    trained = set(np.flatnonzero(np.asarray(arrays_1m.item_counts).sum(axis=1) > 0).tolist())
    assert classes[0] == 0 and np.all(np.diff(classes) > 0)
    assert set(classes[1:].tolist()) == trained | set(arrays_1m.cand_rows.tolist())
    assert len(classes) == arrays_1m.meta["num_softmax_rows"]
    # Every item a training sequence holds (inputs and targets) has a class.
    seen = np.asarray(arrays_1m.seq_items)
    assert (tables.class_of.numpy()[seen[seen > 0]] >= 0).all()
    np.testing.assert_array_equal(tables.class_of.numpy()[classes], np.arange(len(classes)))
