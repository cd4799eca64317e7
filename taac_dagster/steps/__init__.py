"""The steps layer: per-track glue between the assets and the plain model code."""
