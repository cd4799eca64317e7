"""Great Expectations: a suite run on a pandas frame in an ephemeral context, summarized as
JSON, and the outcome of a suite together with its full-table SQL counts."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from taac_dagster.quality.context import CheckOutcome


def load_gx():
    import great_expectations as gx  # imported lazily: the import takes seconds

    return gx


def validate_frame(suite_name: str, frame: pd.DataFrame, expectations: list[Any]) -> dict[str, Any]:
    """Run a GE suite on ``frame`` in an ephemeral context; return a JSON-friendly summary."""
    gx = load_gx()
    context = gx.get_context(mode="ephemeral")
    try:
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context.variables.progress_bars = ProgressBarsConfig(globally=False)
    except Exception:  # progress bars are cosmetic; an API change must not fail a check
        pass
    source = context.data_sources.add_pandas(f"{suite_name}_source")
    asset = source.add_dataframe_asset(name=suite_name)
    batch = asset.add_batch_definition_whole_dataframe("whole").get_batch(
        batch_parameters={"dataframe": frame}
    )
    suite = context.suites.add(gx.ExpectationSuite(name=suite_name, expectations=expectations))
    result = batch.validate(suite)
    failures = []
    for item in result.results:
        if item.success:
            continue
        config = item.expectation_config
        detail = {
            "expectation": config.type,
            "kwargs": {k: v for k, v in config.kwargs.items() if k != "batch_id"},
        }
        for key in ("unexpected_count", "unexpected_percent", "observed_value", "partial_unexpected_list"):
            if key in item.result:
                value = item.result[key]
                detail[key] = value[:5] if isinstance(value, list) else value
        failures.append(detail)
    return {
        "success": bool(result.success),
        "rows_validated": len(frame),
        "expectations": len(result.results),
        "failed_expectations": len(failures),
        "failures": _jsonable(failures),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def suite_outcome(
    spec_name: str,
    table: str,
    description: str,
    severity: str,
    suite: dict[str, Any],
    sql_counts: dict[str, int],
    problems: list[str] | None = None,
) -> CheckOutcome:
    problems = list(problems or [])
    counted = [name for name, count in sql_counts.items() if count]
    if counted and not problems:
        problems.append("full-table violations: " + ", ".join(f"{name} {sql_counts[name]}" for name in counted))
    if not suite["success"] and not problems:
        problems.append(
            "expectations failed on the sample: "
            + ", ".join(f"{f['expectation']} ({f['kwargs'].get('column', '')})" for f in suite["failures"])
        )
    passed = suite["success"] and all(count == 0 for count in sql_counts.values())
    return CheckOutcome(
        spec_name,
        table,
        passed,
        severity,
        description,
        {"ge": suite, "full_table_violations": sql_counts},
        problems if not passed else [],
    )


def empty_suite() -> dict[str, Any]:
    """The summary of a suite that had no row to validate (the full-table counts still run)."""
    return {"success": True, "rows_validated": 0, "expectations": 0, "failed_expectations": 0, "failures": []}
