"""Model code (torch/numpy, no Dagster import): batching, encoders, losses, retrieval, metrics."""
