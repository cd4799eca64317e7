"""The evaluation report: headline figures, slices, plots, and a comparison with the last run.

Inputs are plain arrays: per user, the 0-based rank of its target in each method's top-10
(-1 = miss) for the methods ``model``, ``model_extended`` (the model on the released pool plus
the targets the warehouse added to it, shown as "model (pool + missing targets)"),
``popularity``, ``baseline`` (the official-baseline preset) and ``oracle`` (any subset; other
names are kept too), plus what the slices need (history length, the target's training
popularity, cold or warm, action type).

    slices = slice_frame(history_length, target_popularity, target_is_cold, target_action_type)
    headline = headline_figures({"model": ranks_m, "popularity": ranks_p, "oracle": ranks_o})
    table = slice_metrics(slices, {"model": ranks_m, ...})
    files = write_report(reports_dir, ReportData(track="1M", headline=headline, slices=table,
                         provenance={...}, training_curve=[(step, loss), ...]))

``write_report`` writes ``<name>.md``, ``<name>.html`` (self-contained: plots inlined),
``<name>.json`` (every figure, read back by the next run for the comparison section) and
``plots/<name>_*.png``, each atomically. By default it compares against the ``<name>.json``
already in the folder (the previous materialization of the same partition) before replacing
it: which figures moved and by how much, and what changed in between (code version, data
version, checkpoint, config).

Plots use matplotlib's object API on the Agg canvas (no pyplot global state, no display).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

from models.weighted_metrics import K, hits_from_ranks, ndcg_from_ranks, score
from taac_dagster.atomic import atomic_file, write_text_atomic

FORMAT_VERSION = 1
METHOD_ORDER = ("model", "model_extended", "popularity", "baseline", "oracle")
METHOD_LABELS = {"model": "model", "model_extended": "model (pool + missing targets)", "popularity": "popularity",
                 "baseline": "baseline preset", "oracle": "oracle"}
METHOD_COLORS = {"model": "#1f77b4", "model_extended": "#aec7e8", "popularity": "#7f7f7f", "baseline": "#ff7f0e",
                 "oracle": "#2ca02c"}

# Slice buckets. History lengths run 0..100 (the holdout keeps at most 100 events).
HISTORY_EDGES = (0, 10, 30, 60, 90, math.inf)
HISTORY_LABELS = ("0-9", "10-29", "30-59", "60-89", "90-100")
# Target popularity = the target item's event count in the training sequences (0 = cold).
POPULARITY_EDGES = (0, 1, 10, 100, 1000, math.inf)
POPULARITY_LABELS = ("0", "1-9", "10-99", "100-999", "1000+")
ACTION_LABELS = {0: "exposure", 1: "click", 2: "conversion"}
VALIDATION_NOTE = (
    "Validation scores each validation user's target before its test target (history strictly before it; "
    "training never saw it); training kept the checkpoint with the best validation score. Test is this "
    "report's holdout (the last target), which neither training nor model selection touched."
)
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


# --- Plots -------------------------------------------------------------------------------
def _save_png(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return Path(path)


def figure_png(fig: Figure, dpi: int = 90) -> bytes:
    """The figure as PNG bytes (for an image inlined in metadata or HTML)."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def plot_slices(table: pd.DataFrame, path: str | Path, *, metric: str = "score", title: str | None = None) -> Path:
    """Grouped bars per slice (one panel per slice dimension, one bar per method)."""
    slices = list(dict.fromkeys(table["slice"]))
    methods = ordered_methods(list(dict.fromkeys(table["method"])))
    fig = Figure(figsize=(4.2 * max(1, len(slices)), 3.8))
    axes = fig.subplots(1, max(1, len(slices)), squeeze=False)[0]
    for ax, name in zip(axes, slices):
        part = table[table["slice"] == name]
        buckets = list(dict.fromkeys(part["bucket"]))
        x = np.arange(len(buckets))
        width = 0.8 / max(1, len(methods))
        for i, method in enumerate(methods):
            rows = part[part["method"] == method].set_index("bucket").reindex(buckets)
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, rows[metric].fillna(0.0).to_numpy(), width,
                   label=METHOD_LABELS.get(method, method), color=METHOD_COLORS.get(method))
        users = part.drop_duplicates("bucket").set_index("bucket")["users"].reindex(buckets)
        ax.set_xticks(x, [f"{b}\n(n={int(n):,})" for b, n in zip(buckets, users)], fontsize=8)
        ax.set_title(SLICE_TITLES.get(name, name), fontsize=10)
        ax.set_ylabel(metric)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, bbox_to_anchor=(0.5, -0.06))
    if title:
        fig.suptitle(title)
    return _save_png(fig, Path(path))


