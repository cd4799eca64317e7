"""Retrieval and reports end to end: faiss_index -> evaluation_report -> submission on a real
temporary Dagster instance, with the bad-input refusals (checkpoint from other data, index from
another checkpoint, empty pool) and the blocking recall check."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from dagster import AssetKey, DagsterInstance, materialize

from assets.evaluation import evaluation_report, submission, user_vectors
from assets.raw import raw_dataset
from assets.retrieval import RECALL_CHECK, faiss_index
from assets.semantic_ids import semantic_id_codebooks
from assets.training import encoder_checkpoint
from assets.warehouse import warehouse_tables
from models.checkpoint_fit import CheckpointMismatchError, EvaluationError
from models.data import holdout_batch
from models.encoder import Encoder
from models.index_spec import IndexSpec
from models.retrieval_errors import IndexMismatchError
from models.scoring import fill_lists, query_vectors
from models.submission import read_submission
from models.user_vectors import UserVectorsMismatchError
from taac_dagster.errors import DataFormatError
from taac_dagster.paths import TrackPaths
from taac_dagster.resources import TaacConfig
from taac_dagster.settings import load_settings
from taac_dagster.steps.index import build_track_index
from taac_dagster.steps.report import evaluate_track
from taac_dagster.steps.scoring import search_backend
from taac_dagster.steps.submission import submission_for_track
from taac_dagster.steps.trained_encoder import compute_device, load_model, track_arrays
from tests.conftest import CHAIN_ENV

pytestmark = pytest.mark.slow

CHAIN = [raw_dataset, warehouse_tables, semantic_id_codebooks, encoder_checkpoint, faiss_index, user_vectors,
         evaluation_report, submission]
ENV = CHAIN_ENV
# ``chain`` (tests/conftest.py): both tracks of the synthetic default through the whole chain,
# once per session (tests/test_end_to_end_truth.py reads the same run).


def _env(mp: pytest.MonkeyPatch) -> None:
    for key, value in ENV.items():
        mp.setenv(key, value)


def _with(config: TaacConfig, **update) -> TaacConfig:
    """A copy of a resource with some fields changed (resources are immutable); a section's
    fields are merged into the section."""
    fields = config.overrides()
    for key, value in update.items():
        fields[key] = {**fields.get(key, {}), **value} if isinstance(value, dict) else value
    return TaacConfig(**fields)


def _metadata(result, name: str) -> dict:
    events = [e for e in result.get_asset_materialization_events() if e.asset_key == AssetKey(name)]
    assert len(events) == 1, name
    return {key: value.value for key, value in events[0].materialization.metadata.items()}


def _pool_creative_ids(paths: TrackPaths) -> np.ndarray:
    con = duckdb.connect(str(paths.warehouse), read_only=True)
    try:
        return con.execute("SELECT creative_id FROM candidates").fetchnumpy()["creative_id"].astype(np.int64)
    finally:
        con.close()


@pytest.mark.parametrize("track", ["1M", "10M"])
def test_report_figures_are_consistent_and_between_popularity_and_oracle(chain, track):
    result = chain["results"][track]
    assert result.success
    paths = TrackPaths(chain["root"] / "data", track)
    figures = json.loads((paths.reports / "evaluation.json").read_text())
    methods = figures["methods"]
    assert set(methods) == {"model", "popularity", "oracle"}
    for name, m in methods.items():
        assert m["score"] == pytest.approx(0.31 * m["hr@10"] + 0.69 * m["ndcg@10"]), name
        assert 0 <= m["ndcg@10"] <= m["hr@10"] <= 1
        assert m["users"] == figures["provenance"]["users"]
    model, popularity, oracle = methods["model"], methods["popularity"], methods["oracle"]
    assert model["score"] > 2 * popularity["score"]
    assert model["score"] <= oracle["score"] and model["hr@10"] <= oracle["hr@10"]
    assert figures["oracle_share"]["score"] == pytest.approx(model["score"] / oracle["score"])
    if track == "10M":  # weighted metrics with conversions at 2.5
        for m in methods.values():
            assert m["w_score"] == pytest.approx(0.31 * m["w_hr@10"] + 0.69 * m["w_ndcg@10"])
        assert model["w_score"] > popularity["w_score"]
    else:
        assert "w_score" not in model
    # Every holdout user was scored, with the history filter on by default.
    con = duckdb.connect(str(paths.warehouse), read_only=True)
    holdout_users = con.execute("SELECT count(*) FROM holdout").fetchall()[0][0]
    con.close()
    assert figures["provenance"]["users"] == holdout_users
    assert figures["provenance"]["exclude_history"] is True
    # The generated pool holds every target: nothing outside it, no extended row, all released.
    assert figures["provenance"]["figures"]["targets_outside_pool_share"] == 0
    assert figures["provenance"]["released_candidates"] == figures["provenance"]["candidates"]
    assert figures["provenance"]["search_backend"] == "faiss"  # on the CPU
    # Slices: every slice partitions the users.
    slices = {(s["slice"], s["method"]): 0 for s in figures["slices"]}
    for s in figures["slices"]:
        slices[(s["slice"], s["method"])] += s["users"]
    assert {name for name, _ in slices} == {"history_length", "target_popularity", "target_temperature", "target_action"}
    assert set(slices.values()) == {holdout_users}
    # The files: Markdown + HTML with both plots, the headline in the UI metadata.
    markdown = (paths.reports / "evaluation.md").read_text()
    assert "## Slices" in markdown and "model / oracle" in markdown
    assert (paths.reports / "plots" / "evaluation_slices.png").stat().st_size > 1000
    assert (paths.reports / "plots" / "evaluation_training.png").stat().st_size > 1000
    assert "data:image/png;base64," in (paths.reports / "evaluation.html").read_text()
    meta = _metadata(result, "evaluation_report")
    assert "| model |" in meta["headline"] and meta["score"] == pytest.approx(model["score"], abs=1e-5)
    assert meta["targets_outside_pool_share"] == 0 and meta["search_backend"] == "faiss"
    assert "0.0% of the targets are outside it" in markdown
    # The plots, the training loss and the Semantic ID table show in the UI without opening a file.
    assert meta["plots"].count("](data:image/png;base64,") == 2
    assert "](data:image/png;base64," in _metadata(result, "encoder_checkpoint")["loss_curve_plot"]
    codes = _metadata(result, "semantic_id_codebooks")
    assert codes["dagster/row_count"] >= len(_pool_creative_ids(paths))
    assert [c.name for c in codes["dagster/column_schema"].columns][:3] == ["creative_id", "item_id", "codes"]
    # Validation (the kept checkpoint's, on the targets before the test targets) beside test.
    validation = figures["validation"]
    checkpoint = torch.load(paths.checkpoints / "default" / "last.pt", weights_only=False)
    assert validation["users"] == 100 and validation["step"] == checkpoint["weights_step"]
    assert validation["score"] == max(e["score"] for e in checkpoint["evals"])
    assert "## Validation and test" in markdown and meta["validation_score"] == pytest.approx(validation["score"], abs=1e-5)
    assert meta["popularity_score"] == pytest.approx(popularity["score"], abs=1e-5)


def test_index_records_recall_and_its_checkpoint(chain):
    result = chain["results"]["1M"]
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks[RECALL_CHECK].passed
    meta = _metadata(result, "faiss_index")
    index_meta = json.loads((Path(meta["index_path"]) / "metadata.json").read_text())
    ckpt_meta = _metadata(result, "encoder_checkpoint")
    assert index_meta["checkpoint_version"] == ckpt_meta["checkpoint_version"] == meta["checkpoint_version"]
    paths = TrackPaths(chain["root"] / "data", "1M")
    pool = _pool_creative_ids(paths)
    ids = np.load(Path(meta["index_path"]) / "ids.npy")
    assert sorted(ids.tolist()) == sorted(pool.tolist())  # cold items included
    assert meta["cold_items"] > 0 and meta["pool_size"] == len(pool)
    assert meta["recall@10"] == 1.0 and meta["index"] == "flat (exact)"  # small pool: exact search


def test_user_vectors_are_encoded_once_and_refused_for_another_checkpoint(chain, tmp_path, monkeypatch):
    """user_vectors holds the encoder's query for every holdout user (the vectors a fresh
    encoding gives); the report and the submission read them without a forward pass; vectors
    of another checkpoint are refused with the fix."""
    _env(monkeypatch)
    paths = TrackPaths(chain["root"] / "data", "1M")
    settings = load_settings("1M", chain["config"].overrides())
    meta = _metadata(chain["results"]["1M"], "user_vectors")
    assert meta["checkpoint_version"] == _metadata(chain["results"]["1M"], "encoder_checkpoint")["checkpoint_version"]
    stored = np.load(paths.vectors / "default" / "holdout.npy")
    arrays = track_arrays(paths, settings)
    assert stored.shape == (int(arrays.meta["num_holdout"]), 64) == (meta["holdout_users"], 64)
    loaded = load_model(paths, "default", arrays, compute_device(settings))
    rows = np.arange(0, len(stored), 7)
    fresh = query_vectors(loaded, holdout_batch(arrays, rows), torch.device("cpu"))
    np.testing.assert_allclose(stored[rows], fresh, atol=1e-5)

    report_before = (paths.reports / "evaluation.json").read_bytes()

    def no_forward(*args, **kwargs):
        raise AssertionError("the encoder ran again")

    with monkeypatch.context() as mp:
        mp.setattr(Encoder, "user_vectors", no_forward)
        evaluation = evaluate_track(paths, settings)
        summary = submission_for_track(paths, settings, path=tmp_path / "submission.json")
    assert evaluation.users == len(stored) and summary["users"] == len(stored)
    assert read_submission(tmp_path / "submission.json") == read_submission(paths.reports / "submission.json")
    assert json.loads((paths.reports / "evaluation.json").read_bytes())["methods"] == json.loads(report_before)["methods"]

    folder = paths.vectors / "default"
    kept = folder.with_name("default.kept")
    shutil.copytree(folder, kept)
    try:
        meta_file = folder / "metadata.json"
        meta_file.write_text(meta_file.read_text().replace(meta["checkpoint_version"], "another-checkpoint"))
        for run in (evaluate_track, submission_for_track):
            with pytest.raises(UserVectorsMismatchError, match="re-materialize user_vectors"):
                run(paths, settings)
    finally:
        shutil.rmtree(folder)
        shutil.move(kept, folder)


def test_submission_is_valid_for_every_holdout_user(chain):
    paths = TrackPaths(chain["root"] / "data", "1M")
    data = read_submission(paths.reports / "submission.json")
    top = np.asarray(data["top10s"])
    con = duckdb.connect(str(paths.warehouse), read_only=True)
    users = con.execute(
        "SELECT u.raw_user_id FROM holdout h JOIN users u USING (user_id) ORDER BY h.user_id"
    ).fetchnumpy()["raw_user_id"]
    con.close()
    assert data["user"] == [str(u) for u in users]
    assert top.shape == (len(users), 10)
    assert (np.sort(top, axis=1)[:, 1:] != np.sort(top, axis=1)[:, :-1]).all()
    assert np.isin(top, _pool_creative_ids(paths)).all()


def test_the_search_backend_is_torch_on_cuda_whatever_the_index_unless_set():
    flat, ivf = IndexSpec(kind="flat"), IndexSpec(kind="ivf", nlist=64)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")

    def backend(setting: str, device: torch.device, spec: IndexSpec) -> str:  # the index kind never matters
        return search_backend(load_settings("1M", {"evaluation": {"search_backend": setting}}), device)

    assert backend("auto", cuda, flat) == backend("auto", cuda, ivf) == "torch-cuda"  # exact on a GPU
    assert backend("auto", cpu, flat) == backend("auto", cpu, ivf) == backend("faiss", cuda, flat) == "faiss"
    assert backend("torch", cpu, flat) == "torch-cpu" and backend("torch", cuda, ivf) == "torch-cuda"


def test_fill_lists_completes_short_lists_without_repeats():
    top = np.array([[3, -1, -1], [0, 1, 2]])
    filled = fill_lists(top, fallback=np.array([3, 4, 0, 5, 1]), exclude=np.array([[4, -1], [-1, -1]]), k=3)
    assert filled.tolist() == [[3, 0, 5], [0, 1, 2]]


def test_a_second_run_reports_what_moved_and_what_changed(chain):
    with pytest.MonkeyPatch.context() as mp:
        _env(mp)
        config = _with(chain["config"], evaluation={"exclude_history": False})
        result = materialize([evaluation_report], partition_key="1M", resources={"taac": config}, instance=chain["instance"])
    assert result.success
    paths = TrackPaths(chain["root"] / "data", "1M")
    figures = json.loads((paths.reports / "evaluation.json").read_text())
    assert figures["provenance"]["exclude_history"] is False
    changes = {c["what"] for c in figures["comparison"]["changes"]}
    assert "config.evaluation.exclude_history" in changes
    markdown = (paths.reports / "evaluation.md").read_text()
    assert "## Compared with the previous report" in markdown and "History filter off" in markdown


def test_baseline_preset_joins_the_report_and_a_foreign_index_is_refused(chain):
    paths = TrackPaths(chain["root"] / "data", "1M")
    with pytest.MonkeyPatch.context() as mp:
        _env(mp)
        baseline = _with(chain["config"], training={"preset": "baseline", "max_steps": 20})
        trained = materialize([encoder_checkpoint, faiss_index], partition_key="1M",
                              resources={"taac": baseline}, instance=chain["instance"])
        assert trained.success and (paths.indexes / "baseline" / "index.faiss").is_file()
        # user_vectors encodes both presets' users; the report reads them, encoding nothing.
        result = materialize([user_vectors, evaluation_report], partition_key="1M", resources={"taac": chain["config"]},
                             instance=chain["instance"])
        assert result.success
        methods = json.loads((paths.reports / "evaluation.json").read_text())["methods"]
        assert set(methods) == {"model", "popularity", "baseline", "oracle"}
        assert methods["baseline"]["score"] == pytest.approx(
            0.31 * methods["baseline"]["hr@10"] + 0.69 * methods["baseline"]["ndcg@10"])

        # The default preset's index replaced by one built from the baseline checkpoint.
        settings = load_settings("1M", chain["config"].overrides())
        report_before = (paths.reports / "evaluation.json").read_bytes()
        kept = paths.indexes / "default.kept"
        shutil.move(paths.indexes / "default", kept)
        shutil.copytree(paths.indexes / "baseline", paths.indexes / "default")
        try:
            with pytest.raises(IndexMismatchError, match="built from checkpoint"):
                evaluate_track(paths, settings)
            assert (paths.reports / "evaluation.json").read_bytes() == report_before
        finally:
            shutil.rmtree(paths.indexes / "default")
            shutil.move(kept, paths.indexes / "default")


def test_an_ensemble_checkpoint_goes_through_index_report_and_submission(chain, tmp_path):
    """A preset of two members: its index holds the joined vectors (2 x d_model), the report
    ranks with it beside the configured model, and a submission can be written from it."""
    import faiss
    import yaml

    preset = tmp_path / "ensemble.yaml"
    preset.write_text(yaml.safe_dump({"model": {"members": 2}}))
    paths = TrackPaths(chain["root"] / "data", "1M")
    with pytest.MonkeyPatch.context() as mp:
        _env(mp)
        ensemble = _with(chain["config"], training={"preset": str(preset), "max_steps": 20})
        trained = materialize([encoder_checkpoint, faiss_index], partition_key="1M",
                              resources={"taac": ensemble}, instance=chain["instance"])
        assert trained.success
        assert faiss.read_index(str(paths.indexes / "ensemble" / "index.faiss")).d == 2 * 64
        compared = _with(chain["config"], evaluation={"baseline_preset": str(preset)})
        result = materialize([user_vectors, evaluation_report], partition_key="1M", resources={"taac": compared},
                             instance=chain["instance"])
        assert result.success
        methods = json.loads((paths.reports / "evaluation.json").read_text())["methods"]
        # The comparison row (the report's "baseline" method) is the ensemble's.
        assert "baseline" in methods and 0 < methods["baseline"]["hr@10"] <= 1
        out = tmp_path / "submission.json"
        submission_for_track(paths, load_settings("1M", ensemble.overrides()), path=out)
        top = np.asarray(read_submission(out)["top10s"])
        assert top.shape[1] == 10 and np.isin(top, _pool_creative_ids(paths)).all()
        restored = materialize([evaluation_report], partition_key="1M", resources={"taac": chain["config"]},
                               instance=chain["instance"])
        assert restored.success


def test_low_recall_fails_the_blocking_check_and_holds_back_the_report(chain):
    """Write, audit, publish: an index below the recall floor is measured before it is saved,
    kept under indexes/rejected/, and never replaces the published index."""
    paths = TrackPaths(chain["root"] / "data", "1M")
    report_before = (paths.reports / "evaluation.json").read_bytes()
    published = {f.name: f.read_bytes() for f in (paths.indexes / "default").iterdir()}
    with pytest.MonkeyPatch.context() as mp:
        _env(mp)
        mp.setenv("TAAC_RETRIEVAL__TUNE", "false")
        mp.setenv("TAAC_RETRIEVAL__NLIST", "16")
        weak = _with(chain["config"], retrieval={"index": "ivf", "nprobe": 1, "recall_floor": 0.99})
        result = materialize([faiss_index, evaluation_report], partition_key="1M", resources={"taac": weak},
                             instance=chain["instance"], raise_on_error=False)
        check = {e.check_name: e for e in result.get_asset_check_evaluations()}[RECALL_CHECK]
        assert not check.passed and check.metadata["recall@10"].value < 0.99
        materialized = {e.asset_key for e in result.get_asset_materialization_events()}
        assert AssetKey("evaluation_report") not in materialized and AssetKey("faiss_index") not in materialized
        assert (paths.reports / "evaluation.json").read_bytes() == report_before
        assert {f.name: f.read_bytes() for f in (paths.indexes / "default").iterdir()} == published
        [rejected] = (paths.indexes / "rejected").glob("default-*")
        assert (rejected / "index.faiss").is_file() and check.metadata["rejected_index"].value == str(rejected)
        failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
        assert str(rejected) in failure.event_specific_data.error.message
        mp.delenv("TAAC_RETRIEVAL__TUNE")
        mp.delenv("TAAC_RETRIEVAL__NLIST")
        restored = materialize([faiss_index], partition_key="1M", resources={"taac": chain["config"]}, instance=chain["instance"])
        assert restored.success


def test_checkpoint_from_other_data_and_an_empty_pool_are_refused(chain, tmp_path):
    """A checkpoint trained on another dataset (other vocabularies) and a warehouse whose
    candidate pool is empty: clear errors, and no index written."""
    source = TrackPaths(chain["root"] / "data", "1M")
    other_config = TaacConfig(data_root=str(tmp_path / "data"), synthetic={"num_users": 300, "num_items": 700})
    with pytest.MonkeyPatch.context() as mp:
        _env(mp)
        with DagsterInstance.ephemeral(tempdir=str(tmp_path / "home")) as instance:
            assert materialize(CHAIN[:3], partition_key="1M", resources={"taac": other_config}, instance=instance).success
    paths = TrackPaths(tmp_path / "data", "1M")
    settings = load_settings("1M", other_config.overrides())
    (paths.checkpoints / "default").mkdir(parents=True)
    shutil.copy(source.checkpoints / "default" / "last.pt", paths.checkpoints / "default" / "last.pt")
    with pytest.raises(CheckpointMismatchError, match="num_item_rows: checkpoint") as error:
        build_track_index(paths, settings)
    assert "last.pt" in str(error.value) and "Re-materialize encoder_checkpoint" in str(error.value)
    assert not (paths.indexes / "default").exists()

    con = duckdb.connect(str(paths.warehouse))
    con.execute("DELETE FROM candidates")
    con.close()
    with pytest.raises(EvaluationError, match="candidate pool .* is empty"):
        build_track_index(paths, settings)
    assert not (paths.indexes / "default").exists()


def test_submission_for_a_predict_seq_file_reads_it_like_the_training_data(chain, tmp_path, monkeypatch):
    """A predict_seq.jsonl (competition format) whose users repeat holdout users' histories and
    profiles gets exactly their top-10; an unknown user with unknown items still gets 10."""
    _env(monkeypatch)  # the chain's settings (validation users: the arrays it trained on)
    paths = TrackPaths(chain["root"] / "data", "1M")
    con = duckdb.connect(str(paths.warehouse), read_only=True)
    rows = con.execute(
        """SELECT h.user_id, h.history_item_ids, h.history_action_types, h.history_timestamps,
                  u.f103, u.f104, u.f105, u.f109, u.f106, u.f107, u.f108, u.f110
           FROM holdout h JOIN users u USING (user_id) ORDER BY h.user_id LIMIT 5"""
    ).fetchall()
    con.close()
    names = ["103", "104", "105", "109", "106", "107", "108", "110"]
    lines = []
    for user, items, actions, times, *features in rows:
        profile = {name: value for name, value in zip(names, features) if value is not None}
        records = [[user, item, None, {}, action, ts] for item, action, ts in zip(items, actions, times)]
        lines.append(json.dumps([[user, None, profile, None, None, None], *records]))
    lines.append(json.dumps([[10_000_000, 99_999_999, None, {}, 1, 1_700_000_000]]))
    predict = tmp_path / "predict_seq.jsonl"
    predict.write_text("\n".join(lines) + "\n")

    settings = load_settings("1M", chain["config"].overrides())
    summary = submission_for_track(paths, settings, predict_file=predict, path=tmp_path / "submission.json")
    assert summary["users"] == 6 and summary["source"].startswith("predict_seq")
    data = read_submission(tmp_path / "submission.json")
    assert data["user"] == [r[0] for r in rows] + [10_000_000]
    holdout = read_submission(paths.reports / "submission.json")
    by_user = dict(zip(holdout["user"], holdout["top10s"]))
    con = duckdb.connect(str(paths.warehouse), read_only=True)
    raw = dict(con.execute("SELECT user_id, raw_user_id FROM users").fetchall())
    con.close()
    for user, top in zip(data["user"][:5], data["top10s"][:5]):
        assert top == by_user[raw[user]]
    assert len(set(data["top10s"][5])) == 10

    broken = tmp_path / "broken" / "predict_seq.jsonl"
    broken.parent.mkdir()
    broken.write_text(lines[0] + "\n[[1, 2, null\n")
    with pytest.raises(DataFormatError, match="line 2"):
        submission_for_track(paths, settings, predict_file=broken, path=tmp_path / "never.json")
    assert not (tmp_path / "never.json").exists()


# --- A released pool without some holdout targets (real data) --------------------------------
def _demo_with_a_released_pool(target: Path) -> Path:
    """The demo sample plus a predict_set.jsonl (the released pool): every item of the sample
    but the last click of every other user, so about half the holdout targets are outside it."""
    from taac_dagster.safe_pickle import load_indexer
    from tests.conftest import DEMO_FIXTURE

    shutil.copytree(DEMO_FIXTURE, target)
    raw_of = {re_id: raw for raw, re_id in load_indexer(target / "indexer.pkl")["i"].items()}
    features, left_out = {}, set()
    for n, line in enumerate((target / "seq.jsonl").read_text().splitlines()):
        records = [r for r in json.loads(line) if r[1] is not None]
        for _user, item, _profile, item_features, _action, _ts in records:
            features.setdefault(item, {k: v for k, v in (item_features or {}).items() if k != "111"})
        clicks = [r[1] for r in sorted(records, key=lambda r: r[5]) if r[4] == 1]
        if clicks and n % 2 == 0:
            left_out.add(clicks[-1])
    pool = [item for item in sorted(features) if item not in left_out]
    rows = [{"creative_id": raw_of[item], "retrieval_id": i + 1, "features": features[item]} for i, item in enumerate(pool)]
    (target / "predict_set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return target


@pytest.fixture(scope="module")
def released_chain(tmp_path_factory):
    """The demo sample with a released pool that misses about half the targets, through the chain."""
    root = tmp_path_factory.mktemp("released_pool")
    dataset = _demo_with_a_released_pool(root / "demo")
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("TAAC_")]:
            mp.delenv(key)
        for key, value in {**ENV, "TAAC_TRAINING__VAL_USERS": "0"}.items():
            mp.setenv(key, value)
        config = TaacConfig(data_root=str(root / "data"), source="local", local_path=str(dataset),
                            training={"max_steps": 4})
        with DagsterInstance.ephemeral(tempdir=str(root / "home")) as instance:
            result = materialize(CHAIN, partition_key="1M", resources={"taac": config}, instance=instance)
        yield {"result": result, "paths": TrackPaths(root / "data", "1M"), "config": config}


def _holdout_targets(paths: TrackPaths) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    """Per holdout user (user order): raw user id, target creative id, whether it is released;
    and the released pool's creative ids."""
    con = duckdb.connect(str(paths.warehouse), read_only=True)
    try:
        rows = con.execute(
            """SELECT u.raw_user_id, c.creative_id, c.released
               FROM holdout h JOIN users u USING (user_id) JOIN candidates c ON c.item_id = h.target_item_id
               ORDER BY h.user_id"""
        ).fetchall()
        released = con.execute("SELECT creative_id FROM candidates WHERE released").fetchnumpy()["creative_id"]
    finally:
        con.close()
    users, target, inside = zip(*rows)
    return list(users), np.asarray(target, np.int64), np.asarray(inside, bool), released.astype(np.int64)


