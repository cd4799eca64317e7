"""The synthetic source: real formats, determinism, planted structure, exact ground truth."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from taac_dagster.formats import (
    CANDIDATE_FEATURE_STRUCT,
    HUB_SEQ_EVENT,
    ITEM_SPARSE_FEATURES,
    USER_ARRAY_FEATURES,
    USER_SPARSE_FEATURES,
)
from taac_dagster.safe_pickle import load_indexer
from taac_dagster.settings import SyntheticSettings
from taac_dagster.sources.synthetic import (
    GroundTruth,
    SyntheticSummary,
    generate_dataset,
    load_ground_truth,
)

SMALL = dict(num_users=1_500, num_items=2_000, num_topics=8, mean_history=40, cold_items=30, max_embedding_dim=16)
FAMILIES = [81, 82]
HUB_ITEM_COLUMNS = [f for f in ITEM_SPARSE_FEATURES if f != "111"]


def _generate(root: Path, track: str = "1M", families=FAMILIES, **overrides) -> tuple[Path, SyntheticSummary]:
    cfg = SyntheticSettings(**{**SMALL, **overrides})
    root.mkdir(parents=True)
    return root, generate_dataset(root, track, cfg, families)


@pytest.fixture(scope="module")
def hub_1m(tmp_path_factory) -> tuple[Path, SyntheticSummary]:
    return _generate(tmp_path_factory.mktemp("synthetic") / "hub_1m")


@pytest.fixture(scope="module")
def hub_10m(tmp_path_factory) -> tuple[Path, SyntheticSummary]:
    return _generate(tmp_path_factory.mktemp("synthetic") / "hub_10m", track="10M")


@pytest.fixture(scope="module")
def jsonl_1m(tmp_path_factory) -> tuple[Path, SyntheticSummary]:
    return _generate(tmp_path_factory.mktemp("synthetic") / "jsonl_1m", format="competition_jsonl")


@dataclass
class Events:
    offsets: np.ndarray  # int64[U + 1]
    item: np.ndarray
    action: np.ndarray
    timestamp: np.ndarray

    @property
    def owner(self) -> np.ndarray:  # user re-id per event
        return np.repeat(np.arange(1, len(self.offsets)), np.diff(self.offsets))


def read_hub_events(root: Path) -> Events:
    table = pq.read_table(root / "seq" / "part-00000.parquet")
    assert table.column("user_id").to_pylist() == list(range(1, table.num_rows + 1))
    seq = table.column("seq").combine_chunks()
    events = seq.flatten()
    return Events(
        offsets=seq.offsets.to_numpy().astype(np.int64),
        item=events.field("item_id").to_numpy(),
        action=events.field("action_type").to_numpy(),
        timestamp=events.field("timestamp").to_numpy(),
    )


def read_jsonl_lines(root: Path) -> list[list]:
    text = (root / "seq.jsonl").read_text()
    assert not text.endswith("\n"), "the real seq.jsonl has no newline after its last line"
    return [json.loads(line) for line in text.split("\n")]


def holdout(events: Events, target_types: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per user: (target item, previous item or 0, target position) as a holdout builds them."""
    targets, prevs, positions = [], [], []
    for u in range(len(events.offsets) - 1):
        lo, hi = events.offsets[u], events.offsets[u + 1]
        actions = events.action[lo:hi]
        position = -1
        for action_type in target_types:
            hits = np.flatnonzero(actions == action_type)
            if hits.size:
                position = lo + hits[-1]
                break
        targets.append(events.item[position] if position >= 0 else 0)
        prevs.append(events.item[position - 1] if position > lo else 0)
        positions.append(position)
    return np.array(targets), np.array(prevs), np.array(positions)


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --- determinism -------------------------------------------------------------------------------
def test_same_seed_writes_identical_files_and_another_seed_differs(tmp_path, hub_1m):
    root, _ = hub_1m
    again, _ = _generate(tmp_path / "again")
    assert file_hashes(again) == file_hashes(root)

    other, _ = _generate(tmp_path / "other", seed=7)
    differ = {k for k, v in file_hashes(other).items() if file_hashes(root).get(k) != v}
    assert {"seq/part-00000.parquet", "indexer.pkl", "ground_truth/users.parquet"} <= differ


def test_jsonl_is_deterministic(tmp_path, jsonl_1m):
    root, _ = jsonl_1m
    again, _ = _generate(tmp_path / "again", format="competition_jsonl")
    assert file_hashes(again) == file_hashes(root)


def test_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "left_over.txt").write_text("x")
    with pytest.raises(FileExistsError):
        generate_dataset(tmp_path, "1M", SyntheticSettings(**SMALL), [81])


