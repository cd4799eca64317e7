"""Readers for the two real TencentGR formats.

Each reader stages a dataset into the same DuckDB staging tables (see ``staging.py``), so
everything after them (``sql/``, checks, training) is one code path whatever the source.
"""

from taac_dagster.readers.detect import detect_format

__all__ = ["detect_format"]