def plot_training_curve(
    points: Sequence[tuple[float, float]] | Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    *,
    title: str = "training loss",
) -> Path:
    """Loss against step (one line per series; a moving average over noisy curves), as a PNG at ``path``."""
    return _save_png(training_curve_figure(points, title=title), Path(path))


def training_curve_figure(
    points: Sequence[tuple[float, float]] | Mapping[str, Sequence[tuple[float, float]]], *, title: str = "training loss"
) -> Figure:
    """Loss against step: one line per series, a moving average over noisy curves."""
    series = points if isinstance(points, Mapping) else {"loss": points}
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.subplots()
    for name, values in series.items():
        arr = np.asarray(values, dtype=np.float64).reshape(-1, 2)
        if not len(arr):
            continue
        line = ax.plot(arr[:, 0], arr[:, 1], lw=0.8, alpha=0.45 if len(arr) > 50 else 1.0, label=name)[0]
        if len(arr) > 50:
            window = max(2, len(arr) // 25)
            smooth = np.convolve(arr[:, 1], np.ones(window) / window, mode="valid")
            ax.plot(arr[window - 1 :, 0], smooth, color=line.get_color(), lw=1.8, label=f"{name} (mean of {window})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def recall_tuning_figure(tuning: Mapping[str, Any], *, floor: float | None = None) -> Figure:
    """recall@k of an index against exact search at each value the tuning tried (nprobe or
    efSearch), with the target it climbed to and the blocking floor."""
    steps = np.asarray(tuning.get("steps") or [], dtype=np.float64).reshape(-1, 2)
    knob, k = str(tuning.get("knob", "knob")), int(tuning.get("k", K))
    fig = Figure(figsize=(6.4, 3.4))
    ax = fig.subplots()
    ax.plot(steps[:, 0], steps[:, 1], marker="o", color=METHOD_COLORS["model"], label=f"recall@{k} on the sample")
    if "target" in tuning:
        ax.axhline(float(tuning["target"]), color="#2ca02c", ls="--", lw=1, label=f"target {float(tuning['target']):g}")
    if floor is not None:
        ax.axhline(floor, color="#d62728", ls=":", lw=1, label=f"floor {floor:g} (blocking check)")
    if len(steps):
        ax.scatter(steps[-1:, 0], steps[-1:, 1], s=90, facecolors="none", edgecolors="black",
                   label=f"kept: {knob} {steps[-1, 0]:g}")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel(knob)
    ax.set_ylabel(f"recall@{k}")
    ax.set_title(f"{knob} tuning against exact search")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


# --- Comparison --------------------------------------------------------------------------
def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def report_figures(figures: Mapping[str, Any]) -> dict[str, float]:
    """Every comparable number of a report JSON, by dotted name."""
    flat = _flatten({"methods": figures.get("methods", {}), "oracle_share": figures.get("oracle_share", {})})
    for row in figures.get("slices", []):
        base = f"slices.{row['slice']}.{row['bucket']}.{row['method']}"
        for key, value in row.items():
            if key not in ("slice", "bucket", "method"):
                flat[f"{base}.{key}"] = value
    for key, value in _flatten(figures.get("provenance", {}).get("figures", {}), "provenance").items():
        flat[key] = value
    return {k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def compare_figures(
    previous: Mapping[str, Any], current: Mapping[str, Any], *, tolerance: float = 1e-9
) -> dict[str, Any]:
    """Which figures moved between two report JSONs, and what changed in between."""
    before, after = report_figures(previous), report_figures(current)
    moved = []
    for key in sorted(set(before) & set(after)):
        delta = after[key] - before[key]
        if abs(delta) > tolerance:
            rel = delta / abs(before[key]) if before[key] else None
            moved.append(
                {"figure": key, "previous": before[key], "current": after[key], "delta": delta, "relative": rel}
            )
    prov_before = _flatten({k: v for k, v in previous.get("provenance", {}).items() if k != "figures"})
    prov_after = _flatten({k: v for k, v in current.get("provenance", {}).items() if k != "figures"})
    changes = [
        {"what": key, "previous": prov_before.get(key), "current": prov_after.get(key)}
        for key in sorted(set(prov_before) | set(prov_after))
        if prov_before.get(key) != prov_after.get(key)
    ]
    return {
        "previous_created_at": previous.get("created_at"),
        "moved": moved,
        "unchanged": len(set(before) & set(after)) - len(moved),
        "added": sorted(set(after) - set(before)),
        "removed": sorted(set(before) - set(after)),
        "changes": changes,
    }


# --- Markdown / HTML ---------------------------------------------------------------------
def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.{digits}f}"
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _md_cell(value: Any) -> str:
    return (value if isinstance(value, str) else _fmt(value)).replace("|", "\\|").replace("\n", " ")


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c) if not isinstance(c, str) else c)}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def headline_rows(headline: Mapping[str, Mapping[str, float]], k: int = K) -> tuple[list[str], list[list[Any]]]:
    weighted = any("w_score" in figures for figures in headline.values())
    headers = ["method", f"HR@{k}", f"NDCG@{k}", "Score"]
    headers += [f"w-HR@{k}", f"w-NDCG@{k}", "w-Score"] if weighted else []
    headers.append("users")
    rows = []
    for method in ordered_methods(headline):
        f = headline[method]
        row = [METHOD_LABELS.get(method, method), f.get(f"hr@{k}"), f.get(f"ndcg@{k}"), f.get("score")]
        if weighted:
            row += [f.get(f"w_hr@{k}"), f.get(f"w_ndcg@{k}"), f.get("w_score")]
        row.append(int(f["users"]) if "users" in f else None)
        rows.append(row)
    share = oracle_share(headline)
    if share:
        row = ["model / oracle", share.get(f"hr@{k}"), share.get(f"ndcg@{k}"), share.get("score")]
        if weighted:
            row += [share.get(f"w_hr@{k}"), share.get(f"w_ndcg@{k}"), share.get("w_score")]
        rows.append(row + [None])
    return headers, rows


