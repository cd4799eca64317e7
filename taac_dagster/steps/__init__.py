"""The pipeline steps: one module per stage, between the assets and the pure model code."""
