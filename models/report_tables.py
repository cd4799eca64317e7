"""The evaluation report's tables, as Markdown and as HTML: the headline, validation next to
test, the slices and the figures that moved since the previous report."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from models.report_figures import METHOD_LABELS, oracle_share, ordered_methods
from models.weighted_metrics import K


def fmt(value: Any, digits: int = 4) -> str:
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


def md_cell(value: Any) -> str:
    return (value if isinstance(value, str) else fmt(value)).replace("|", "\\|").replace("\n", " ")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(fmt(c) if not isinstance(c, str) else c)}</td>" for c in row) + "</tr>"
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
    return md_table(*headline_rows(headline, k))


def slice_rows(table: pd.DataFrame, k: int) -> dict[str, tuple[list[str], list[list[Any]]]]:
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


def comparison_rows(comparison: Mapping[str, Any], limit: int = 25) -> tuple[list[list[Any]], list[list[Any]]]:
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
    change_rows = [[c["what"], fmt(c["previous"]), fmt(c["current"])] for c in comparison["changes"]]
    return figure_rows, change_rows


__all__ = ["comparison_rows", "fmt", "headline_markdown", "headline_rows", "html_table", "md_table", "slice_rows",
           "split_rows"]