def split_rows(headline: Mapping[str, Mapping[str, float]], validation: Mapping[str, Any] | None,
               users: int, k: int = K) -> tuple[list[str], list[list[Any]]]:
    """Validation (model selection) next to test (this report), for the model and popularity."""
    headers = ["split", "users", "method", f"HR@{k}", f"NDCG@{k}", "Score"]
    rows: list[list[Any]] = []
    if validation:
        for method, prefix in (("model", ""), ("popularity", "popularity_")):
            rows.append([f"validation (step {validation.get('step')})", validation.get("users"), method,
                         validation.get(f"{prefix}hr@{k}"), validation.get(f"{prefix}ndcg@{k}"),
                         validation.get(f"{prefix}score")])
    for method in ("model", "popularity"):
        if method in headline:
            f = headline[method]
            rows.append(["test", users, method, f.get(f"hr@{k}"), f.get(f"ndcg@{k}"), f.get("score")])
    return headers, rows


def headline_markdown(headline: Mapping[str, Mapping[str, float]], k: int = K) -> str:
    """The headline table as Markdown (also the asset's Markdown metadata)."""
    return _md_table(*headline_rows(headline, k))


def _slice_rows(table: pd.DataFrame, k: int) -> dict[str, tuple[list[str], list[list[Any]]]]:
    out = {}
    weighted = "w_score" in table.columns
    for name in dict.fromkeys(table["slice"]):
        part = table[table["slice"] == name]
        methods = ordered_methods(list(dict.fromkeys(part["method"])))
        metric = "w_score" if weighted else "score"
        headers = ["bucket", "users"] + [f"{METHOD_LABELS.get(m, m)} {metric}" for m in methods] + [
            f"{METHOD_LABELS.get(m, m)} HR@{k}" for m in methods
        ]
        rows = []
        for bucket in dict.fromkeys(part["bucket"]):
            cell = part[part["bucket"] == bucket].set_index("method")
            rows.append([bucket, int(cell["users"].iloc[0])] + [float(cell.at[m, metric]) for m in methods]
                        + [float(cell.at[m, f"hr@{k}"]) for m in methods])
        out[name] = (headers, rows)
    return out


