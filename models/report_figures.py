"""The evaluation report's figures: per method HR@10, NDCG@10, Score (and the weighted 10M
figures given), the model's share of the oracle, and the same per slice of users.

Inputs are plain arrays: per user, the 0-based rank of its target in each method's top-10
(-1 = miss) for the methods ``model``, ``model_extended`` (the model on the released pool plus
the targets the warehouse added to it, shown as "model (pool + missing targets)"),
``popularity``, ``baseline`` (the official-baseline preset) and ``oracle`` (any subset; other
names are kept too), plus what the slices need (history length, the target's training
popularity, cold or warm, action type).

    slices = slice_frame(history_length, target_popularity, target_is_cold, target_action_type)
    headline = headline_figures({"model": ranks_m, "popularity": ranks_p, "oracle": ranks_o})
    table = slice_metrics(slices, {"model": ranks_m, ...})
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from models.weighted_metrics import K, hits_from_ranks, ndcg_from_ranks, score

METHOD_ORDER = ("model", "model_extended", "popularity", "baseline", "oracle")
METHOD_LABELS = {"model": "model", "model_extended": "model (pool + missing targets)", "popularity": "popularity",
                 "baseline": "baseline preset", "oracle": "oracle"}

# Slice buckets. History lengths run 0..100 (the holdout keeps at most 100 events).
HISTORY_EDGES = (0, 10, 30, 60, 90, math.inf)
HISTORY_LABELS = ("0-9", "10-29", "30-59", "60-89", "90-100")
# Target popularity = the target item's event count in the training sequences (0 = cold).
POPULARITY_EDGES = (0, 1, 10, 100, 1000, math.inf)
POPULARITY_LABELS = ("0", "1-9", "10-99", "100-999", "1000+")
ACTION_LABELS = {0: "exposure", 1: "click", 2: "conversion"}
SLICE_TITLES = {
    "history_length": "history length",
    "target_popularity": "target popularity (training events)",
    "target_temperature": "cold vs warm target",
    "target_action": "target action type",
}


# --- Figures -----------------------------------------------------------------------------
def method_figures(ranks: np.ndarray, k: int = K, weighted: Mapping[str, float] | None = None) -> dict[str, float]:
    """HR@k, NDCG@k, Score (and any weighted figures given) of one method."""
    ranks = np.asarray(ranks)
    hr = float(hits_from_ranks(ranks, k).mean()) if ranks.size else 0.0
    nd = float(ndcg_from_ranks(ranks, k).mean()) if ranks.size else 0.0
    out = {f"hr@{k}": hr, f"ndcg@{k}": nd, "score": float(score(hr, nd)), "users": int(ranks.size)}
    out.update({key: float(v) for key, v in (weighted or {}).items() if key != "users"})
    return out


def headline_figures(
    ranks: Mapping[str, np.ndarray],
    k: int = K,
    *,
    weighted: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, dict[str, float]]:
    """method -> figures, in report order. ``weighted``: method -> {"w_hr@10": ..., ...}
    from ``models.weighted_metrics.weighted_metrics`` (10M)."""
    weighted = weighted or {}
    return {m: method_figures(ranks[m], k, weighted.get(m)) for m in ordered_methods(ranks)}


def ordered_methods(methods: Mapping[str, Any] | Sequence[str]) -> list[str]:
    names = list(methods)
    return [m for m in METHOD_ORDER if m in names] + [m for m in names if m not in METHOD_ORDER]


def oracle_share(headline: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The model's figures as a share of the oracle's (only when both are present)."""
    model, oracle = headline.get("model"), headline.get("oracle")
    if not model or not oracle:
        return {}
    return {
        key: float(model[key] / oracle[key])
        for key in oracle
        if key != "users" and key in model and oracle[key] > 0
    }


