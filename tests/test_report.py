"""Ranking metrics against hand-computed cases, slices, plots and the report files."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from models.report import ReportData, write_report
from models.report_comparison import compare_figures
from models.report_figures import headline_figures, oracle_share, slice_frame, slice_metrics
from models.report_plots import plot_training_curve
from models.report_tables import headline_markdown
from models.weighted_metrics import (
    RELEVANCE,
    hits_from_ranks,
    ideal_dcg,
    metrics_from_ranks,
    ndcg_from_ranks,
    pad_targets,
    ranks_of_targets,
    relevance_weights,
    weighted_metrics,
    weighted_per_user,
)
from taac_dagster.tracks import get_track

L2_11 = 1 / math.log2(11)  # NDCG of a hit at rank 10
L2_3 = 1 / math.log2(3)  # discount of rank 2


# --- Single target -------------------------------------------------------------------------
def test_single_target_from_ranks_hand_cases():
    ranks = np.array([0, 9, -1, 10, 1])  # rank 1, rank 10, miss, just outside the top 10, rank 2
    assert hits_from_ranks(ranks).tolist() == [1, 1, 0, 0, 1]
    assert ndcg_from_ranks(ranks) == pytest.approx([1.0, L2_11, 0.0, 0.0, L2_3])
    m = metrics_from_ranks(ranks)
    hr, nd = 3 / 5, (1 + L2_11 + L2_3) / 5
    assert m == pytest.approx({"hr@10": hr, "ndcg@10": nd, "score": 0.31 * hr + 0.69 * nd, "users": 5})
    topk = np.array([[5, 6, 7], [1, 2, 3]])
    assert ranks_of_targets(topk, np.array([7, 9])).tolist() == [2, -1]
    assert metrics_from_ranks(np.array([], dtype=int))["score"] == 0.0


# --- Weighted (10M) ------------------------------------------------------------------------
def test_weighted_metrics_hand_cases():
    CLICK, CONV = 1, 2
    topk = np.array([
        [20, 1, 2, 3, 4, 5, 6, 7, 8, 9],  # A: the conversion at rank 1, the click missed
        [31, 30, 1, 2, 3, 4, 5, 6, 7, 8],  # B: two clicks (tied weights), both found
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 40],  # C: a conversion at rank 10
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],  # D: a miss
        [50, 50, 1, 2, 3, 4, 5, 6, 7, 8],  # E: a repeated target counts once
        [30, 31, 1, 2, 3, 4, 5, 6, 7, 8],  # F: B's list with the tied clicks swapped
    ])
    targets = pad_targets([[21, 20], [30, 31], [40], [41, 42], [50, 51], [30, 31]])
    actions = pad_targets([[CLICK, CONV], [CLICK, CLICK], [CONV], [CLICK, CONV], [CLICK, CLICK], [CLICK, CLICK]])
    assert targets[2].tolist() == [40, -1]
    weights = relevance_weights(actions)
    assert weights.tolist() == [[1, 2.5], [1, 1], [2.5, 0], [1, 2.5], [1, 1], [1, 1]]
    hr, nd = weighted_per_user(topk, targets, weights)
    idcg_a = 2.5 + 1 * L2_3
    assert hr == pytest.approx([2.5 / 3.5, 1.0, 1.0, 0.0, 0.5, 1.0])
    assert nd == pytest.approx([2.5 / idcg_a, 1.0, L2_11, 0.0, 1 / (1 + L2_3), 1.0])
    m = weighted_metrics(topk, targets, actions)
    assert m["w_hr@10"] == pytest.approx(hr.mean()) and m["w_ndcg@10"] == pytest.approx(nd.mean())
    assert m["w_score"] == pytest.approx(0.31 * hr.mean() + 0.69 * nd.mean())


def test_the_default_relevance_is_the_10m_tracks():
    """models/ knows no track: its default weights are the 10M track's, written out."""
    assert RELEVANCE == dict(get_track("10M").relevance)


def test_weighted_ideal_order_uses_at_most_ten_targets():
    weights = np.array([[1.0] * 11 + [2.5]])  # 12 targets: the ideal list holds the conversion first
    want = 2.5 + sum(1 / math.log2(i + 2) for i in range(1, 10))
    assert ideal_dcg(weights)[0] == pytest.approx(want)
    ids = np.arange(100, 112)[None, :]
    topk = np.arange(100, 110)[None, :]  # ten of the clicks, not the conversion
    hr, nd = weighted_per_user(topk, ids, weights)
    assert hr[0] == pytest.approx(10 / 13.5)
    assert nd[0] == pytest.approx(sum(1 / math.log2(i + 2) for i in range(10)) / want)


