"""The generative retrieval encoder: a causal Transformer over a user's ad history.

Read top to bottom:

1. ``EncoderConfig``: every number the model needs, data shapes included, so a checkpoint
   rebuilds the model from its own config (no YAML needed).
2. ``ItemTables``: the item side data (features, multi-modal embeddings, Semantic IDs) indexed
   by item row (models/data.py). It is data, not parameters: attached to the model, never saved
   in a checkpoint, never synchronized by DDP.
3. Building blocks: ``FeatureBag`` (sum of categorical embeddings, one table), ``TimeFeatures``,
   attention, MLP, block.
4. ``Encoder``: the item tower, the user token, the backbone, the action-conditioned head, the
   training loss (``forward``) and the retrieval API (``user_vectors``, ``item_vectors``).

A sequence of n items becomes n + 1 tokens: the user token, then one token per item:

    token:    [pad ... pad] [user] [item_1] [item_2] ... [item_n]
    predicts:                item_1  item_2   item_3 ...  (retrieval)

Each item token is item_tower(item) + action embedding + time features + position; the output
at a token is the user's state after it, turned into a query for the *next* item by the head,
conditioned on the action asked for (exposure, click, conversion): the retrieval query on 1M
asks for a click, on 10M for a click or a conversion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.data import softmax_rows
from models.losses import NegativeQueue, full_softmax, info_nce, sampled_bce

GAP_BUCKETS = 32  # log2 buckets of the gap to the previous event, in seconds
HOUR_ROWS, WEEKDAY_ROWS = 24, 7


@dataclass
class EncoderConfig:
    # --- data shapes: filled from the prepared arrays (EncoderConfig.from_meta) ----------------
    num_item_rows: int = 2  # size of the item row space (0 = padding)
    id_rows: int = 2  # rows 1 .. id_rows - 1 have an id embedding; later rows are cold
    item_vocab: tuple[int, ...] = ()  # vocabulary of each sparse item feature
    user_vocab: tuple[int, ...] = ()  # sparse user features, then multi-valued ones
    num_user_sparse: int = 0  # how many of user_vocab are sparse (the rest are multi-valued)
    multi_len: int = 8
    mm_dims: tuple[int, ...] = ()  # dim of each multi-modal family
    sid_vocab: tuple[int, ...] = ()  # per Semantic ID level: codes + 1 (0 = none)
    n_actions: int = 2
    max_len: int = 100
    time_origin: int = 0  # seconds; data times are relative to it
    # --- architecture ---------------------------------------------------------------------------
    d_model: int = 64  # width of every embedding and of the Transformer
    n_layers: int = 2  # Transformer blocks (pre-norm, causal)
    n_heads: int = 2  # attention heads per block
    mlp_ratio: float = 4.0  # hidden width of a block's MLP over d_model
    mlp: str = "gelu"  # relu | gelu | swiglu
    norm: str = "layernorm"  # layernorm | rmsnorm
    dropout: float = 0.1  # on embeddings and residual branches
    attn_dropout: float = 0.0  # on attention weights (forces SDPA's slower math path on CPU)
    id_buckets: int = 0  # 0: one id row per item; n: ids hashed into n rows (huge vocabularies)
    id_init_std: float = 0.0  # initial spread of the id embeddings (0: zeros)
    feature_buckets: int = 1_000_000  # a feature with a larger vocabulary is hashed into this many rows
    # Embedding tables with more rows get sparse gradients and row-wise SparseAdam updates. Below
    # it a dense gradient is cheaper than coalescing a sparse one of batch x features rows.
    sparse_threshold: int = 500_000
    use_ids: bool = True  # an item's id embedding in its token
    use_item_features: bool = True  # its sparse features
    use_mm: bool = True  # its multi-modal embeddings, projected
    use_sids: bool = True  # its Semantic ID codes
    use_user_features: bool = True  # a user token of the user's features
    use_time: bool = True  # time features of each event (hour, weekday, gap to the previous, absolute time)
    use_actions: bool = True  # each event's action type
    n_fourier: int = 8  # Fourier frequencies of absolute time (periods from 1 hour to 1 year)
    action_conditioning: bool = True  # FiLM of the output by the action asked for
    # Also tell every token, inside the Transformer, which action its next item is asked for
    # (training: the target's own action; retrieval: the action asked for).
    next_action_input: bool = False
    out_proj: bool = True  # a linear map from the backbone to the query space
    # --- objective --------------------------------------------------------------------------------
    # softmax: over every item row (catalogues that fit); infonce: sampled negatives with logQ
    # correction (huge catalogues); bce: the official baseline's one negative per position.
    loss: str = "infonce"
    # softmax: leave each position's own history items out of its softmax, the way ranking
    # excludes them (the report's history filter), instead of pushing them down.
    loss_excludes_history: bool = False
    similarity: str = "cosine"  # cosine | dot (used by the loss and by retrieval)
    temperature: float = 0.05  # logits = similarity / temperature
    learn_temperature: bool = False  # learn it instead (from the value above)

    @classmethod
    def from_meta(cls, meta: dict[str, Any], **arch: Any) -> EncoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(arch) - known
        if unknown:
            raise ValueError(f"unknown model settings {sorted(unknown)}; known: {sorted(known)}")
        shapes = dict(
            num_item_rows=meta["num_item_rows"],
            id_rows=meta["id_rows"],
            item_vocab=tuple(meta["item_vocab"]),
            user_vocab=tuple(meta["user_vocab"][k] for k in meta["user_sparse"] + meta["user_multi"]),
            num_user_sparse=len(meta["user_sparse"]),
            multi_len=meta["multi_len"],
            mm_dims=tuple(meta["mm_dims"]),
            sid_vocab=tuple(meta["sid_vocab"]),
            n_actions=meta["n_actions"],
            max_len=meta["max_len"],
            time_origin=meta["time_origin"],
        )
        return cls(**{**shapes, **arch})  # arch may override a shape (e.g. a larger id table)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderConfig:
        data = dict(data)
        for f in fields(cls):
            if f.name in data and isinstance(data[f.name], list):
                data[f.name] = tuple(data[f.name])
        return cls(**data)


def history_pairs(classes: torch.Tensor, targeted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(position, class - 1) of every item that comes before a target position in its row, for
    the positions of ``targeted`` [B, L] in row-major order (the loss's order), sorted by
    position; ``classes`` [B, L] holds class numbers (0: padding). A position's own target
    class is never among them (an item bought again stays a target)."""
    B, L = classes.shape
    earlier = torch.ones(L, L, dtype=torch.bool, device=classes.device).tril(-1)  # [t, s]: s < t
    b, t, s = (targeted[:, :, None] & earlier[None] & (classes > 0)[:, None, :]).nonzero(as_tuple=True)
    position = torch.cumsum(targeted.reshape(-1), 0) - 1
    rows, cols, own = position[b * L + t], classes[b, s] - 1, classes[b, t] - 1
    keep = cols != own
    return rows[keep], cols[keep]