def _comparison_rows(comparison: Mapping[str, Any], limit: int = 25) -> tuple[list[list[Any]], list[list[Any]]]:
    groups = ("methods.", "oracle_share.", "provenance.")

    def order(m: Mapping[str, Any]) -> tuple[int, float]:
        group = next((i for i, g in enumerate(groups) if m["figure"].startswith(g)), len(groups))
        return group, -abs(m["delta"])

    moved = sorted(comparison["moved"], key=order)
    figure_rows = [
        [m["figure"], m["previous"], m["current"], f"{m['delta']:+.4f}",
         "–" if m["relative"] is None else f"{100 * m['relative']:+.1f}%"]
        for m in moved[:limit]
    ]
    change_rows = [[c["what"], _fmt(c["previous"]), _fmt(c["current"])] for c in comparison["changes"]]
    return figure_rows, change_rows


@dataclass
class ReportData:
    """Everything the report shows. ``headline``: method -> figures (``headline_figures``);
    ``slices``: ``slice_metrics``'s table; ``provenance``: code_version, data_version,
    checkpoint_version, config (dict), exclude_history, index description, ...; numbers
    under ``provenance["figures"]`` (e.g. index recall@10) are compared like the metrics."""

    track: str
    headline: dict[str, dict[str, float]]
    slices: pd.DataFrame | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    training_curve: Sequence[tuple[float, float]] | Mapping[str, Sequence[tuple[float, float]]] | None = None
    notes: list[str] = field(default_factory=list)
    title: str | None = None
    k: int = K
    # The training run's model selection: the kept checkpoint's figures on the validation
    # split (each validation user's target before its test target), model and popularity.
    validation: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "track": self.track,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "k": self.k,
            "methods": self.headline,
            "oracle_share": oracle_share(self.headline),
            "provenance": self.provenance,
            "slices": [] if self.slices is None else self.slices.to_dict(orient="records"),
            "notes": self.notes,
            "validation": self.validation,
        }


@dataclass
class ReportFiles:
    markdown: Path
    html: Path
    json: Path
    plots: dict[str, Path]
    headline_markdown: str
    comparison: dict[str, Any] | None