def test_weighted_equals_single_target_for_one_click():
    rng = np.random.default_rng(0)
    topk = rng.permutation(1000)[:500].reshape(50, 10)
    targets = np.where(rng.random(50) < 0.5, topk[np.arange(50), rng.integers(0, 10, 50)], 5000)
    hr, nd = weighted_per_user(topk, targets[:, None], np.ones((50, 1)))
    ranks = ranks_of_targets(topk, targets)
    assert hr == pytest.approx(hits_from_ranks(ranks)) and nd == pytest.approx(ndcg_from_ranks(ranks))


# --- Slices and figures --------------------------------------------------------------------
def users_fixture():
    history = np.array([5, 15, 40, 95, 100, 0])
    popularity = np.array([0, 3, 50, 500, 5000, 0])
    cold = popularity == 0
    action = np.array([1, 1, 2, 1, 2, 1])
    ranks = {
        "model": np.array([0, -1, 9, 1, -1, -1]),
        "popularity": np.array([-1, -1, -1, 0, 0, -1]),
        "oracle": np.array([0, 0, 0, 0, 0, -1]),
    }
    return slice_frame(history, popularity, cold, action), ranks


def test_slices_and_headline_figures():
    slices, ranks = users_fixture()
    assert slices["history_length"].astype(str).tolist() == ["0-9", "10-29", "30-59", "90-100", "90-100", "0-9"]
    assert slices["target_popularity"].astype(str).tolist() == ["0", "1-9", "10-99", "100-999", "1000+", "0"]
    assert slices["target_temperature"].astype(str).tolist() == ["cold", "warm", "warm", "warm", "warm", "cold"]
    assert slices["target_action"].astype(str).tolist() == ["click", "click", "conversion", "click", "conversion", "click"]
    table = slice_metrics(slices, ranks)
    row = table[(table.slice == "target_temperature") & (table.bucket == "cold") & (table.method == "model")].iloc[0]
    assert row["users"] == 2 and row["hr@10"] == 0.5 and row["ndcg@10"] == 0.5
    assert row["score"] == pytest.approx(0.31 * 0.5 + 0.69 * 0.5)
    hist = table[(table.slice == "history_length") & (table.method == "oracle")]
    assert hist.bucket.tolist() == ["0-9", "10-29", "30-59", "90-100"]  # empty bucket 60-89 left out

    headline = headline_figures(ranks)
    assert list(headline) == ["model", "popularity", "oracle"]
    assert headline["model"]["hr@10"] == pytest.approx(3 / 6)
    assert headline["model"]["ndcg@10"] == pytest.approx((1 + L2_11 + L2_3) / 6)
    assert headline["oracle"]["score"] == pytest.approx(0.31 * 5 / 6 + 0.69 * 5 / 6)
    share = oracle_share(headline)
    assert share["score"] == pytest.approx(headline["model"]["score"] / headline["oracle"]["score"])
    md = headline_markdown(headline)
    assert "| model / oracle |" in md and f"{headline['model']['score']:.4f}" in md


# --- Report files --------------------------------------------------------------------------
def report_data(ranks, slices, *, code="abc123", data_version="d1", lr=0.001) -> ReportData:
    return ReportData(
        track="1M",
        headline=headline_figures(ranks),
        slices=slice_metrics(slices, ranks),
        provenance={"code_version": code, "data_version": data_version, "checkpoint_version": "c1",
                    "exclude_history": True, "config": {"lr": lr, "dim": 32}, "figures": {"index_recall@10": 0.995}},
        training_curve=[(s, 5.0 / (1 + s)) for s in range(0, 200, 2)],
        notes=["history items excluded from every top-10"],
    )


