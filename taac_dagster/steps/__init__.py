"""The per-track glue between the assets and the pure model code: one module per stage."""
