"""The model code's own errors. ``models/`` knows nothing of the pipeline, so these do not
derive from ``taac_dagster.errors.TaacError``; the pipeline shows both kinds the same way
(``assets.failures.explained_failures``): the message, and what to do next.
"""

from __future__ import annotations


class ModelError(Exception):
    """Base class for errors the model code raises on purpose: an input that breaks a rule
    (the message says which and what was expected), or artifacts that do not belong together."""