def test_report_files_and_comparison(tmp_path):
    slices, ranks = users_fixture()
    files = write_report(tmp_path / "reports", report_data(ranks, slices))
    assert files.comparison is None
    for path in (files.markdown, files.html, files.json, *files.plots.values()):
        assert path.is_file() and path.stat().st_size > 0
    assert set(files.plots) == {"slices", "training_curve"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in files.plots.values())
    md = files.markdown.read_text()
    headline = headline_figures(ranks)
    assert f"| model | {headline['model']['hr@10']:.4f} | {headline['model']['ndcg@10']:.4f} | {headline['model']['score']:.4f} |" in md
    assert "![slices](plots/evaluation_slices.png)" in md and "No previous report" in md
    assert "data:image/png;base64," in files.html.read_text()
    figures = json.loads(files.json.read_text())
    assert figures["methods"]["oracle"]["hr@10"] == pytest.approx(5 / 6)
    # By hand: the model hits 3 of 6 targets (ranks 1, 10, 2), the oracle 5 of 6 at rank 1.
    model_score = 0.31 * 3 / 6 + 0.69 * (1 + L2_11 + L2_3) / 6
    assert figures["oracle_share"]["score"] == pytest.approx(model_score / (5 / 6))
    assert figures["oracle_share"]["hr@10"] == pytest.approx((3 / 6) / (5 / 6))
    assert figures["methods"]["model"]["score"] == pytest.approx(
        0.31 * figures["methods"]["model"]["hr@10"] + 0.69 * figures["methods"]["model"]["ndcg@10"])

    # Second run: the model finds one more target, the code and config changed.
    better = dict(ranks, model=np.array([0, 0, 9, 1, -1, -1]))
    files2 = write_report(tmp_path / "reports", report_data(better, slices, code="def456", lr=0.002))
    comparison = files2.comparison
    moved = {m["figure"]: m for m in comparison["moved"]}
    assert moved["methods.model.hr@10"]["delta"] == pytest.approx(1 / 6)
    assert "methods.oracle.score" not in moved and "provenance.index_recall@10" not in moved
    assert {c["what"] for c in comparison["changes"]} == {"code_version", "config.lr"}
    md2 = files2.markdown.read_text()
    assert "## Compared with the previous report" in md2
    assert "| methods.model.hr@10 | 0.5000 | 0.6667 | +0.1667 | +33.3% |" in md2
    assert "| code_version | abc123 | def456 |" in md2 and "| config.lr | 0.0010 | 0.0020 |" in md2
    assert json.loads(files2.json.read_text())["comparison"]["moved"] == len(comparison["moved"])
    # The same figures again: nothing moved.
    files3 = write_report(tmp_path / "reports", report_data(better, slices, code="def456", lr=0.002))
    assert files3.comparison["moved"] == [] and "Nothing recorded changed" in files3.markdown.read_text()
    assert not list((tmp_path / "reports").glob(".*tmp-*"))


def test_weighted_report_and_training_series(tmp_path):
    slices, ranks = users_fixture()
    per_user = {m: {"w_hr@10": hits_from_ranks(r) * 0.5, "w_ndcg@10": ndcg_from_ranks(r) * 0.5} for m, r in ranks.items()}
    weighted = {m: {"w_hr@10": float(v["w_hr@10"].mean()), "w_ndcg@10": float(v["w_ndcg@10"].mean())} for m, v in per_user.items()}
    for m in weighted:
        weighted[m]["w_score"] = 0.31 * weighted[m]["w_hr@10"] + 0.69 * weighted[m]["w_ndcg@10"]
    table = slice_metrics(slices, ranks, per_user=per_user)
    assert "w_score" in table.columns
    data = ReportData(track="10M", headline=headline_figures(ranks, weighted=weighted), slices=table)
    files = write_report(tmp_path, data, previous=None)
    assert "w-Score" in files.headline_markdown and "w_score by slice" not in files.headline_markdown
    path = plot_training_curve({"train": [(0, 3.0), (10, 2.0)], "val": [(0, 3.2), (10, 2.5)]}, tmp_path / "curve.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_compare_figures_reports_added_and_removed():
    before = {"methods": {"model": {"score": 0.1}}, "provenance": {"data_version": "a"}}
    after = {"methods": {"model": {"score": 0.1}, "oracle": {"score": 0.3}}, "provenance": {"data_version": "b"}}
    c = compare_figures(before, after)
    assert c["moved"] == [] and c["added"] == ["methods.oracle.score"] and c["unchanged"] == 1
    assert c["changes"] == [{"what": "data_version", "previous": "a", "current": "b"}]
    assert isinstance(pd.DataFrame(c["moved"]), pd.DataFrame)
