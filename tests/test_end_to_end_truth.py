"""What the suite claims about a real chain run, checked through the real id mappings: the
files a user would read (``submission.json``: raw user ids and raw creative ids;
``evaluation.json``: the headline) against the warehouse (DuckDB), with the metrics
recomputed here by an implementation of their own (plain Python, ``docs/domain.md``), not the
project's.

- History filter, both tracks: no user's top-10 holds an item of that user's own history.
- Headline, both tracks: HR@10, NDCG@10, Score (and on 10M the weighted w-*) of the report's
  model row are those of the submission's lists against the holdout targets.
- Weighted 10M metrics on a tiny case computed by hand: a conversion and later clicks (one on
  an item outside the pool), an item clicked after it converted, a user without conversion.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import duckdb
import numpy as np
import pytest
from dagster import DagsterInstance, materialize

from assets.evaluation import submission
from models import holdout_scoring
from models.submission import read_submission, write_submission
from taac_dagster.paths import TrackPaths
from taac_dagster.resources import TaacConfig
from taac_dagster.settings import load_settings
from taac_dagster.steps.submission import raw_user_ids, submission_for_track
from tests.conftest import CHAIN_ENV, full_chain

pytestmark = pytest.mark.slow

# docs/domain.md, written out again rather than read from taac_dagster/tracks.py.
RELEVANCE = {0: 0.0, 1: 1.0, 2: 2.5}  # exposure, click, conversion
K = 10


# --- Reading the truth from the warehouse, in raw ids ------------------------------------------
def _query(paths: TrackPaths, sql: str) -> list[tuple]:
    con = duckdb.connect(str(paths.warehouse), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _histories(paths: TrackPaths) -> dict[str, set[int]]:
    """Raw user id -> raw creative ids of every event strictly before the user's test target
    (``events``, not the holdout's own history list), for every holdout user."""
    rows = _query(paths, """
        SELECT u.raw_user_id, coalesce(list(DISTINCT i.creative_id) FILTER (WHERE i.creative_id IS NOT NULL), [])
        FROM holdout h JOIN users u USING (user_id)
        LEFT JOIN events e ON e.user_id = h.user_id AND e.position < h.target_position
        LEFT JOIN items i ON i.item_id = e.item_id
        GROUP BY u.raw_user_id""")
    return {str(user): set(items) for user, items in rows}


def _targets(paths: TrackPaths) -> dict[str, tuple[int, dict[int, float]]]:
    """Raw user id -> (the test target's raw creative id, {raw creative id: relevance} of every
    positive from the target on)."""
    creative = dict(_query(paths, "SELECT item_id, creative_id FROM items"))
    rows = _query(paths, """
        SELECT u.raw_user_id, h.target_item_id, h.target_item_ids, h.target_action_types
        FROM holdout h JOIN users u USING (user_id)""")
    return {
        str(user): (creative[target], {creative[i]: RELEVANCE[a] for i, a in zip(items, actions)})
        for user, target, items, actions in rows
    }


def recompute(paths: TrackPaths, submission: dict[str, list]) -> dict[str, float]:
    """HR@10, NDCG@10, Score and the weighted w-* of a submission against the holdout."""
    lists = {str(u): top for u, top in zip(submission["user"], submission["top10s"])}
    targets = _targets(paths)
    assert set(lists) == set(targets)  # every holdout user, nobody else
    hr = ndcg = w_hr = w_ndcg = 0.0
    for user, (target, relevance) in targets.items():
        top = lists[user][:K]
        if target in top:
            hr += 1
            ndcg += 1 / math.log2(top.index(target) + 2)
        w_hr += sum(w for item, w in relevance.items() if item in top) / sum(relevance.values())
        dcg = sum(w / math.log2(top.index(item) + 2) for item, w in relevance.items() if item in top)
        ideal = sorted(relevance.values(), reverse=True)[:K]
        w_ndcg += dcg / sum(w / math.log2(rank + 2) for rank, w in enumerate(ideal))
    n = len(targets)
    figures = {"hr@10": hr / n, "ndcg@10": ndcg / n, "w_hr@10": w_hr / n, "w_ndcg@10": w_ndcg / n}
    figures["score"] = 0.31 * figures["hr@10"] + 0.69 * figures["ndcg@10"]
    figures["w_score"] = 0.31 * figures["w_hr@10"] + 0.69 * figures["w_ndcg@10"]
    return figures


def _offenders(submission: dict[str, list], histories: dict[str, set[int]]) -> dict[str, list[int]]:
    return {
        str(user): sorted(set(top) & histories[str(user)])
        for user, top in zip(submission["user"], submission["top10s"])
        if set(top) & histories[str(user)]
    }


# --- On the synthetic default's chain (tests/conftest.py ``chain``) ------------------------------
@pytest.mark.parametrize("track", ["1M", "10M"])
def test_no_top_10_holds_an_item_of_the_users_own_history(chain, track, tmp_path, monkeypatch):
    """The submission (raw ids) against every event before each user's target (warehouse, raw
    ids). The report keeps no per-user lists: its model row is tied to the submission's lists
    by the headline test below. Control: with the filter off, the same check finds offenders."""
    assert chain["results"][track].success
    paths = TrackPaths(chain["root"] / "data", track)
    histories = _histories(paths)
    submission = read_submission(paths.reports / "submission.json")
    assert len(submission["user"]) == len(histories)
    assert _offenders(submission, histories) == {}

    for key, value in CHAIN_ENV.items():
        monkeypatch.setenv(key, value)
    settings = load_settings(track, {**chain["config"].overrides(), "evaluation": {"exclude_history": False}})
    submission_for_track(paths, settings, path=tmp_path / "unfiltered.json")
    assert len(_offenders(read_submission(tmp_path / "unfiltered.json"), histories)) > len(histories) / 2


@pytest.mark.parametrize("track", ["1M", "10M"])
def test_the_headline_is_the_submissions_lists_against_the_holdout(chain, track):
    """The report's model row (as the chain wrote it) equals HR@10, NDCG@10, Score, and on 10M
    w-HR@10, w-NDCG@10, w-Score, recomputed here from submission.json and the holdout."""
    paths = TrackPaths(chain["root"] / "data", track)
    model = chain["reports"][track]["methods"]["model"]
    figures = recompute(paths, read_submission(paths.reports / "submission.json"))
    names = ["hr@10", "ndcg@10", "score"] + (["w_hr@10", "w_ndcg@10", "w_score"] if track == "10M" else [])
    assert {name: model[name] for name in names} == pytest.approx({name: figures[name] for name in names}, abs=1e-9)
    assert 0 < figures["hr@10"] < 1  # neither vacuous nor trivial
    if track == "10M":
        # Not the single-target figures again: some users have later clicks, and some of those
        # clicks are on items outside the candidate pool (a miss that still weighs).
        assert figures["w_hr@10"] != pytest.approx(figures["hr@10"])
        outside = _query(paths, """SELECT count(*) FROM (SELECT unnest(target_item_ids) AS item_id FROM holdout)
                                   ANTI JOIN candidates USING (item_id)""")[0][0]
        assert outside > 0


# --- The weighted 10M metrics on a tiny case computed by hand ------------------------------------
CREATIVE = {item: 20_000_000_100 + item for item in range(1, 13)}  # raw creative ids of items 1..12
POOL = range(1, 12)  # the released pool (predict_set.jsonl): item 12 is left out
CLICK, CONVERSION, EXPOSURE = 1, 2, 0
# raw user id -> (item, action type, timestamp) in time order
EVENTS = {
    # target: the conversion on 3; later positives: 5 (click), 12 (click, outside the pool)
    "user_A": [(1, EXPOSURE, 100), (2, CLICK, 110), (3, CONVERSION, 120), (4, EXPOSURE, 130), (5, CLICK, 140),
               (12, CLICK, 150), (6, EXPOSURE, 160)],
    # target: the conversion on 8; 8 clicked again later counts once, as a conversion; then 10 (click)
    "user_B": [(7, EXPOSURE, 200), (8, CONVERSION, 210), (9, EXPOSURE, 220), (8, CLICK, 230), (10, CLICK, 240)],
    # no conversion: the target is the last click (11), the earlier click on 4 is history
    "user_C": [(4, CLICK, 300), (6, EXPOSURE, 310), (11, CLICK, 320), (2, EXPOSURE, 330)],
    # exposures only: no target, not scored
    "user_D": [(1, EXPOSURE, 400), (9, EXPOSURE, 410)],
}
# The model's lists (items; written as raw creative ids), 10 of the 11 pool items each.
LISTS = {
    "user_A": [5, 7, 3, 8, 9, 10, 11, 4, 6, 1],  # 5 at rank 1, 3 at rank 3; 12 cannot be listed
    "user_B": [1, 2, 4, 10, 5, 6, 7, 9, 11, 3],  # 10 at rank 4, 8 missed
    "user_C": [1, 11, 2, 3, 4, 5, 6, 7, 8, 9],  # 11 at rank 2
}
L2_3, L2_5 = math.log2(3), math.log2(5)
# Single target: A's 3 at rank 3, B's 8 missed, C's 11 at rank 2.
HR = (1 + 0 + 1) / 3
NDCG = (1 / math.log2(4) + 0 + 1 / L2_3) / 3
# Weighted: A {3: 2.5, 5: 1, 12: 1}, B {8: 2.5, 10: 1}, C {11: 1}.
W_HR = (
    (2.5 + 1) / (2.5 + 1 + 1)  # A: 3 and 5 listed, 12 missed (outside the pool, it still weighs)
    + 1 / (2.5 + 1)  # B: 10 listed
    + 1 / 1  # C
) / 3
W_NDCG = (
    # A: DCG 1/log2(2) (5 at rank 1) + 2.5/log2(4) (3 at rank 3); ideal 2.5, 1, 1 at ranks 1-3
    (1 + 2.5 / 2) / (2.5 + 1 / L2_3 + 1 / 2)
    # B: DCG 1/log2(5) (10 at rank 4); ideal 2.5, 1 at ranks 1-2
    + (1 / L2_5) / (2.5 + 1 / L2_3)
    # C: 11 at rank 2, ideal at rank 1
    + (1 / L2_3) / 1
) / 3


def _write_tiny_10m(root: Path) -> Path:
    """EVENTS in the competition format: seq.jsonl, indexer.pkl and the released pool."""
    root.mkdir(parents=True)
    users = {raw: n for n, raw in enumerate(EVENTS, start=1)}
    lines = []
    for raw, events in EVENTS.items():
        user = users[raw]
        records = [[user, None, {"103": 1}, None, None, None]]
        records += [[user, item, None, {"100": 1}, action, ts] for item, action, ts in events]
        lines.append(json.dumps(records))
    (root / "seq.jsonl").write_text("\n".join(lines) + "\n")
    pool = [{"creative_id": CREATIVE[item], "retrieval_id": n, "features": {"100": 1}} for n, item in enumerate(POOL, 1)]
    (root / "predict_set.jsonl").write_text("".join(json.dumps(row) + "\n" for row in pool))
    indexer = {"u": users, "i": {CREATIVE[item]: item for item in CREATIVE},
               "f": {"100": {1_000_001: 1}, "103": {1_030_001: 1}}}
    with open(root / "indexer.pkl", "wb") as handle:
        pickle.dump(indexer, handle)
    return root


def test_weighted_metrics_of_a_tiny_10m_case_are_the_hand_computed_ones(tmp_path, monkeypatch):
    """The tiny case through the real chain (competition files -> warehouse holdout -> arrays ->
    report), the model row's lists replaced by LISTS (mapped through the pool's raw creative
    ids): the report gives exactly the hand-computed figures, and so does this module's
    ``recompute`` on the same lists written as a submission."""
    for key in [k for k in os.environ if k.startswith("TAAC_")]:
        monkeypatch.delenv(key)
    for key, value in {"TAAC_TRAINING__THREADS": "1", "TAAC_TRAINING__VAL_USERS": "0"}.items():
        monkeypatch.setenv(key, value)
    dataset = _write_tiny_10m(tmp_path / "tiny_10m")
    paths = TrackPaths(tmp_path / "data", "10M")
    by_creative = {}

    def known_lists(run, chunk):
        if not by_creative:
            by_creative.update({int(c): pos for pos, c in enumerate(run.setup.creative)})
        users = raw_user_ids(paths.warehouse, np.asarray(run.setup.arrays.hold_users[chunk.rows]).astype(np.int64))
        return np.array([[by_creative[CREATIVE[item]] for item in LISTS[str(u)]] for u in users])

    monkeypatch.setitem(holdout_scoring.SCORING_METHODS, "model", holdout_scoring.ScoringMethod(known_lists, timer="search"))
    config = TaacConfig(data_root=str(tmp_path / "data"), source="local", local_path=str(dataset),
                        training={"max_steps": 1})
    with DagsterInstance.ephemeral(tempdir=str(tmp_path / "home")) as instance:
        chain = [a for a in full_chain() if a is not submission]
        result = materialize(chain, partition_key="10M", resources={"taac": config}, instance=instance)
    assert result.success
    assert _query(paths, "SELECT u.raw_user_id FROM holdout JOIN users u USING (user_id) ORDER BY 1") == [
        ("user_A",), ("user_B",), ("user_C",)]
    model = json.loads((paths.reports / "evaluation.json").read_text())["methods"]["model"]
    hand = {"hr@10": HR, "ndcg@10": NDCG, "score": 0.31 * HR + 0.69 * NDCG,
            "w_hr@10": W_HR, "w_ndcg@10": W_NDCG, "w_score": 0.31 * W_HR + 0.69 * W_NDCG}
    assert model["users"] == 3
    assert {name: model[name] for name in hand} == pytest.approx(hand, abs=1e-12)

    lists = {user: [CREATIVE[item] for item in items] for user, items in LISTS.items()}
    write_submission(tmp_path / "known.json", list(lists.values()), list(lists), [CREATIVE[i] for i in POOL])
    assert recompute(paths, read_submission(tmp_path / "known.json")) == pytest.approx(hand, abs=1e-12)
