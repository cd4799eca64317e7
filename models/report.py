"""The evaluation report's files: headline figures, slices, plots, and a comparison with the last run.

    files = write_report(reports_dir, ReportData(track="1M", headline=headline, slices=table,
                         provenance={...}, training_curve=[(step, loss), ...]))

``write_report`` writes ``<name>.md``, ``<name>.html`` (self-contained: plots inlined),
``<name>.json`` (every figure, read back by the next run for the comparison section) and
``plots/<name>_*.png``, each through ``publish`` (models/publish.py; the pipeline's step renames
each into place). By default it compares against the ``<name>.json`` already in the folder (the
previous materialization of the same partition) before replacing it: which figures moved and by
how much, and what changed in between (code version, data version, checkpoint, config).

The figures are computed in models/report_figures.py, the plots drawn in models/report_plots.py,
the comparison in models/report_comparison.py and the tables laid out in models/report_tables.py.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from models.publish import FileWriter, write_in_place
from models.report_comparison import compare_figures, flatten
from models.report_figures import SLICE_TITLES, oracle_share
from models.report_plots import plot_slices, plot_training_curve
from models.report_tables import (
    comparison_rows,
    fmt,
    headline_markdown,
    headline_rows,
    html_table,
    md_table,
    slice_rows,
    split_rows,
)
from models.weighted_metrics import K

FORMAT_VERSION = 1
VALIDATION_NOTE = (
    "Validation scores each validation user's target before its test target (history strictly before it; "
    "training never saw it); training kept the checkpoint with the best validation score. Test is this "
    "report's holdout (the last target), which neither training nor model selection touched."
)


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



FIGURE_HEADERS = ["figure", "previous", "current", "change", "relative"]
CHANGE_HEADERS = ["what", "previous", "current"]
NOTHING_CHANGED = "Nothing recorded changed (same code, data, checkpoint and config)."
NO_PREVIOUS = "No previous report for this track: nothing to compare."
STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;}"
         "table{border-collapse:collapse;margin:1em 0}"
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}img{max-width:100%}")


@dataclass
class _Page:
    """What the Markdown and the HTML page both show, laid out as tables."""

    data: ReportData
    title: str
    created_at: str
    headline_md: str
    splits: tuple[list[str], list[list[Any]]]
    prov_rows: list[list[Any]]
    slice_tables: dict[str, tuple[list[str], list[list[Any]]]]
    plots: dict[str, Path]
    comparison: dict[str, Any] | None
    figure_rows: list[list[Any]]
    change_rows: list[list[Any]]


def _previous_figures(previous: Mapping[str, Any] | str | Path | None, json_path: Path) -> Mapping[str, Any] | None:
    if isinstance(previous, str) and previous == "auto":
        return load_figures(json_path)
    if isinstance(previous, (str, Path)):
        return load_figures(previous)
    return previous


def _plots(folder: Path, name: str, data: ReportData, publish: FileWriter) -> dict[str, Path]:
    plots: dict[str, Path] = {}
    if data.slices is not None and len(data.slices):
        metric = "w_score" if "w_score" in data.slices.columns else "score"
        plots["slices"] = plot_slices(data.slices, folder / "plots" / f"{name}_slices.png", metric=metric,
                                      title=f"{data.track}: {metric} by slice", publish=publish)
    if data.training_curve is not None and len(data.training_curve):
        plots["training_curve"] = plot_training_curve(data.training_curve, folder / "plots" / f"{name}_training.png",
                                                      publish=publish)
    return plots


def _page(data: ReportData, created_at: str, comparison: dict[str, Any] | None, plots: dict[str, Path]) -> _Page:
    k = data.k
    figure_rows, change_rows = comparison_rows(comparison) if comparison else ([], [])
    return _Page(
        data=data, title=data.title or f"Evaluation report: track {data.track}", created_at=created_at,
        headline_md=headline_markdown(data.headline, k),
        splits=split_rows(data.headline, data.validation, int(data.provenance.get("users") or 0), k),
        prov_rows=[[key, fmt(value)] for key, value in flatten(data.provenance).items()],
        slice_tables=slice_rows(data.slices, k) if data.slices is not None and len(data.slices) else {},
        plots=plots, comparison=comparison, figure_rows=figure_rows, change_rows=change_rows,
    )


def _markdown_comparison(page: _Page) -> list[str]:
    comparison = page.comparison
    if comparison is None:
        return [NO_PREVIOUS, ""]
    md = [f"Previous report: {comparison['previous_created_at']}. {len(comparison['moved'])} figures moved, "
          f"{comparison['unchanged']} unchanged, {len(comparison['added'])} new, "
          f"{len(comparison['removed'])} gone.", ""]
    if page.figure_rows:
        md += [md_table(FIGURE_HEADERS, page.figure_rows), ""]
    md += ["What changed:", ""]
    return md + ([md_table(CHANGE_HEADERS, page.change_rows)] if page.change_rows else [NOTHING_CHANGED]) + [""]


def _markdown(page: _Page) -> str:
    data = page.data
    md = [f"# {page.title}", "", f"Created {page.created_at}.", "", "## Headline", "", page.headline_md, ""]
    md += [f"- {note}" for note in data.notes] + ([""] if data.notes else [])
    if data.validation:
        md += ["## Validation and test", "", VALIDATION_NOTE, "", md_table(*page.splits), ""]
    if page.prov_rows:
        md += ["## Run", "", md_table(["setting", "value"], page.prov_rows), ""]
    if page.slice_tables:
        md += ["## Slices", ""]
        for slice_name, (headers, rows) in page.slice_tables.items():
            md += [f"### {SLICE_TITLES.get(slice_name, slice_name)}", "", md_table(headers, rows), ""]
    if page.plots:
        md += ["## Plots", ""] + [f"![{key}](plots/{path.name})" for key, path in page.plots.items()] + [""]
    md += ["## Compared with the previous report", ""]
    return "\n".join(md + _markdown_comparison(page))


def _html_image(path: Path) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{encoded}">'


def _html_comparison(page: _Page) -> list[str]:
    comparison = page.comparison
    if comparison is None:
        return [f"<p>{NO_PREVIOUS}</p>"]
    body = [f"<p>Previous report: {html.escape(str(comparison['previous_created_at']))}. "
            f"{len(comparison['moved'])} figures moved, {comparison['unchanged']} unchanged.</p>"]
    if page.figure_rows:
        body.append(html_table(FIGURE_HEADERS, page.figure_rows))
    body.append(html_table(CHANGE_HEADERS, page.change_rows) if page.change_rows else f"<p>{NOTHING_CHANGED}</p>")
    return body


def _html(page: _Page) -> str:
    data = page.data
    body = [f"<h1>{html.escape(page.title)}</h1>", f"<p>Created {html.escape(page.created_at)}.</p>",
            "<h2>Headline</h2>", html_table(*headline_rows(data.headline, data.k))]
    body += ["<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in data.notes) + "</ul>"] if data.notes else []
    if data.validation:
        body += ["<h2>Validation and test</h2>", f"<p>{html.escape(VALIDATION_NOTE)}</p>", html_table(*page.splits)]
    if page.prov_rows:
        body += ["<h2>Run</h2>", html_table(["setting", "value"], page.prov_rows)]
    if page.slice_tables:
        body.append("<h2>Slices</h2>")
        for slice_name, (headers, rows) in page.slice_tables.items():
            body += [f"<h3>{html.escape(SLICE_TITLES.get(slice_name, slice_name))}</h3>", html_table(headers, rows)]
    if page.plots:
        body += ["<h2>Plots</h2>"] + [_html_image(p) for p in page.plots.values()]
    body += ["<h2>Compared with the previous report</h2>", *_html_comparison(page)]
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(page.title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")


def _publish_text(path: Path, text: str, publish: FileWriter) -> Path:
    publish(path, lambda target: target.write_text(text))
    return path


def write_report(
    folder: str | Path,
    data: ReportData,
    *,
    name: str = "evaluation",
    previous: Mapping[str, Any] | str | Path | None = "auto",
    publish: FileWriter = write_in_place,
) -> ReportFiles:
    """Write the Markdown, HTML, JSON and PNG files of one report into ``folder``.

    ``previous``: "auto" compares with ``folder/<name>.json`` if one exists (read before it is
    replaced), a path or a loaded JSON compares with that, None skips the comparison.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / f"{name}.json"
    previous_figures = _previous_figures(previous, json_path)
    figures = data.to_json()
    comparison = compare_figures(previous_figures, figures) if previous_figures else None
    plots = _plots(folder, name, data, publish)
    page = _page(data, figures["created_at"], comparison, plots)
    md_path = _publish_text(folder / f"{name}.md", _markdown(page), publish)
    html_path = _publish_text(folder / f"{name}.html", _html(page), publish)
    if comparison is not None:
        figures["comparison"] = {"previous_created_at": comparison["previous_created_at"],
                                 "moved": len(comparison["moved"]), "changes": comparison["changes"]}
    _publish_text(json_path, json.dumps(figures, indent=2, default=str) + "\n", publish)
    return ReportFiles(markdown=md_path, html=html_path, json=json_path, plots=plots,
                       headline_markdown=page.headline_md, comparison=comparison)


__all__ = [
    "FORMAT_VERSION",
    "ReportData",
    "ReportFiles",
    "load_figures",
    "write_report",
]
