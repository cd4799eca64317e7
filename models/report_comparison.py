"""The comparison of a report with the previous one: which figures moved and by how much, and
what changed in between (code version, data version, checkpoint, config)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def report_figures(figures: Mapping[str, Any]) -> dict[str, float]:
    """Every comparable number of a report JSON, by dotted name."""
    flat = flatten({"methods": figures.get("methods", {}), "oracle_share": figures.get("oracle_share", {})})
    for row in figures.get("slices", []):
        base = f"slices.{row['slice']}.{row['bucket']}.{row['method']}"
        for key, value in row.items():
            if key not in ("slice", "bucket", "method"):
                flat[f"{base}.{key}"] = value
    for key, value in flatten(figures.get("provenance", {}).get("figures", {}), "provenance").items():
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
    prov_before = flatten({k: v for k, v in previous.get("provenance", {}).items() if k != "figures"})
    prov_after = flatten({k: v for k, v in current.get("provenance", {}).items() if k != "figures"})
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


__all__ = ["compare_figures", "flatten", "report_figures"]
