"""The encoder's building blocks: ``FeatureBag`` (sum of categorical embeddings, one table),
``TimeFeatures``, dropout, attention, MLP and the Transformer block (models/encoder.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.encoder_config import GAP_BUCKETS, HOUR_ROWS, WEEKDAY_ROWS, EncoderConfig


class FeatureBag(nn.Module):
    """The sum of the embeddings of F categorical features, one table with per-feature offsets.

    Values are re-ids 1..vocab (0 = missing, contributes nothing); a vocabulary larger than
    ``buckets`` is hashed (modulo) into ``buckets`` rows. Optional per-value weights (e.g. 1/count
    for a multi-valued feature: its mean).
    """

    caps: torch.Tensor  # buffers: each feature's rows and first row in the table
    starts: torch.Tensor

    def __init__(
        self,
        vocab: Sequence[int],
        dim: int,
        buckets: int,
        sparse_threshold: int,
        *,
        columns: Sequence[int] | None = None,
        std: float = 0.02,
    ):
        super().__init__()
        caps = [max(1, min(int(v), buckets)) for v in vocab]
        starts = np.concatenate([[1], 1 + np.cumsum(caps)[:-1]]) if caps else np.zeros(0)
        # ``columns``: how many input columns each feature fills (a multi-valued one: several).
        repeat = list(columns) if columns is not None else [1] * len(caps)
        self.register_buffer("caps", torch.tensor(np.repeat(caps, repeat), dtype=torch.long), persistent=False)
        self.register_buffer("starts", torch.tensor(np.repeat(starts, repeat), dtype=torch.long), persistent=False)
        rows = 1 + sum(caps)
        self.bag = nn.EmbeddingBag(rows, dim, mode="sum", padding_idx=0, sparse=rows > sparse_threshold)
        nn.init.normal_(self.bag.weight, std=std)
        with torch.no_grad():
            self.bag.weight[0].zero_()

    def forward(self, values: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        values = values.long()
        hashed = torch.remainder(values - 1, self.caps) + 1
        idx = torch.where(values > 0, self.starts + hashed - 1, 0)
        flat = idx.reshape(-1, idx.shape[-1])
        w = weights.reshape(-1, idx.shape[-1]) if weights is not None else None
        return self.bag(flat, per_sample_weights=w).reshape(*values.shape[:-1], -1)


class TimeFeatures(nn.Module):
    """Hour of day, weekday, log2-bucketed gap to the previous event, and a Fourier encoding of
    absolute time (sin/cos at periods from one hour to one year), summed into one vector."""

    freq: torch.Tensor  # a buffer

    def __init__(self, dim: int, time_origin: int, n_fourier: int):
        super().__init__()
        self.time_origin = int(time_origin)
        self.table = nn.EmbeddingBag(HOUR_ROWS + WEEKDAY_ROWS + GAP_BUCKETS, dim, mode="sum")
        nn.init.normal_(self.table.weight, std=0.02)
        periods = torch.logspace(math.log10(3600.0), math.log10(365 * 86400.0), n_fourier)
        self.register_buffer("freq", 2 * math.pi / periods, persistent=False)
        self.fourier = nn.Linear(2 * n_fourier, dim)

    def forward(self, times: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        absolute = times + self.time_origin
        hour = torch.div(absolute, 3600, rounding_mode="floor") % 24
        weekday = (torch.div(absolute, 86400, rounding_mode="floor") + 3) % 7  # 1970-01-01: Thursday
        prev_valid = F.pad(valid[:, :-1], (1, 0), value=False)
        gap = torch.where(prev_valid, times - F.pad(times[:, :-1], (1, 0)), 0).clamp_min(0)
        gap_bucket = torch.log2(gap.float() + 1).long().clamp(max=GAP_BUCKETS - 1)
        idx = torch.stack([hour, HOUR_ROWS + weekday, HOUR_ROWS + WEEKDAY_ROWS + gap_bucket], dim=-1)
        out = self.table(idx.reshape(-1, 3)).reshape(*times.shape, -1)
        angle = times.float()[..., None] * self.freq
        return out + self.fourier(torch.cat([angle.sin(), angle.cos()], dim=-1))


class Dropout(nn.Module):
    """Inverted dropout with a cheap mask: each 64-bit random word gives four 16-bit uniforms,
    so the mask costs a quarter of the generator calls of nn.Dropout's per-element Bernoulli
    (about 5x faster on CPU, where dropout was a quarter of a baseline step). p is quantized
    to 1/65536; the mask follows torch's global generator (seeded per step by the trainer)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)
        self.threshold = round(self.p * 65536) - 32768  # keep where the int16 uniform >= this

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p <= 0:
            return x
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        keep = words.view(torch.int16)[:n].view(x.shape) >= self.threshold
        return torch.where(keep, x * (1.0 / (1.0 - self.p)), 0.0)


class _PermuteTokens(torch.autograd.Function):
    """Reorder each row's tokens: out[b, j] = x[b, index[b, j]]. The backward is the inverse
    reordering, a gather too (deterministic, unlike a scatter-add)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.gather(1, inverse.unsqueeze(-1).expand(-1, -1, grad.shape[-1])), None, None


def permute_tokens(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``x`` [B, S, d] with each row's tokens in the order ``index`` [B, S] (a permutation per
    row, ``inverse`` its inverse)."""
    return _PermuteTokens.apply(x, index, inverse)


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim)
    raise ValueError(f"unknown norm {kind!r}: layernorm or rmsnorm")


class Attention(nn.Module):
    """Causal self-attention over right-padded tokens (each row's tokens first, padding after),
    so no padding mask is needed: a real token never sees a later (padding) one."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model {cfg.d_model} is not divisible by n_heads {cfg.n_heads}")
        self.n_heads, self.dropout = cfg.n_heads, cfg.attn_dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention of every position, or (``last``: each row's last real position [B]) of
        that position only: [B, 1, D]."""
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        dropout = self.dropout if self.training else 0.0
        if last is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            q = q[torch.arange(B, device=x.device), :, last].unsqueeze(2)  # [B, heads, 1, d_head]
            keys = torch.arange(S, device=x.device)[None, :] <= last[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :], dropout_p=dropout)
            S = 1
        return self.out(y.transpose(1, 2).reshape(B, S, D))


class MLP(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.kind = cfg.mlp
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        if cfg.mlp == "swiglu":
            hidden = max(8, int(2 * hidden / 3))
            self.gate = nn.Linear(cfg.d_model, hidden, bias=False)
        elif cfg.mlp not in ("relu", "gelu"):
            raise ValueError(f"unknown mlp {cfg.mlp!r}: relu, gelu or swiglu")
        self.up = nn.Linear(cfg.d_model, hidden, bias=cfg.mlp != "swiglu")
        self.down = nn.Linear(hidden, cfg.d_model, bias=cfg.mlp != "swiglu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.relu(self.up(x)) if self.kind == "relu" else F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.norm1, self.norm2 = make_norm(cfg.norm, cfg.d_model), make_norm(cfg.norm, cfg.d_model)
        self.attn, self.mlp = Attention(cfg), MLP(cfg)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """``last`` (each row's last real position): the output of that position only, [B, 1, D]
        (retrieval queries)."""
        residual = x if last is None else x[torch.arange(x.shape[0], device=x.device), last].unsqueeze(1)
        x = residual + self.drop(self.attn(self.norm1(x), last))
        return x + self.drop(self.mlp(self.norm2(x)))