# --- Slices ------------------------------------------------------------------------------
def _bucket(values: np.ndarray, edges: Sequence[float], labels: Sequence[str]) -> pd.Categorical:
    inner_edges = np.asarray(edges[1:-1], dtype=np.float64)
    codes = np.searchsorted(inner_edges, np.asarray(values, dtype=np.float64), side="right")
    return pd.Categorical.from_codes(codes, categories=list(labels))


def slice_frame(
    history_length: np.ndarray,
    target_popularity: np.ndarray,
    target_is_cold: np.ndarray | None = None,
    target_action_type: np.ndarray | None = None,
) -> pd.DataFrame:
    """One row per user with its bucket in each slice (categorical columns)."""
    history_length = np.asarray(history_length)
    target_popularity = np.asarray(target_popularity)
    if history_length.shape != target_popularity.shape:
        raise ValueError("history_length and target_popularity must have one value per user")
    cold = np.asarray(target_popularity == 0 if target_is_cold is None else target_is_cold, dtype=bool)
    frame = pd.DataFrame({
        "history_length": _bucket(history_length, HISTORY_EDGES, HISTORY_LABELS),
        "target_popularity": _bucket(target_popularity, POPULARITY_EDGES, POPULARITY_LABELS),
        "target_temperature": pd.Categorical.from_codes(cold.astype(np.int8), categories=["warm", "cold"]),
    })
    if target_action_type is not None:
        actions = np.asarray(target_action_type, dtype=np.int64)
        lowest = int(actions.min(initial=0))
        present = [int(a) + lowest for a in np.flatnonzero(np.bincount(actions - lowest))]  # small ints
        labels = [ACTION_LABELS.get(a, str(a)) for a in present]
        frame["target_action"] = pd.Categorical.from_codes(np.searchsorted(present, actions), categories=labels)
    return frame


def slice_metrics(
    slices: pd.DataFrame,
    ranks: Mapping[str, np.ndarray],
    k: int = K,
    *,
    per_user: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> pd.DataFrame:
    """Long table: slice, bucket, method, users, hr@k, ndcg@k, score (+ per-user extras such
    as w_hr@10 averaged per bucket). Empty buckets are left out."""
    frame = slices.copy()
    metric_cols: list[tuple[str, str, str]] = []  # (column, method, metric)
    for method in ordered_methods(ranks):
        r = np.asarray(ranks[method])
        if len(r) != len(frame):
            raise ValueError(f"{method}: {len(r)} ranks for {len(frame)} users")
        frame[f"{method}|hr@{k}"] = hits_from_ranks(r, k)
        frame[f"{method}|ndcg@{k}"] = ndcg_from_ranks(r, k)
        metric_cols += [(f"{method}|hr@{k}", method, f"hr@{k}"), (f"{method}|ndcg@{k}", method, f"ndcg@{k}")]
        for metric, values in (per_user or {}).get(method, {}).items():
            frame[f"{method}|{metric}"] = np.asarray(values, dtype=np.float64)
            metric_cols.append((f"{method}|{metric}", method, metric))
    rows = []
    for column in slices.columns:
        grouped = frame.groupby(column, observed=True)
        means = grouped[[c for c, _, _ in metric_cols]].mean()
        sizes = grouped.size()
        for bucket in means.index:
            for method in ordered_methods(ranks):
                row = {"slice": column, "bucket": str(bucket), "method": method, "users": int(sizes[bucket])}
                for col, m, metric in metric_cols:
                    if m == method:
                        row[metric] = float(means.at[bucket, col])
                row["score"] = float(score(row[f"hr@{k}"], row[f"ndcg@{k}"]))
                if f"w_hr@{k}" in row and f"w_ndcg@{k}" in row:
                    row["w_score"] = float(score(row[f"w_hr@{k}"], row[f"w_ndcg@{k}"]))
                rows.append(row)
    return pd.DataFrame(rows)


__all__ = [
    "METHOD_LABELS",
    "METHOD_ORDER",
    "SLICE_TITLES",
    "headline_figures",
    "method_figures",
    "oracle_share",
    "ordered_methods",
    "slice_frame",
    "slice_metrics",
]
