"""The evaluation report's plots: score by slice, training loss, recall tuning of an index.

Plots use matplotlib's object API on the Agg canvas (no pyplot global state, no display). A
plot written to a file goes through ``publish`` (models/publish.py), so the caller decides how
the file is put in place.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

from models.publish import FileWriter, write_in_place
from models.report_figures import METHOD_LABELS, SLICE_TITLES, ordered_methods
from models.weighted_metrics import K

METHOD_COLORS = {"model": "#1f77b4", "model_extended": "#aec7e8", "popularity": "#7f7f7f", "baseline": "#ff7f0e",
                 "oracle": "#2ca02c"}


def _save_png(fig: Figure, path: Path, publish: FileWriter) -> Path:
    FigureCanvasAgg(fig)
    publish(path, lambda target: fig.savefig(target, format="png", dpi=110, bbox_inches="tight"))
    return path


def figure_png(fig: Figure, dpi: int = 90) -> bytes:
    """The figure as PNG bytes (for an image inlined in metadata or HTML)."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def plot_slices(table: pd.DataFrame, path: str | Path, *, metric: str = "score", title: str | None = None,
                publish: FileWriter = write_in_place) -> Path:
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
    return _save_png(fig, Path(path), publish)


def plot_training_curve(
    points: Sequence[tuple[float, float]] | Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    *,
    title: str = "training loss",
    publish: FileWriter = write_in_place,
) -> Path:
    """Loss against step (one line per series; a moving average over noisy curves), as a PNG at ``path``."""
    return _save_png(training_curve_figure(points, title=title), Path(path), publish)


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


__all__ = [
    "figure_png",
    "plot_slices",
    "plot_training_curve",
    "recall_tuning_figure",
    "training_curve_figure",
]
