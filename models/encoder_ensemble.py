"""Several encoders of one architecture, trained apart, served as one model
(``EncoderConfig.members`` > 1; training: models/ensemble_training.py).

On a small dataset one encoder stops early, after a few tens of passes, and what it learned
depends on its initial weights and its batch order: seeds that score the same disagree on many
top-10 lists, and averaging their scores removes that variance (Toys, published protocol:
docs/benchmarks.md). For retrieval a user or an item is the concatenation of the members'
normalised vectors over the square root of their number, so one inner product (one Faiss
index) is the mean of the members' cosine similarities.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn as nn

from models.encoder import Encoder, ItemTables
from models.encoder_config import EncoderConfig


def build_encoder(cfg: EncoderConfig) -> Encoder:
    """The model ``cfg`` describes: one ``Encoder``, or an ``EncoderEnsemble`` of ``cfg.members``."""
    return EncoderEnsemble(cfg) if cfg.members > 1 else Encoder(cfg)


class EncoderEnsemble(Encoder):
    """``cfg.members`` encoders behind the retrieval side of the ``Encoder`` interface (item
    tables, user and item vectors). It has no layers of its own, so ``Encoder.__init__``, which
    builds them, is not run; member ``i`` is ``members.i`` in the state dict. It is not trained
    as one model: each member trains on its own (models/ensemble_training.py)."""

    def __init__(self, cfg: EncoderConfig, members: Sequence[Encoder] | None = None):
        """``cfg.members`` new encoders of ``cfg``'s architecture, or the given ``members``."""
        if cfg.members < 2:
            raise ValueError(f"an ensemble needs members >= 2, got {cfg.members}")
        if cfg.similarity != "cosine":
            raise ValueError("an ensemble averages cosine similarities: set similarity: cosine (or members: 1)")
        nn.Module.__init__(self)
        self.cfg = cfg
        self.tables: ItemTables | None = None
        self.negative_queue = None
        member_cfg = dataclasses.replace(cfg, members=1)
        if members is not None and any(member.cfg != member_cfg for member in members):
            raise ValueError("ensemble members must share one configuration")
        self.members = nn.ModuleList(members if members is not None else
                                     [Encoder(member_cfg) for _ in range(cfg.members)])

    @classmethod
    def of(cls, members: Sequence[Encoder]) -> EncoderEnsemble:
        """The ensemble of trained encoders of one configuration (the modules themselves)."""
        return cls(dataclasses.replace(members[0].cfg, members=len(members)), members)

    @property
    def encoders(self) -> list[Encoder]:
        return [cast(Encoder, member) for member in self.members]

    def attach(self, tables: ItemTables) -> Encoder:
        self.tables = tables
        for member in self.encoders:
            member.attach(tables)
        return self

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, int]]:
        raise NotImplementedError("an ensemble's members train one at a time (models/ensemble_training.py)")

    def _join(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(vectors, dim=-1) / math.sqrt(len(vectors))

    @torch.no_grad()
    def user_vectors(self, batch: dict[str, torch.Tensor], actions: Sequence[int]) -> torch.Tensor:
        return self._join([member.user_vectors(batch, actions) for member in self.encoders])

    @torch.no_grad()
    def item_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        return self._join([member.item_vectors(rows) for member in self.encoders])
