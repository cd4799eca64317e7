"""Dagster assets, one module per pipeline stage. Each is thin: the work is in plain code."""
