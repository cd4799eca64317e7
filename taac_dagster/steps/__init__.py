"""The per-track steps the assets run: paths, settings and track lookups around the model code."""
