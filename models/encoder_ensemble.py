"""Several encoders trained side by side as one model (``EncoderConfig.members`` > 1).

On a small dataset one encoder stops early, after a few tens of passes, and what it learned
depends on its initial weights: two seeds disagree on many top-10 lists while scoring the same.
Averaging their scores removes that variance (Toys, published protocol: docs/benchmarks.md).
The members share nothing but the batches: each has its own initial weights, dropout masks and
loss, and the training loss is the sum of theirs, so each member's gradient is the one it would
get alone. For retrieval a user or an item is the concatenation of the members' normalised
vectors over the square root of their number, so one inner product (one Faiss index) is the
mean of the members' cosine similarities.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn as nn

from models.encoder import Encoder, ItemTables
from models.encoder_config import EncoderConfig


def build_encoder(cfg: EncoderConfig) -> Encoder:
    """The model ``cfg`` describes: one ``Encoder``, or an ``EncoderEnsemble`` of ``cfg.members``."""
    return EncoderEnsemble(cfg) if cfg.members > 1 else Encoder(cfg)


class EncoderEnsemble(Encoder):
    """``cfg.members`` encoders behind the ``Encoder`` interface (training loss, user and item
    vectors, item tables, compilation). It has no layers of its own, so ``Encoder.__init__``,
    which builds them, is not run; member ``i`` is ``members.i`` in the state dict."""

    def __init__(self, cfg: EncoderConfig):
        if cfg.members < 2:
            raise ValueError(f"an ensemble needs members >= 2, got {cfg.members}")
        if cfg.similarity != "cosine":
            raise ValueError("an ensemble averages cosine similarities: set similarity: cosine (or members: 1)")
        nn.Module.__init__(self)
        self.cfg = cfg
        self.tables: ItemTables | None = None
        self.negative_queue = None
        member_cfg = dataclasses.replace(cfg, members=1)
        # Built one after another from the global generator: member 0 starts where a single
        # encoder of the same seed would, the others from where it left the generator.
        self.members = nn.ModuleList(Encoder(member_cfg) for _ in range(cfg.members))

    @property
    def encoders(self) -> list[Encoder]:
        return [cast(Encoder, member) for member in self.members]

    def attach(self, tables: ItemTables) -> Encoder:
        self.tables = tables
        for member in self.encoders:
            member.attach(tables)
        return self

    def compile_blocks(self, **options: Any) -> None:
        for member in self.encoders:
            member.compile_blocks(**options)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, int]]:
        if self.negative_queue is not None:
            raise ValueError("train.queue_batches needs model.members 1 (each member would need its own bank)")
        total, stats = None, {}
        for member in self.encoders:
            loss, stats = member(batch)
            total = loss if total is None else total + loss
        assert total is not None
        return total, stats

    def _join(self, vectors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(vectors, dim=-1) / math.sqrt(len(vectors))

    @torch.no_grad()
    def user_vectors(self, batch: dict[str, torch.Tensor], actions: Sequence[int]) -> torch.Tensor:
        return self._join([member.user_vectors(batch, actions) for member in self.encoders])

    @torch.no_grad()
    def item_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        return self._join([member.item_vectors(rows) for member in self.encoders])

    def member_parameters(self) -> list[list[nn.Parameter]]:
        """Each member's parameters: gradient clipping bounds each member's norm on its own."""
        return [list(member.parameters()) for member in self.members]