def test_targets_outside_the_released_pool_are_misses_and_the_extended_row_keeps_them(released_chain):
    """Headline on the released pool: the report's model figures are exactly those of the
    submission's lists (released items only) against the targets, a target outside the pool
    never counts; the share of such targets is reported; the extended pool is a row apart."""
    result, paths = released_chain["result"], released_chain["paths"]
    assert result.success
    users, target, inside, released = _holdout_targets(paths)
    outside_share = 1 - inside.mean()
    assert 0.3 < outside_share < 0.7  # every other user's target was left out of the release
    figures = json.loads((paths.reports / "evaluation.json").read_text())
    assert figures["provenance"]["figures"]["targets_outside_pool_share"] == pytest.approx(outside_share)
    assert figures["provenance"]["released_candidates"] == len(released) < figures["provenance"]["candidates"]
    assert set(figures["methods"]) == {"model", "model_extended", "popularity"}
    meta = _metadata(result, "evaluation_report")
    assert meta["targets_outside_pool_share"] == pytest.approx(outside_share, abs=1e-5)
    assert meta["search_backend"] == "faiss"
    extended = figures["methods"]["model_extended"]
    assert meta["model_extended_score"] == pytest.approx(extended["score"], abs=1e-4)
    assert extended["users"] == figures["methods"]["model"]["users"] == len(users)
    assert "| model (pool + missing targets) |" in meta["headline"]
    assert f"{100 * outside_share:.1f}% of the targets are outside it" in (paths.reports / "evaluation.md").read_text()

    # The submission recommends released items only, none of the targets the warehouse added.
    data = read_submission(paths.reports / "submission.json")
    assert [str(u) for u in data["user"]] == [str(u) for u in users]
    top = np.asarray(data["top10s"])
    assert np.isin(top, released).all() and not np.isin(top, target[~inside]).any()
    # Its lists are the model row's: HR@10 / NDCG@10 recomputed from them match the headline.
    hits = top == target[:, None]
    rank = np.where(hits.any(axis=1), hits.argmax(axis=1), -1)
    assert (rank[~inside] == -1).all()
    model = figures["methods"]["model"]
    assert model["hr@10"] == pytest.approx((rank >= 0).mean())
    assert model["ndcg@10"] == pytest.approx(np.where(rank >= 0, 1 / np.log2(rank + 2.0), 0).mean())
    assert model["hr@10"] <= 1 - outside_share


