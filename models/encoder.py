"""The generative retrieval encoder: a causal Transformer over a user's ad history.

Read top to bottom:

1. ``EncoderConfig`` (models/encoder_config.py): every number the model needs, data shapes
   included, so a checkpoint rebuilds the model from its own config (no YAML needed).
2. ``ItemTables``: the item side data (features, multi-modal embeddings, Semantic IDs) indexed
   by item row (models/data.py). It is data, not parameters: attached to the model, never saved
   in a checkpoint, never synchronized by DDP.
3. Building blocks (models/layers.py): ``FeatureBag`` (sum of categorical embeddings, one
   table), ``TimeFeatures``, attention, MLP, block.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.data import Arrays, softmax_rows
from models.encoder_config import EncoderConfig
from models.layers import Block, Dropout, FeatureBag, TimeFeatures, make_norm, permute_tokens
from models.losses import NegativeQueue, full_softmax, info_nce, sampled_bce


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
    def from_arrays(cls, arrays: Arrays) -> ItemTables:
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
        def move(x: torch.Tensor | None) -> torch.Tensor | None:
            return x.to(device) if x is not None else None

        return ItemTables(
            self.feats.to(device), [m.to(device) for m in self.mm], move(self.mm_mask), move(self.sids),
            move(self.classes), move(self.class_of),
        )


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
        if self.mm_proj:
            if mm_mask is None or self.mm_missing is None:
                raise ValueError("multi-modal embeddings need their presence mask")
            missing = self.mm_missing
            for j, proj in enumerate(self.mm_proj):
                parts.append(torch.where(mm_mask[..., j : j + 1], proj(mm[j].float()), missing[j]))
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
            block.drop = nn.Dropout(cast(Block, block).drop.p).train(block.training)
            block.compile(**{"dynamic": True, **options})

    # -- training ---------------------------------------------------------------------------------

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, int]]:
        """The training loss of one (rank's share of a) batch, built by models.batches.BatchMaker."""
        cfg = self.cfg
        items = batch["items"]
        B, L = items.shape
        cosine = cfg.similarity == "cosine"
        if cfg.loss == "softmax":
            # Every item that trains or can be recommended is a class: embed them once and look
            # positions up among them (a training item is always a class).
            table, targets = self._softmax_classes(items)
            query, weights, pick, idx = self._queries(batch, F.embedding(targets, table))
            loss = full_softmax(
                query, table[1:], pick(targets) - 1,
                temperature=self.temperature if cosine else 1.0, weights=weights, scale=batch["loss_scale"], cosine=cosine,
                excluded=history_pairs(targets, batch["weights"] > 0) if cfg.loss_excludes_history else None,
            )
            return loss, {"positions": idx.numel()}
        extra = [batch[k].reshape(-1) for k in ("neg_items", "pos_neg_items") if k in batch]
        all_emb = self.item_tower(torch.cat([items.reshape(-1), *extra]))
        item_emb = all_emb[: B * L].view(B, L, -1)
        query, weights, pick, idx = self._queries(batch, item_emb)
        if cfg.loss == "infonce":
            loss = self._info_nce(batch, query, item_emb, all_emb, B * L, pick, weights)
        elif cfg.loss == "bce":
            neg = pick(all_emb[all_emb.shape[0] - B * L :].view(B, L, -1))
            loss = sampled_bce(query, pick(item_emb), neg, weights=weights, scale=batch["loss_scale"], cosine=cosine,
                               temperature=self.temperature if cosine else 1.0)
        else:
            raise ValueError(f"unknown loss {cfg.loss!r}: softmax, infonce or bce")
        return loss, {"positions": idx.numel()}

    def _softmax_classes(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the item tower of every class, each position's class) for the full softmax."""
        t = self.tables
        if t is None:
            raise RuntimeError("attach(ItemTables) before embedding item rows")
        if t.classes is None or t.class_of is None:  # tables built by hand: every row is a class
            return self._item_tower_rows(torch.arange(self.cfg.num_item_rows, device=items.device)), items
        return self._item_tower_rows(t.classes), t.class_of[items]

    def _queries(
        self, batch: dict[str, torch.Tensor], item_emb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
        """(queries, weights, pick, positions) of the positions with a target (weight > 0):
        ``pick`` gathers a [B, L, ...] tensor's values at those positions."""
        B, L = batch["items"].shape
        h = self.encode(batch, item_emb)[:, :L]
        # The positions with a target, gathered once with index_select (its backward is a
        # plain index_add; boolean-mask indexing costs several times more).
        idx = (batch["weights"].reshape(-1) > 0).nonzero().squeeze(1)
        pick = lambda t: t.reshape(B * L, *t.shape[2:]).index_select(0, idx)  # noqa: E731
        query = self.head(pick(h), pick(batch["actions"]))
        return query, pick(batch["weights"]), pick, idx

    def _info_nce(
        self, batch: dict[str, torch.Tensor], query: torch.Tensor, item_emb: torch.Tensor, all_emb: torch.Tensor,
        offset: int, pick: Callable[[torch.Tensor], torch.Tensor], weights: torch.Tensor,
    ) -> torch.Tensor:
        """InfoNCE of the queries against their positions' items (``item_emb``), the batch's
        negatives (rows ``offset`` on of ``all_emb``) and the negative queue's; the batch's own
        then join the queue. The positives are gathered after the negatives, as they always
        were: autograd sums the item tower's gradients in that order."""
        neg_ids, neg_log_q = batch["neg_items"], batch["neg_logq"]
        neg = all_emb[offset : offset + len(neg_ids)]
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
            pos_ids=pick(batch["items"]), neg_ids=neg_ids,
            weights=weights, scale=batch["loss_scale"], cosine=self.cfg.similarity == "cosine",
        )
        if bank is not None and self.training:
            bank.push(*fresh)
        return loss

    # -- retrieval --------------------------------------------------------------------------------

    def _finish(self, v: torch.Tensor) -> torch.Tensor:
        return F.normalize(v.float(), dim=-1) if self.cfg.similarity == "cosine" else v.float()

    @torch.no_grad()
    def user_vectors(self, batch: dict[str, torch.Tensor], actions: Sequence[int]) -> torch.Tensor:
        """Retrieval queries [B, d] after each history, asking for ``actions`` (the mean of the
        per-action queries: e.g. (1,) click on 1M, (2, 1) conversion or click on 10M)."""
        h = None
        out = torch.zeros(())  # what the per-action queries add to (the sum's start, as 0 was)
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