# --- Hub parquet layout ------------------------------------------------------------------------
def test_hub_layout_and_schemas(hub_1m):
    root, summary = hub_1m
    seq = pq.read_schema(root / "seq" / "part-00000.parquet")
    assert seq.field("user_id").type == pa.int64()
    assert seq.field("seq").type == pa.list_(HUB_SEQ_EVENT)
    assert pq.ParquetFile(root / "seq" / "part-00000.parquet").metadata.num_rows == summary.users

    users = pq.read_schema(root / "user_feat" / "part-00000.parquet")
    assert users.names == ["user_id", *USER_SPARSE_FEATURES, *USER_ARRAY_FEATURES]
    for f in USER_SPARSE_FEATURES:
        assert users.field(f).type == pa.int64()
    for f in USER_ARRAY_FEATURES:
        assert users.field(f).type == pa.list_(pa.int64())
    user_table = pq.read_table(root / "user_feat" / "part-00000.parquet")
    assert 0 < user_table.column("108").null_count < summary.users  # some users lack features

    items = pq.read_table(root / "item_feat" / "part-00000.parquet")
    assert items.column_names == ["item_id", *HUB_ITEM_COLUMNS]
    assert all(items.schema.field(f).type == pa.int64() for f in items.column_names)
    assert items.column("item_id").to_pylist() == list(range(1, summary.items + 1))
    assert items.column("115").null_count > 0.5 * summary.items  # mostly absent, as in the real data

    candidates = pq.read_table(root / "candidate" / "part-00000.parquet")
    assert candidates.column_names == ["item_id", "retrieval_id", *HUB_ITEM_COLUMNS]
    for f in HUB_ITEM_COLUMNS:
        assert candidates.schema.field(f).type == CANDIDATE_FEATURE_STRUCT
    retrieval = candidates.column("retrieval_id").to_numpy()
    assert sorted(retrieval.tolist()) == list(range(1, len(retrieval) + 1))
    assert candidates.num_rows == summary.candidates
    assert candidates.column("item_id").to_numpy().min() > 20_000_000_000  # raw creative ids

    for family, dim in summary.families.items():
        emb = pq.read_table(root / "mm_emb" / f"emb_{family}_{dim}_parquet" / "part-00000.parquet")
        assert emb.schema.field("anonymous_cid").type == pa.string()  # digits, like the real release
        assert emb.column("anonymous_cid").to_pylist()[0].isdigit()
        assert emb.schema.field("emb").type == pa.list_(pa.float32())
        lengths = np.diff(emb.column("emb").combine_chunks().offsets.to_numpy())
        assert (lengths == dim).all()
    assert summary.families == {81: 16, 82: 16}

    truth = root / "ground_truth"
    assert {p.name for p in truth.iterdir()} == {"items.parquet", "users.parquet", "model.json"}


def test_summary_counts_match_the_files(hub_10m):
    root, summary = hub_10m
    events = read_hub_events(root)
    assert summary.events == len(events.item)
    assert summary.clicks == int((events.action == 1).sum())
    assert summary.conversions == int((events.action == 2).sum())
    assert summary.users_with_target == summary.users
    assert summary.bytes_written == sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    metadata = summary.to_metadata()
    assert json.loads(json.dumps(metadata)) == metadata
    assert metadata["families"] == {"81": 16, "82": 16}
    # The reported rate is the events counted in the files over the seconds the generator measured.
    assert metadata["seconds"] > 0
    assert metadata["events_per_second"] == pytest.approx(len(events.item) / summary.seconds, rel=1e-3)


