"""taac-dagster: an orchestrated pipeline for generative recommendation on TencentGR data."""

__version__ = "0.1.0"
