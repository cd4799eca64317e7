"""Checkpoints of the encoder: their layout and the model rebuilt from one.

The trainer (models/trainer.py) writes ``last.pt`` through the ``FileWriter`` it is given;
``load_encoder`` reads one back, without the state only resuming training needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.data import Arrays, load_arrays
from models.encoder import Encoder, ItemTables
from models.encoder_config import EncoderConfig
from models.encoder_ensemble import build_encoder

CHECKPOINT_FORMAT = 1
LAST = "last.pt"
# What only resuming training reads from a checkpoint (dropped by load_encoder).
TRAINING_STATE = ("model", "optim", "negative_queue")


def load_encoder(
    path: str | Path, arrays: Arrays | None = None, device: str | torch.device = "cpu"
) -> tuple[Encoder, dict[str, Any]]:
    """Rebuild the model from a checkpoint alone (its config is inside); attach the item tables
    of ``arrays`` (default: the arrays the checkpoint was trained on) when they can be found.

    The returned dict is the checkpoint without its training state (``TRAINING_STATE``: the
    optimizer moments, the negative queue, the weights themselves, now in the model): the file
    is memory-mapped, so what a consumer never reads is never paged in. At the 1M shape the
    optimizer state is most of an ~8 GB checkpoint; kept, it held that much in every step that
    scores (measured growth in docs/scaling.md)."""
    # weights_only: plain containers and tensors only; mmap: read lazily from the file.
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    model = build_encoder(EncoderConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    ckpt = {key: value for key, value in ckpt.items() if key not in TRAINING_STATE}
    if isinstance(ckpt.get("early_stopping"), dict):
        ckpt["early_stopping"] = {k: v for k, v in ckpt["early_stopping"].items() if k != "best_model"}
    if arrays is None and ckpt.get("arrays_dir") and Path(ckpt["arrays_dir"], "meta.json").is_file():
        arrays = load_arrays(ckpt["arrays_dir"])
    if arrays is not None:
        model.attach(ItemTables.from_arrays(arrays).to(device))
    return model, ckpt