# --- competition JSONL layout ------------------------------------------------------------------
def test_jsonl_layout_matches_the_real_format(jsonl_1m):
    root, summary = jsonl_1m
    lines = read_jsonl_lines(root)
    assert len(lines) == summary.users
    for user_id, line in enumerate(lines[:200], start=1):
        *interactions, profile = line
        assert profile[0] == user_id and profile[1] is None and profile[3] is None and profile[4] is None
        assert isinstance(profile[2], dict) and set(profile[2]) <= set(USER_SPARSE_FEATURES + USER_ARRAY_FEATURES)
        for f in USER_ARRAY_FEATURES:
            if f in profile[2]:
                values = profile[2][f]
                assert isinstance(values, list) and len(set(values)) == len(values)
        for record in interactions:
            uid, item, user_feature, item_feature, action, ts = record
            assert uid == user_id and isinstance(item, int) and user_feature is None
            assert set(item_feature) <= set(ITEM_SPARSE_FEATURES) and "111" in item_feature
            assert all(isinstance(v, int) and v > 0 for v in item_feature.values())
            assert action in (0, 1) and isinstance(ts, int)
        stamps = [r[5] for r in line]
        assert stamps == sorted(stamps)  # the profile record closes the line, last in time

    predict = [json.loads(x) for x in (root / "predict_set.jsonl").read_text().split("\n")]
    assert len(predict) == summary.candidates
    assert [p["retrieval_id"] for p in predict] == list(range(1, len(predict) + 1))
    assert set(predict[0]) == {"creative_id", "retrieval_id", "features"}
    assert all(set(p["features"]) <= set(ITEM_SPARSE_FEATURES) for p in predict)

    for family, dim in summary.families.items():
        part = root / "creative_emb" / f"emb_{family}_{dim}" / "part-0000"
        rows = [json.loads(x) for x in part.read_text().split("\n")]
        assert set(rows[0]) == {"anonymous_cid", "emb"}
        assert all(len(r["emb"]) == dim and isinstance(r["emb"][0], float) for r in rows[:100])


def test_jsonl_and_hub_carry_the_same_data(hub_1m, jsonl_1m):
    hub_root, hub_summary = hub_1m
    jsonl_root, jsonl_summary = jsonl_1m
    hub = read_hub_events(hub_root)
    records = [r for line in read_jsonl_lines(jsonl_root) for r in line[:-1]]
    assert [r[1] for r in records] == hub.item.tolist()
    assert [r[4] for r in records] == hub.action.tolist()
    assert [r[5] for r in records] == hub.timestamp.tolist()

    # Item features inline in seq.jsonl equal the Hub item_feat rows (plus 111).
    item_feat = pq.read_table(hub_root / "item_feat" / "part-00000.parquet").to_pylist()
    for record in records[:500]:
        row = item_feat[record[1] - 1]
        expected = {f: row[f] for f in HUB_ITEM_COLUMNS if row[f] is not None}
        assert {f: v for f, v in record[3].items() if f != "111"} == expected

    hub_pool = pq.read_table(hub_root / "candidate" / "part-00000.parquet")
    predict = [json.loads(x) for x in (jsonl_root / "predict_set.jsonl").read_text().split("\n")]
    assert [p["creative_id"] for p in predict] == hub_pool.column("item_id").to_pylist()
    assert file_hashes(hub_root)["indexer.pkl"] == file_hashes(jsonl_root)["indexer.pkl"]
    assert hub_summary.candidates == jsonl_summary.candidates


# --- ids, indexer, candidate pool --------------------------------------------------------------
def test_indexer_loads_with_the_restricted_unpickler(hub_1m):
    root, summary = hub_1m
    indexer = load_indexer(root / "indexer.pkl")
    assert sorted(indexer["u"].values()) == list(range(1, summary.users + 1))
    assert sorted(indexer["i"].values()) == list(range(1, summary.items + 1))
    assert all(u.startswith("user_") and len(u) == 13 for u in list(indexer["u"])[:50])
    assert all(cid > 20_000_000_000 for cid in indexer["i"])
    assert set(indexer["f"]) == set(ITEM_SPARSE_FEATURES + USER_SPARSE_FEATURES + USER_ARRAY_FEATURES)
    for fid, vocab in indexer["f"].items():
        assert sorted(vocab.values()) == list(range(1, len(vocab) + 1))
        assert all(str(raw).startswith(fid) and raw > 10**9 for raw in list(vocab)[:20])
    # Every re-id written in the data is in the vocabulary.
    items = pq.read_table(root / "item_feat" / "part-00000.parquet")
    for fid in HUB_ITEM_COLUMNS:
        assert pa.compute.max(items.column(fid)).as_py() <= len(indexer["f"][fid])


@pytest.mark.parametrize("dataset, target_types", [("hub_1m", (1,)), ("hub_10m", (2, 1))])
def test_every_holdout_target_is_a_candidate(request, dataset, target_types):
    root, summary = request.getfixturevalue(dataset)
    events = read_hub_events(root)
    targets, _, _ = holdout(events, target_types)
    assert (targets > 0).mean() == 1.0  # every user has a target
    indexer = load_indexer(root / "indexer.pkl")
    reid = indexer["i"]
    pool = set(pq.read_table(root / "candidate" / "part-00000.parquet").column("item_id").to_pylist())
    in_pool = {cid for cid in pool if cid in reid}
    assert {cid for cid, r in reid.items() if r in set(targets.tolist())} <= in_pool
    assert len(pool) == summary.candidates


