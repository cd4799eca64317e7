"""The steps layer: one module per stage, the per-track glue (paths, settings, the warehouse,
atomic publishing, metadata) between the thin assets and the pure model code in ``models/``."""
