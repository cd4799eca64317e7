"""Whether a trained checkpoint can score a set of prepared arrays, and the checkpoint loaded
for scoring.

A checkpoint rebuilds its model from its own config, so it loads whatever the data; it is usable
on arrays only when the fields that describe the data (``SHAPE_FIELDS``: vocabulary sizes,
multi-modal dims, Semantic ID levels, ...) agree, and it describes these arrays only when it was
trained on their data version.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.data import Arrays
from models.encoder import Encoder, EncoderConfig
from models.errors import ModelError

# EncoderConfig fields that describe the data, not the architecture: a checkpoint is usable on
# arrays only when these agree (vocabulary sizes, multi-modal dims, Semantic ID levels, ...).
SHAPE_FIELDS = (
    "num_item_rows", "id_rows", "item_vocab", "user_vocab", "num_user_sparse", "multi_len",
    "mm_dims", "sid_vocab", "n_actions", "max_len",
)


class EvaluationError(ModelError, ValueError):
    """The checkpoint, the index and the data do not fit together, or there is nothing to score."""


class CheckpointMismatchError(EvaluationError):
    """A checkpoint trained on data of another shape (vocabularies, families, ...)."""


class StaleCheckpointError(CheckpointMismatchError):
    """A checkpoint trained on other arrays of the same shape (another data version)."""


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def check_checkpoint_fits(ckpt: dict[str, Any], arrays: Arrays, path: Path) -> list[str]:
    """Raise ``CheckpointMismatchError`` when the checkpoint cannot score these arrays, and
    ``StaleCheckpointError`` when it was trained on another data version of them (same shapes:
    it would load, and describe a model of other data); return warnings (none today)."""
    have = ckpt.get("model_config") or {}
    want = EncoderConfig.from_meta(arrays.meta).to_dict()
    problems = [
        f"{key}: checkpoint {_plain(have.get(key))!r}, data {_plain(want[key])!r}"
        for key in SHAPE_FIELDS
        if _plain(have.get(key)) != _plain(want[key])
    ]
    for key, value in (ckpt.get("data_shape") or {}).items():
        if _plain(value) != _plain(arrays.meta.get(key)):
            problems.append(f"{key}: checkpoint {value!r}, data {arrays.meta.get(key)!r}")
    if problems:
        raise CheckpointMismatchError(
            f"{path}: the checkpoint does not match the track's data ({'; '.join(problems)}); it was trained "
            f"on data version {ckpt.get('data_version')!r}, the arrays are {arrays.data_version!r}. "
            "Re-materialize encoder_checkpoint for this data (or point TAAC_DATA_ROOT at the data it was trained on)."
        )
    if ckpt.get("data_version") != arrays.data_version:
        raise StaleCheckpointError(
            f"{path}: the checkpoint was trained on arrays of data version {ckpt.get('data_version')!r}, the current "
            f"arrays ({arrays.folder}) are data version {arrays.data_version!r} (same shapes, other data or settings). "
            "Re-materialize encoder_checkpoint for these arrays (or point TAAC_DATA_ROOT and the array settings, "
            "max_history, embedding_families, training.val_users, at what it was trained on)."
        )
    return []


@dataclass
class LoadedModel:
    """A preset's checkpoint, checked against the arrays it scores."""

    preset: str
    path: Path
    model: Encoder
    ckpt: dict[str, Any]
    actions: tuple[int, ...]
    warnings: list[str]

    @property
    def checkpoint_version(self) -> str:
        return str(self.ckpt["checkpoint_version"])

    @property
    def normalize(self) -> bool:
        return self.model.cfg.similarity == "cosine"


def kept_validation(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The validation figures of the weights a checkpoint holds (its best validation)."""
    step = ckpt.get("weights_step", ckpt.get("step"))
    return next((e for e in reversed(ckpt.get("evals") or []) if e.get("step") == step), None)


__all__ = [
    "SHAPE_FIELDS",
    "CheckpointMismatchError",
    "EvaluationError",
    "LoadedModel",
    "StaleCheckpointError",
    "check_checkpoint_fits",
    "kept_validation",
]