def test_cold_items_are_new_to_the_indexer_and_never_in_sequences(hub_1m):
    root, summary = hub_1m
    indexer = load_indexer(root / "indexer.pkl")
    candidates = pq.read_table(root / "candidate" / "part-00000.parquet")
    cids = candidates.column("item_id").to_numpy()
    cold = np.array([cid not in indexer["i"] for cid in cids.tolist()])
    assert cold.sum() == summary.cold_items == 30

    truth = load_ground_truth(root)
    assert set(cids[cold].tolist()) == set(truth.cold_creative_ids.tolist())
    events = read_hub_events(root)
    assert events.item.min() >= 1 and events.item.max() <= summary.items  # only warm re-ids

    # Feature structs: warm candidates are fully known; cold ones carry some unknown values
    # (feature_value 0, cold_start true) and some shared known ones.
    for fid in HUB_ITEM_COLUMNS:
        column = candidates.column(fid).combine_chunks()
        flag = column.field("cold_start").fill_null(False).to_numpy(zero_copy_only=False)
        value = column.field("feature_value").fill_null(0).to_numpy()
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        assert not (flag & valid & ~cold).any()
        assert (value[flag & valid] == 0).all()
    cold_121 = candidates.column("121").combine_chunks().field("cold_start").fill_null(False)
    assert 0 < cold_121.to_numpy(zero_copy_only=False)[cold].sum() < cold.sum()

    # Cold items have embeddings of their own in every family.
    for family, dim in summary.families.items():
        emb = pq.read_table(root / "mm_emb" / f"emb_{family}_{dim}_parquet" / "part-00000.parquet")
        assert set(cids[cold].tolist()) <= {int(c) for c in emb.column("anonymous_cid").to_pylist()}


# --- planted structure -------------------------------------------------------------------------
def test_embeddings_carry_the_topic_signal(hub_1m):
    root, summary = hub_1m
    truth = pq.read_table(root / "ground_truth" / "items.parquet").to_pandas()
    topic_of = dict(zip(truth["creative_id"], truth["topic"]))
    emb = pq.read_table(root / "mm_emb" / "emb_81_16_parquet" / "part-00000.parquet")
    cids = emb.column("anonymous_cid").to_numpy(zero_copy_only=False).astype(np.int64)
    vectors = emb.column("emb").combine_chunks().flatten().to_numpy().reshape(len(cids), 16)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    topics = np.array([topic_of[c] for c in cids.tolist()])

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(cids), size=(2, 20_000))
    cosine = (vectors[a] * vectors[b]).sum(axis=1)
    same = topics[a] == topics[b]
    same_topic, random_pairs = cosine[same & (a != b)].mean(), cosine.mean()
    assert same_topic > 0.4  # ~1 / (1 + noise**2) = 0.5
    assert random_pairs < 0.15
    assert same_topic - cosine[~same].mean() > 0.35

    warm_covered = (np.isin(truth["creative_id"][~truth["is_cold"]], cids)).mean()
    assert 0.85 < warm_covered < 0.95  # family 81 covers ~90% of items
    emb82 = pq.read_table(root / "mm_emb" / "emb_82_16_parquet" / "part-00000.parquet")
    assert emb82.num_rows < emb.num_rows  # other families cover fewer
    cids82 = emb82.column("anonymous_cid").to_numpy(zero_copy_only=False).astype(np.int64)
    warm_covered_82 = (np.isin(truth["creative_id"][~truth["is_cold"]], cids82)).mean()
    assert 0.29 < warm_covered_82 < 0.41  # family 82 covers ~35%, as the 1M release's sizes suggest
    assert np.isin(truth["creative_id"][truth["is_cold"]], cids82).all()  # every cold item has a vector
    model = json.loads((root / "ground_truth" / "model.json").read_text())
    assert model["embeddings"]["82"]["coverage"] == 0.35