@dataclass
class ItemTables:
    """Item side data, indexed by item row. Tensors share memory with the numpy arrays."""

    feats: torch.Tensor  # int32 [N, F]
    mm: list[torch.Tensor] = field(default_factory=list)  # float32 [N, D_f] per family
    mm_mask: torch.Tensor | None = None  # bool [N, families]
    sids: torch.Tensor | None = None  # int32 [N, levels]
    # The full softmax's classes: row 0 (padding) then every row a training sequence holds or
    # the candidate pool offers, sorted (int64 [C]); ``class_of`` maps a row to its class
    # (int64 [N], -1 for rows in neither: an indexer may name many items the data never uses).
    classes: torch.Tensor | None = None
    class_of: torch.Tensor | None = None

    @classmethod
    def from_arrays(cls, arrays: Any) -> ItemTables:
        t = torch.from_numpy
        sids = arrays.a.get("item_sids")
        classes = softmax_rows(arrays.item_counts, arrays.cand_rows)
        class_of = np.full(int(arrays.meta["num_item_rows"]), -1, np.int64)
        class_of[classes] = np.arange(len(classes))
        return cls(
            feats=t(np.asarray(arrays.item_feats)),
            mm=[t(m) for m in arrays.mm_tables],
            mm_mask=t(np.asarray(arrays.item_mm_mask)),
            sids=t(sids) if sids is not None else None,
            classes=t(classes),
            class_of=t(class_of),
        )

    def to(self, device: torch.device | str) -> ItemTables:
        move = lambda x: x.to(device) if x is not None else None  # noqa: E731
        return ItemTables(
            move(self.feats), [move(m) for m in self.mm], move(self.mm_mask), move(self.sids),
            move(self.classes), move(self.class_of),
        )



