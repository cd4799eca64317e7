"""An exponential moving average of the model's weights: what validation scores, early stopping
keeps and the checkpoint publishes when ``TrainConfig.ema_decay`` is set. Averaging the last few
hundred steps' weights smooths the noise of small batches on a small catalogue (docs/training.md);
the optimizer keeps training the raw weights.

Tables trained row by row with SparseAdam (over ``sparse_threshold`` rows) are left out: a step
touches few of their rows, and averaging every row each step would cost a pass over the whole
table for rows that did not move.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def averaged_names(model: nn.Module) -> list[str]:
    """The floating-point parameters to average: all but those of sparse-gradient tables."""
    sparse = {
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse
        for name, _ in module.named_parameters(recurse=False)
    }
    return [name for name, p in model.named_parameters() if p.is_floating_point() and name not in sparse]


class WeightAverage:
    """``shadow = d * shadow + (1 - d) * weights`` after every optimizer step, with
    ``d = min(decay, (1 + t) / (10 + t))`` at update ``t``: early on the average spans about the
    last tenth of the steps taken, so a short run is not averaged back towards its initial
    weights; from ``t`` near ``10 / (1 - decay)`` on, ``decay`` itself (0.999: the last ~1,000
    steps)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        params = dict(model.named_parameters())
        self.names = averaged_names(model)
        self.shadow = {name: params[name].detach().clone() for name in self.names}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        torch._foreach_lerp_([self.shadow[n] for n in self.names], [params[n].detach() for n in self.names],
                             1.0 - self.current_decay())
        self.updates += 1

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own weights again after."""
        params = dict(model.named_parameters())
        saved = {name: params[name].detach().clone() for name in self.names}
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for name in self.names:
                    params[name].copy_(saved[name])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name in self.names:
            params[name].copy_(self.shadow[name])

    def state(self) -> dict[str, Any]:
        return {"updates": self.updates,
                "shadow": {name: tensor.detach().to("cpu", copy=True) for name, tensor in self.shadow.items()}}

    def load(self, state: dict[str, Any] | None) -> None:
        if state:
            self.updates = int(state["updates"])
            for name in self.names:
                self.shadow[name].copy_(state["shadow"][name])