def test_popularity_is_skewed(hub_1m):
    root, summary = hub_1m
    counts = np.sort(np.bincount(read_hub_events(root).item, minlength=summary.items + 1)[1:])[::-1]
    top_share = counts[: summary.items // 10].sum() / counts.sum()
    assert top_share > 0.3


def test_action_types_per_track(hub_1m, hub_10m):
    one = read_hub_events(hub_1m[0]).action
    assert set(np.unique(one).tolist()) == {0, 1}
    assert 0.07 < (one == 1).mean() < 0.14  # click_rate 0.10
    ten = read_hub_events(hub_10m[0]).action
    assert set(np.unique(ten).tolist()) == {0, 1, 2}
    assert 0.3 < (ten == 2).sum() / (ten > 0).sum() < 0.6  # conversion share 0.45


def test_sequences_are_capped_and_chronological(hub_1m):
    root, summary = hub_1m
    events = read_hub_events(root)
    lengths = np.diff(events.offsets)
    assert lengths.max() <= 100 and lengths.min() >= 2
    assert abs(lengths.mean() - SMALL["mean_history"]) < 3
    same_user = np.diff(events.owner) == 0
    assert (np.diff(events.timestamp)[same_user] >= 0).all()
    # Unix seconds in April-May 2025.
    assert events.timestamp.min() > 1_743_465_600 and events.timestamp.max() < 1_748_736_000
    gaps = np.diff(events.timestamp)[same_user]
    assert 600 < np.median(gaps) < 20_000 and gaps.max() > 86_400


# --- ground truth ------------------------------------------------------------------------------
def test_next_item_probs_rows_sum_to_one(hub_1m):
    root, summary = hub_1m
    truth = load_ground_truth(root)
    users = np.arange(1, 51)
    prev = np.r_[np.zeros(10, dtype=np.int64), np.arange(1, 41)]
    items = np.arange(1, summary.items + 1)
    for given_click in (True, False):
        probs = truth.next_item_probs(users, prev, items, given_click=given_click)
        assert probs.shape == (50, summary.items)
        assert np.allclose(probs.sum(axis=1), 1.0) and (probs >= 0).all()
    subset = truth.next_item_probs(users, prev, np.array([3, 5, 0, 7]))
    assert np.allclose(subset.sum(axis=1), 1.0) and (subset[:, 2] == 0).all()  # 0: not an item
    # Over all items, the plain next-event probabilities of a fresh user are its interests.
    probs = truth.next_item_probs(users[:1], np.zeros(1, dtype=np.int64), items, given_click=False)
    by_topic = np.bincount(truth.item_topic[items], weights=probs[0], minlength=truth.num_topics)
    assert np.allclose(by_topic, truth.user_interest[1] / truth.user_interest[1].sum(), atol=1e-6)


def test_ground_truth_is_the_process_that_generated_the_events(hub_1m):
    """Observed rates match the model: topic persistence and clicks on the top interest."""
    root, _ = hub_1m
    truth: GroundTruth = load_ground_truth(root)
    events = read_hub_events(root)
    owner = events.owner
    topic = truth.item_topic[events.item]
    follows = np.diff(owner) == 0  # event i+1 follows event i of the same user
    user, prev_topic, next_topic = owner[1:][follows], topic[:-1][follows], topic[1:][follows]
    expected = truth.stickiness + (1 - truth.stickiness) * truth.user_interest[user, prev_topic]
    observed = (next_topic == prev_topic).mean()
    assert abs(observed - expected.mean()) < 0.01

    on_top = topic == truth.user_top_topic[owner]
    clicked = events.action > 0
    assert abs(clicked[on_top].mean() - truth.clicks.p_click_top_interest) < 0.015
    assert abs(clicked[~on_top].mean() - truth.clicks.p_click_other) < 0.015


def test_oracle_beats_popularity_on_the_holdout_targets(hub_1m):
    root, summary = hub_1m
    truth = load_ground_truth(root)
    events = read_hub_events(root)
    targets, prev, positions = holdout(events, (1,))
    users = np.arange(1, summary.users + 1)

    indexer = load_indexer(root / "indexer.pkl")
    pool = pq.read_table(root / "candidate" / "part-00000.parquet").column("item_id").to_pylist()
    candidates = np.array([indexer["i"][c] for c in pool if c in indexer["i"]])

    # Popularity: event counts in the histories (everything before each user's target).
    before = np.arange(len(events.item)) < positions[events.owner - 1]
    counts = np.bincount(events.item[before], minlength=summary.items + 1)
    popular = candidates[np.argsort(-counts[candidates], kind="stable")[:10]]
    popularity_hr = np.isin(targets, popular).mean()

    top10 = truth.oracle_topk(users, prev, candidates, k=10, max_cells=50_000)
    assert top10.shape == (summary.users, 10)
    assert np.isin(top10, candidates).all()
    oracle_hr = (top10 == targets[:, None]).any(axis=1).mean()
    assert oracle_hr > 1.5 * popularity_hr and oracle_hr - popularity_hr > 0.08

    # Best first: scores along each row are non-increasing.
    probs = truth.next_item_probs(users[:20], prev[:20], candidates)
    position = {item: i for i, item in enumerate(candidates.tolist())}
    ranked = np.array([[probs[r, position[i]] for i in row] for r, row in enumerate(top10[:20].tolist())])
    assert (np.diff(ranked, axis=1) <= 1e-15).all()