# --- Building blocks ----------------------------------------------------------------------------


class FeatureBag(nn.Module):
    """The sum of the embeddings of F categorical features, one table with per-feature offsets.

    Values are re-ids 1..vocab (0 = missing, contributes nothing); a vocabulary larger than
    ``buckets`` is hashed (modulo) into ``buckets`` rows. Optional per-value weights (e.g. 1/count
    for a multi-valued feature: its mean).
    """

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


# --- The encoder --------------------------------------------------------------------------------


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.tables: ItemTables | None = None
        # Item tower: id + sparse features + multi-modal projections + Semantic ID codes.
        id_table_rows = (cfg.id_buckets + 1) if cfg.id_buckets else cfg.id_rows
        self.item_id = (
            nn.Embedding(id_table_rows, d, padding_idx=0, sparse=id_table_rows > cfg.sparse_threshold) if cfg.use_ids else None
        )
        if self.item_id is not None:
            # id_init_std 0: an item never seen in training adds nothing through its id and is
            # embedded by its features, multi-modal vectors and Semantic ID alone; but then an
            # item without features starts at the zero vector, where cosine similarity has no
            # direction to learn from. Candidates past id_rows never use the table either way.
            nn.init.normal_(self.item_id.weight, std=cfg.id_init_std)
            with torch.no_grad():
                self.item_id.weight[0].zero_()
        use_feats = cfg.use_item_features and len(cfg.item_vocab) > 0
        self.item_feats = FeatureBag(cfg.item_vocab, d, cfg.feature_buckets, cfg.sparse_threshold) if use_feats else None
        mm_dims = cfg.mm_dims if cfg.use_mm else ()
        self.mm_proj = nn.ModuleList(nn.Linear(dim, d) for dim in mm_dims)
        self.mm_missing = nn.Parameter(torch.zeros(len(mm_dims), d)) if mm_dims else None
        use_sids = cfg.use_sids and len(cfg.sid_vocab) > 0
        self.sid = FeatureBag(cfg.sid_vocab, d, 1 << 30, cfg.sparse_threshold) if use_sids else None
        # User token: sparse features + the mean of each multi-valued feature.
        self.user = None
        if cfg.use_user_features and cfg.user_vocab:
            n_multi = len(cfg.user_vocab) - cfg.num_user_sparse
            columns = [1] * cfg.num_user_sparse + [cfg.multi_len] * n_multi
            self.user = FeatureBag(cfg.user_vocab, d, cfg.feature_buckets, cfg.sparse_threshold, columns=columns)
        self.user_type = nn.Parameter(torch.zeros(d))  # marks the user token (and embeds users without features)
        # Per position: action type, time, position.
        self.action = nn.Embedding(cfg.n_actions, d) if cfg.use_actions else None
        self.next_action = nn.Embedding(cfg.n_actions, d) if cfg.next_action_input else None
        self.time = TimeFeatures(d, cfg.time_origin, cfg.n_fourier) if cfg.use_time else None
        self.pos = nn.Embedding(cfg.max_len + 1, d)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg.norm, d)
        # Head: FiLM by the action asked for, then a linear map to the query space.
        self.film = nn.Embedding(cfg.n_actions, 2 * d) if cfg.action_conditioning else None
        if self.film is not None:
            nn.init.zeros_(self.film.weight)
        self.out = nn.Linear(d, d) if cfg.out_proj else nn.Identity()
        self.log_temperature = nn.Parameter(torch.tensor(math.log(cfg.temperature))) if cfg.learn_temperature else None
        # InfoNCE's bank of earlier batches' negatives (training state, not a parameter: the
        # trainer sets it and keeps it in its checkpoints). None: the batch's negatives only.
        self.negative_queue: NegativeQueue | None = None
        for name, p in self.named_parameters():
            if name.startswith(("blocks.", "out.", "mm_proj.", "time.fourier")) and p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        nn.init.normal_(self.pos.weight, std=0.02)
        for table in (self.action, self.next_action):
            if table is not None:
                nn.init.normal_(table.weight, std=0.02)

    # -- item side ----------------------------------------------------------------------------

    def attach(self, tables: ItemTables) -> Encoder:
        """Give the model its item side data (on the model's device)."""
        self.tables = tables
        return self

    def embed_items(
        self,
        rows: torch.Tensor,
        feats: torch.Tensor | None,
        mm: Sequence[torch.Tensor],
        mm_mask: torch.Tensor | None,
        sids: torch.Tensor | None,
    ) -> torch.Tensor:
        """Embed items from explicit inputs: rows [n] (for the id; a row >= id_rows or 0 has no
        id: cold), feats [n, F], mm [n, D_f] per family with mm_mask [n, families], sids [n, levels]."""
        cfg = self.cfg
        parts = []
        if self.item_id is not None:
            ids = torch.where(rows < cfg.id_rows, rows, 0)
            if cfg.id_buckets:
                ids = torch.where(ids > 0, (ids * 2654435761) % cfg.id_buckets + 1, 0)
            parts.append(self.item_id(ids))
        if self.item_feats is not None and feats is not None:
            parts.append(self.item_feats(feats))
        for j, proj in enumerate(self.mm_proj):
            parts.append(torch.where(mm_mask[..., j : j + 1], proj(mm[j].float()), self.mm_missing[j]))
        if self.sid is not None and sids is not None:
            parts.append(self.sid(sids))
        if not parts:
            return torch.zeros(*rows.shape, cfg.d_model, device=rows.device)
        x = parts[0]
        for part in parts[1:]:
            x = x + part
        return x

    def _item_tower_rows(self, rows: torch.Tensor) -> torch.Tensor:
        t = self.tables
        if t is None:
            raise RuntimeError("attach(ItemTables) before embedding item rows")
        cpu = rows.to(t.feats.device)
        gather = lambda table: table[cpu].to(rows.device)  # noqa: E731
        return self.embed_items(
            rows,
            gather(t.feats) if self.item_feats is not None else None,
            [gather(m) for m in t.mm] if self.mm_proj else [],
            gather(t.mm_mask) if self.mm_proj else None,
            gather(t.sids) if (self.sid is not None and t.sids is not None) else None,
        )

    def item_tower(self, rows: torch.Tensor) -> torch.Tensor:
        """Embedding of item rows of any shape (each distinct row computed once)."""
        flat = rows.reshape(-1)
        unique, inverse = torch.unique(flat, return_inverse=True)
        # F.embedding, not [inverse]: its backward is deterministic on CPU (index_put is not)
        return F.embedding(inverse, self._item_tower_rows(unique)).reshape(*rows.shape, -1)

    # -- user side ----------------------------------------------------------------------------

    def user_token(self, user_sparse: torch.Tensor, user_multi: torch.Tensor) -> torch.Tensor:
        x = self.user_type.expand(user_sparse.shape[0], -1)
        if self.user is None:
            return x
        B, n_multi, M = user_multi.shape
        counts = (user_multi > 0).sum(-1, keepdim=True).clamp_min(1)
        multi_w = (1.0 / counts).expand(B, n_multi, M).reshape(B, n_multi * M)
        values = torch.cat([user_sparse, user_multi.reshape(B, n_multi * M)], dim=1)
        weights = torch.cat([torch.ones_like(user_sparse, dtype=multi_w.dtype), multi_w], dim=1)
        return x + self.user(values, weights)

    def encode(
        self, batch: dict[str, torch.Tensor], item_emb: torch.Tensor | None = None, *, last_only: bool = False,
        next_action: int = 0,
    ) -> torch.Tensor:
        """Backbone states [B, L + 1, d] (after the final norm); token c < L predicts items[:, c]
        (left padding), token L is the state after the whole history. ``last_only``: token L
        alone, [B, 1, d]; the last block then attends and runs its MLP for that position only
        (the keys still come from every position), which is what retrieval queries need.
        ``next_action``: the action token L is asked for (``next_action_input`` models)."""
        items, actions = batch["items"], batch["actions"]
        B, L = items.shape
        valid_items = items > 0
        if item_emb is None:
            item_emb = self.item_tower(items)
        tok = item_emb
        if self.action is not None:
            tok = tok + self.action(actions.clamp(0, self.cfg.n_actions - 1))
        if self.time is not None:
            tok = tok + self.time(batch["times"], valid_items)
        tokens = F.pad(tok, (0, 0, 1, 0))  # [B, L + 1, d]; token c + 1 is item c
        # History length: from the first real item on (an unknown item inside a history, row 0,
        # stays a token of its own).
        first = torch.where(valid_items.any(1), valid_items.to(torch.int8).argmax(1), L)
        n = L - first
        col = torch.arange(L + 1, device=items.device)
        user_col = (L - n)[:, None]
        user = self.user_token(batch["user_sparse"], batch["user_multi"])
        tokens[torch.arange(B, device=items.device), L - n] = user  # the user token, right before item_1
        pos = (col[None, :] - user_col).clamp_min(0)
        tokens = tokens + self.pos(pos)
        if self.next_action is not None:
            last = torch.full((B, 1), int(next_action), dtype=actions.dtype, device=items.device)
            tokens = tokens + self.next_action(torch.cat([actions, last], 1).clamp(0, self.cfg.n_actions - 1))
        # The blocks run on right-padded tokens (the user token first, padding last): causal
        # attention then needs no padding mask and SDPA takes its mask-free kernel. Row b is
        # rotated by its user column; the states are rotated back (left-padded) at the end.
        right = (col[None, :] + user_col) % (L + 1)
        left = (col[None, :] - user_col) % (L + 1)
        x = self.drop(permute_tokens(tokens, right, left))
        if last_only:  # each row's last real token (the state after the whole history) only
            for block in self.blocks[:-1]:
                x = block(x)
            if self.blocks:
                return self.norm(self.blocks[-1](x, last=n))
            return self.norm(x[torch.arange(B, device=items.device), n].unsqueeze(1))
        for block in self.blocks:
            x = block(x)
        return self.norm(permute_tokens(x, left, right))

    def head(self, h: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Query for the next item, given the action asked for."""
        if self.film is not None:
            scale, shift = self.film(action).chunk(2, dim=-1)
            h = h * (1 + scale) + shift
        return self.out(h)

    @property
    def temperature(self) -> torch.Tensor | float:
        if self.log_temperature is None:
            return self.cfg.temperature
        return self.log_temperature.exp().clamp_min(0.01)

    def compile_blocks(self, **options: Any) -> None:
        """``torch.compile`` each Transformer block in place (regional compilation). The whole
        step does not compile as one graph: the item tower's ``unique``, the target positions'
        ``nonzero`` and the sampled loss's own-column search have data-dependent shapes; the
        blocks hold the step's dense work and compile without a break once their dropout is
        torch's own (``Dropout``'s int16 mask is a CPU saving that compilation cannot trace).
        Histories change length from batch to batch, hence ``dynamic=True``."""
        for block in self.blocks:
            block.drop = nn.Dropout(block.drop.p).train(block.training)
            block.compile(**{"dynamic": True, **options})

    # -- training ---------------------------------------------------------------------------------

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of one (rank's share of a) batch, built by models.data.BatchMaker."""
        cfg = self.cfg
        items = batch["items"]
        B, L = items.shape
        if cfg.loss == "softmax":
            # Every item that trains or can be recommended is a class: embed them once and look
            # positions up among them (a training item is always a class).
            t = self.tables
            if t.classes is None:  # tables built by hand: every row is a class
                table, targets = self._item_tower_rows(torch.arange(cfg.num_item_rows, device=items.device)), items
            else:
                table, targets = self._item_tower_rows(t.classes), t.class_of[items]
            item_emb = F.embedding(targets, table)
        else:
            extra = [batch[k].reshape(-1) for k in ("neg_items", "pos_neg_items") if k in batch]
            all_emb = self.item_tower(torch.cat([items.reshape(-1), *extra]))
            item_emb = all_emb[: B * L].view(B, L, -1)
        h = self.encode(batch, item_emb)[:, :L]
        # The positions with a target (weight > 0), gathered once with index_select (its
        # backward is a plain index_add; boolean-mask indexing costs several times more).
        idx = (batch["weights"].reshape(-1) > 0).nonzero().squeeze(1)
        pick = lambda t: t.reshape(B * L, *t.shape[2:]).index_select(0, idx)  # noqa: E731
        query = self.head(pick(h), pick(batch["actions"]))
        weights = pick(batch["weights"])
        cosine = cfg.similarity == "cosine"
        if cfg.loss == "softmax":
            loss = full_softmax(
                query, table[1:], pick(targets) - 1,
                temperature=self.temperature if cosine else 1.0, weights=weights, scale=batch["loss_scale"], cosine=cosine,
                excluded=history_pairs(targets, batch["weights"] > 0) if cfg.loss_excludes_history else None,
            )
        elif cfg.loss == "infonce":
            neg_ids, neg_log_q = batch["neg_items"], batch["neg_logq"]
            neg = all_emb[B * L : B * L + len(neg_ids)]
            bank = self.negative_queue
            fresh = (neg, neg_ids, neg_log_q)
            if bank is not None and len(bank):
                # Earlier batches' negatives, detached: S sets of negatives averaged, so every
                # negative's log Q goes up by log S (models/losses.py); the positive's own item
                # is masked in each set like in the batch's own.
                old_emb, old_ids, old_log_q = bank.entries()
                sets = len(bank) + 1
                neg = torch.cat([neg, old_emb.to(neg.dtype)])
                neg_ids = torch.cat([neg_ids, old_ids])
                neg_log_q = torch.cat([neg_log_q.float(), old_log_q]) + math.log(sets)
            loss = info_nce(
                query, pick(item_emb), neg,
                temperature=self.temperature,
                pos_log_q=pick(batch["pos_logq"]), neg_log_q=neg_log_q,
                pos_ids=pick(items), neg_ids=neg_ids,
                weights=weights, scale=batch["loss_scale"], cosine=cosine,
            )
            if bank is not None and self.training:
                bank.push(*fresh)
        elif cfg.loss == "bce":
            neg = pick(all_emb[all_emb.shape[0] - B * L :].view(B, L, -1))
            loss = sampled_bce(query, pick(item_emb), neg, weights=weights, scale=batch["loss_scale"], cosine=cosine,
                               temperature=self.temperature if cosine else 1.0)
        else:
            raise ValueError(f"unknown loss {cfg.loss!r}: softmax, infonce or bce")
        return loss, {"positions": idx.numel()}

    # -- retrieval --------------------------------------------------------------------------------

    def _finish(self, v: torch.Tensor) -> torch.Tensor:
        return F.normalize(v.float(), dim=-1) if self.cfg.similarity == "cosine" else v.float()

    @torch.no_grad()
    def user_vectors(self, batch: dict[str, torch.Tensor], actions: Sequence[int]) -> torch.Tensor:
        """Retrieval queries [B, d] after each history, asking for ``actions`` (the mean of the
        per-action queries: e.g. (1,) click on 1M, (2, 1) conversion or click on 10M)."""
        h = None
        out = 0
        for a in actions:
            if h is None or self.next_action is not None:
                h = self.encode(batch, last_only=True, next_action=int(a))[:, -1]
            act = torch.full((h.shape[0],), int(a), dtype=torch.long, device=h.device)
            out = out + self._finish(self.head(h, act))
        return self._finish(out / len(actions))

    @torch.no_grad()
    def item_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """Retrieval keys [.., d] of item rows (cold items included): score = user · item."""
        return self._finish(self.item_tower(rows))


def count_parameters(model: nn.Module) -> dict[str, int]:
    sparse = sum(p.numel() for m in model.modules() if getattr(m, "sparse", False) for p in m.parameters(recurse=False))
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "sparse": sparse, "dense": total - sparse}