def test_the_torch_backend_gives_the_faiss_top_10(released_chain, tmp_path, monkeypatch):
    """evaluation.search_backend=torch (exact matmul + top-k, on the CPU here): the same report
    figures and the same submission lists as Faiss, and the backend is recorded."""
    _env(monkeypatch)
    monkeypatch.setenv("TAAC_TRAINING__VAL_USERS", "0")
    paths = released_chain["paths"]
    overrides = released_chain["config"].overrides()
    runs = {}
    for backend in ("faiss", "torch"):
        settings = load_settings("1M", {**overrides, "evaluation": {"search_backend": backend}})
        evaluation = evaluate_track(paths, settings)
        summary = submission_for_track(paths, settings, path=tmp_path / f"{backend}.json")
        runs[backend] = (evaluation, summary, read_submission(tmp_path / f"{backend}.json"))
    (faiss_eval, faiss_summary, faiss_lists), (torch_eval, torch_summary, torch_lists) = runs["faiss"], runs["torch"]
    assert faiss_eval.search_backend == faiss_summary["search_backend"] == "faiss"
    assert torch_eval.search_backend == torch_summary["search_backend"] == "torch-cpu"
    assert torch_lists["user"] == faiss_lists["user"]
    # Both searches are exact, but they sum the inner products in different orders: two items
    # whose scores tie to float precision may come out in either order, nothing else may differ.
    swapped = 0
    for mine, theirs in zip(torch_lists["top10s"], faiss_lists["top10s"], strict=True):
        moved = [i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b]
        if moved:
            i = moved[0]
            assert moved == [i, i + 1] and (mine[i], mine[i + 1]) == (theirs[i + 1], theirs[i]), (mine, theirs)
            swapped += 1
    assert swapped <= max(1, len(faiss_lists["user"]) // 50)
    assert torch_eval.headline.keys() == faiss_eval.headline.keys() and "model_extended" in torch_eval.headline
    users = len(faiss_lists["user"])
    for method, figures in faiss_eval.headline.items():
        # A swap moves a target at most one rank: NDCG by under 1 / users, HR@10 not at all.
        assert torch_eval.headline[method] == pytest.approx(figures, abs=swapped / users + 1e-12), method
    assert torch_eval.targets_outside_pool_share == faiss_eval.targets_outside_pool_share > 0