def load_figures(path: str | Path) -> dict[str, Any] | None:
    """A previous report's JSON, or None when there is none (or it is unreadable)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format_version") == FORMAT_VERSION else None


def write_report(
    folder: str | Path,
    data: ReportData,
    *,
    name: str = "evaluation",
    previous: Mapping[str, Any] | str | Path | None = "auto",
) -> ReportFiles:
    """Write the Markdown, HTML, JSON and PNG files of one report into ``folder``.

    ``previous``: "auto" compares with ``folder/<name>.json`` if one exists (read before it is
    replaced), a path or a loaded JSON compares with that, None skips the comparison.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / f"{name}.json"
    if isinstance(previous, str) and previous == "auto":
        previous = load_figures(json_path)
    elif isinstance(previous, (str, Path)):
        previous = load_figures(previous)
    figures = data.to_json()
    comparison = compare_figures(previous, figures) if previous else None
    k = data.k

    plots: dict[str, Path] = {}
    if data.slices is not None and len(data.slices):
        metric = "w_score" if "w_score" in data.slices.columns else "score"
        plots["slices"] = plot_slices(data.slices, folder / "plots" / f"{name}_slices.png", metric=metric,
                                      title=f"{data.track}: {metric} by slice")
    if data.training_curve is not None and len(data.training_curve):
        plots["training_curve"] = plot_training_curve(data.training_curve, folder / "plots" / f"{name}_training.png")

    title = data.title or f"Evaluation report: track {data.track}"
    headline_md = headline_markdown(data.headline, k)
    prov_rows = [[key, _fmt(value)] for key, value in _flatten(data.provenance).items()]
    slice_tables = _slice_rows(data.slices, k) if data.slices is not None and len(data.slices) else {}
    figure_rows, change_rows = _comparison_rows(comparison) if comparison else ([], [])
    fig_headers = ["figure", "previous", "current", "change", "relative"]

    md = [f"# {title}", "", f"Created {figures['created_at']}.", "", "## Headline", "", headline_md, ""]
    md += [f"- {note}" for note in data.notes] + ([""] if data.notes else [])
    splits = split_rows(data.headline, data.validation, int(data.provenance.get("users") or 0), k)
    if data.validation:
        md += ["## Validation and test", "", VALIDATION_NOTE, "", _md_table(*splits), ""]
    if prov_rows:
        md += ["## Run", "", _md_table(["setting", "value"], prov_rows), ""]
    if slice_tables:
        md += ["## Slices", ""]
        for slice_name, (headers, rows) in slice_tables.items():
            md += [f"### {SLICE_TITLES.get(slice_name, slice_name)}", "", _md_table(headers, rows), ""]
    if plots:
        md += ["## Plots", ""] + [f"![{key}](plots/{path.name})" for key, path in plots.items()] + [""]
    md += ["## Compared with the previous report", ""]
    if comparison is None:
        md += ["No previous report for this track: nothing to compare.", ""]
    else:
        md += [f"Previous report: {comparison['previous_created_at']}. {len(comparison['moved'])} figures moved, "
               f"{comparison['unchanged']} unchanged, {len(comparison['added'])} new, "
               f"{len(comparison['removed'])} gone.", ""]
        if figure_rows:
            md += [_md_table(fig_headers, figure_rows), ""]
        md += ["What changed:", ""]
        md += ([_md_table(["what", "previous", "current"], change_rows)] if change_rows
               else ["Nothing recorded changed (same code, data, checkpoint and config)."]) + [""]
    md_path = write_text_atomic(folder / f"{name}.md", "\n".join(md))

    def img(path: Path) -> str:
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{encoded}">'

    body = [f"<h1>{html.escape(title)}</h1>", f"<p>Created {html.escape(figures['created_at'])}.</p>",
            "<h2>Headline</h2>", _html_table(*headline_rows(data.headline, k))]
    body += ["<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in data.notes) + "</ul>"] if data.notes else []
    if data.validation:
        body += ["<h2>Validation and test</h2>", f"<p>{html.escape(VALIDATION_NOTE)}</p>", _html_table(*splits)]
    if prov_rows:
        body += ["<h2>Run</h2>", _html_table(["setting", "value"], prov_rows)]
    if slice_tables:
        body.append("<h2>Slices</h2>")
        for slice_name, (headers, rows) in slice_tables.items():
            body += [f"<h3>{html.escape(SLICE_TITLES.get(slice_name, slice_name))}</h3>", _html_table(headers, rows)]
    if plots:
        body += ["<h2>Plots</h2>"] + [img(p) for p in plots.values()]
    body.append("<h2>Compared with the previous report</h2>")
    if comparison is None:
        body.append("<p>No previous report for this track: nothing to compare.</p>")
    else:
        body.append(f"<p>Previous report: {html.escape(str(comparison['previous_created_at']))}. "
                    f"{len(comparison['moved'])} figures moved, {comparison['unchanged']} unchanged.</p>")
        if figure_rows:
            body.append(_html_table(fig_headers, figure_rows))
        body.append(_html_table(["what", "previous", "current"], change_rows) if change_rows
                    else "<p>Nothing recorded changed (same code, data, checkpoint and config).</p>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;}"
             "table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}img{max-width:100%}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
    html_path = write_text_atomic(folder / f"{name}.html", page)
    if comparison is not None:
        figures["comparison"] = {"previous_created_at": comparison["previous_created_at"],
                                 "moved": len(comparison["moved"]), "changes": comparison["changes"]}
    write_text_atomic(json_path, json.dumps(figures, indent=2, default=str) + "\n")
    return ReportFiles(markdown=md_path, html=html_path, json=json_path, plots=plots,
                       headline_markdown=headline_md, comparison=comparison)


__all__ = [
    "METHOD_ORDER",
    "ReportData",
    "ReportFiles",
    "compare_figures",
    "figure_png",
    "headline_figures",
    "headline_markdown",
    "load_figures",
    "method_figures",
    "oracle_share",
    "plot_slices",
    "plot_training_curve",
    "recall_tuning_figure",
    "report_figures",
    "slice_frame",
    "slice_metrics",
    "training_curve_figure",
    "write_report",
]
