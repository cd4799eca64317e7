"""The retrieval code's errors (index spec, build, search, tuning, saved indexes)."""

from __future__ import annotations

from models.errors import ModelError


class RetrievalError(ModelError, ValueError):
    """Bad input to the retrieval code: empty pool, wrong dimension, mismatched index."""


class IndexMismatchError(RetrievalError):
    """A saved index does not belong to the checkpoint / pool it is being used with."""
