"""Retrieval losses: the full softmax over every item, InfoNCE with sampled negatives and logQ
correction, and the official baseline's binary cross-entropy with one sampled negative per
position.

Notation: P positions to predict, M shared negatives, d the embedding width.

InfoNCE (sampled softmax over cosine similarity):

    s(u, v)  = cos(u, v) / tau                                    (dot product if cosine=False)
    l_p      = s(u_p, v_p) - log Q(i_p)                           the positive's logit
    l_pj     = s(u_p, n_j) - log Q(j),   -inf where j == i_p      the negatives' logits
    loss_p   = logsumexp(l_p, l_p1 .. l_pM) - l_p
    loss     = sum_p w_p loss_p * scale                            (scale = 1 / sum w by default)

Q(j) is the expected number of times item j shows up among the negatives (in-batch draws
follow the targets' popularity, sampled ones the sampler's law): subtracting log Q makes the
sampled softmax an unbiased estimate of the full softmax instead of one that punishes popular
items for being popular (the "logQ correction" of Yi et al., RecSys 2019). A negative that is
the position's own target is masked out. w_p weighs a position by its target's action type.
A negative drawn k times can be sent once with log Q lowered by log k: the same loss.

A bank of negatives from earlier batches (``NegativeQueue``) adds S - 1 more sets of negatives
to the current one. Each set's sum sum_j exp(s_j) / Q_j estimates the same thing (the softmax
denominator without the positive), so the S sets are averaged: every negative's log Q is raised
by log S. An item present in several sets then counts once per set, as each set's estimate
wants, and the positive keeps its own term: with an empty bank the loss is the plain one.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F


def weighted_sum(
    per_position: torch.Tensor, weights: torch.Tensor | None, scale: float | torch.Tensor | None
) -> torch.Tensor:
    """sum_p w_p loss_p * scale; ``scale`` defaults to 1 / sum(w) (the weighted mean)."""
    if weights is None:
        weights = torch.ones_like(per_position)
    if scale is None:
        scale = 1.0 / weights.sum().clamp_min(1e-12)
    return (per_position * weights).sum() * scale


def own_columns(pos_ids: torch.Tensor, neg_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of every negative that is its position's own target: binary search in the
    sorted negatives, not a P x M comparison (a bank of negatives makes M large). A sorted,
    unique ``neg_ids`` (what BatchMaker sends) is searched as it is."""
    if len(neg_ids) > 1 and bool((neg_ids[1:] > neg_ids[:-1]).all()):
        order = None
        ids = neg_ids
    else:
        ids, order = torch.sort(neg_ids, stable=True)
    lo = torch.searchsorted(ids, pos_ids)
    hits = torch.searchsorted(ids, pos_ids, right=True) - lo  # 0 or the item's copies among the negatives
    rows = torch.repeat_interleave(torch.arange(len(pos_ids), device=pos_ids.device), hits)
    starts = torch.repeat_interleave(lo, hits)
    offsets = torch.arange(len(rows), device=pos_ids.device) - torch.repeat_interleave(hits.cumsum(0) - hits, hits)
    cols = starts + offsets
    return rows, (cols if order is None else order[cols])


def info_nce(
    user: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 0.05,
    pos_log_q: torch.Tensor | None = None,
    neg_log_q: torch.Tensor | None = None,
    pos_ids: torch.Tensor | None = None,
    neg_ids: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    scale: float | torch.Tensor | None = None,
    cosine: bool = True,
) -> torch.Tensor:
    """Weighted InfoNCE of P positions (user [P, d], pos [P, d]) against M shared negatives
    (neg [M, d]). ``scale`` defaults to 1 / sum(weights), i.e. the weighted mean."""
    if cosine:
        user, pos, neg = F.normalize(user, dim=-1), F.normalize(pos, dim=-1), F.normalize(neg, dim=-1)
    user = user.float() / temperature  # fold 1/tau into the P x d side, not the P x M logits
    pos, neg = pos.float(), neg.float()
    pos_logit = (user * pos).sum(-1)
    if pos_log_q is not None:
        pos_logit = pos_logit - pos_log_q
    if neg_log_q is not None:
        # -log Q rides along in the GEMM as one more coordinate: [u, 1] . [n, -log Q]
        ones = torch.ones(len(user), 1, dtype=user.dtype, device=user.device)
        neg_logit = torch.cat([user, ones], 1) @ torch.cat([neg, -neg_log_q[:, None].float()], 1).T
    else:
        neg_logit = user @ neg.T
    if pos_ids is not None and neg_ids is not None and len(neg_ids):
        rows, cols = own_columns(pos_ids, neg_ids)
        neg_logit[rows, cols] = float("-inf")
    per_position = torch.logaddexp(pos_logit, torch.logsumexp(neg_logit, dim=1)) - pos_logit
    return weighted_sum(per_position, weights, scale)


class _ChunkedSoftmaxCE(torch.autograd.Function):
    """sum_p w_p * CE(user_p . items^T, target_p), computed over chunks of positions.

    When the [P, N] softmax fits ``keep_bytes``, the forward keeps it and the backward turns it
    into softmax - one-hot in place: three matmuls in all, each logit exponentiated once (on a
    12K-item catalogue the step is bound by these matmuls). Above that, the logits never exist
    at once: the forward keeps only each row's log-sum-exp and the backward recomputes a
    chunk's logits (one more matmul, but memory stays at a chunk). Backward runs once."""

    @staticmethod
    def forward(ctx, user, items, targets, weights, chunk, keep_bytes, mask_rows, mask_cols):  # noqa: ANN001, ANN205
        keep = len(user) * len(items) * user.element_size() <= keep_bytes
        lse = torch.empty(len(user), dtype=user.dtype, device=user.device)
        probs = torch.empty((len(user), len(items)) if keep else (0, 0), dtype=user.dtype, device=user.device)
        for lo in range(0, len(user), chunk):
            hi = min(lo + chunk, len(user))
            if keep:  # one exp per logit: softmax and log-sum-exp from the same exponentials
                rows = probs[lo:hi]
                torch.mm(user[lo:hi], items.T, out=rows)
                _mask_logits(rows, lo, hi, mask_rows, mask_cols)
                top = rows.amax(dim=1, keepdim=True)
                total = rows.sub_(top).exp_().sum(dim=1, keepdim=True)
                rows.div_(total)
                lse[lo:hi] = (top + total.log()).squeeze(1)
            else:
                lse[lo:hi] = torch.logsumexp(_mask_logits(user[lo:hi] @ items.T, lo, hi, mask_rows, mask_cols), dim=1)
        target_logit = (user * items[targets]).sum(-1)
        ctx.save_for_backward(user, items, targets, weights, lse, probs, mask_rows, mask_cols)
        ctx.chunk, ctx.keep = chunk, keep
        return ((lse - target_logit) * weights).sum()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        user, items, targets, weights, lse, probs, mask_rows, mask_cols = ctx.saved_tensors
        w = weights * grad
        grad_user = torch.empty_like(user)
        grad_items = torch.zeros_like(items)
        for lo in range(0, len(user), ctx.chunk):
            hi = min(lo + ctx.chunk, len(user))
            if ctx.keep:
                p = probs[lo:hi].mul_(w[lo:hi, None])  # w * softmax, in the kept buffer
            else:
                p = _mask_logits(user[lo:hi] @ items.T, lo, hi, mask_rows, mask_cols)
                p.sub_(lse[lo:hi, None]).exp_().mul_(w[lo:hi, None])
            p[torch.arange(hi - lo, device=p.device), targets[lo:hi]] -= w[lo:hi]
            grad_user[lo:hi] = p @ items
            grad_items.addmm_(p.T, user[lo:hi])
        return grad_user, grad_items, None, None, None, None, None, None


def _mask_logits(logits: torch.Tensor, lo: int, hi: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Set to -inf, in place, the logits of rows ``lo:hi`` that (``rows``, ``cols``) name
    (``rows`` sorted): classes left out of those positions' softmax."""
    if len(rows):
        start, stop = torch.searchsorted(rows, torch.tensor([lo, hi], device=rows.device)).tolist()
        if stop > start:
            logits[rows[start:stop] - lo, cols[start:stop]] = float("-inf")
    return logits


def full_softmax(
    user: torch.Tensor,
    items: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    weights: torch.Tensor | None = None,
    scale: float | torch.Tensor | None = None,
    cosine: bool = True,
    chunk_bytes: int = 8 << 20,
    keep_bytes: int = 512 << 20,
    excluded: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Weighted cross-entropy of P positions (user [P, d]) over every item (items [N, d]);
    ``targets`` [P] are row numbers into ``items``. No sampling, so no logQ correction. The
    logits are computed ``chunk_bytes`` at a time; the softmax is kept for the backward when it
    fits ``keep_bytes`` (``_ChunkedSoftmaxCE``). ``excluded``: (position, item) pairs, positions
    sorted, left out of those positions' softmax (never a position's own target)."""
    if cosine:
        user, items = F.normalize(user, dim=-1), F.normalize(items, dim=-1)
    user = user.float() / temperature
    if weights is None:
        weights = torch.ones(len(user), dtype=user.dtype, device=user.device)
    if scale is None:
        scale = 1.0 / weights.sum().clamp_min(1e-12)
    chunk = max(16, chunk_bytes // (4 * max(1, len(items))))
    none = torch.empty(0, dtype=torch.long, device=user.device)
    rows, cols = excluded if excluded is not None else (none, none)
    return _ChunkedSoftmaxCE.apply(user, items.float(), targets, weights.float(), chunk, keep_bytes, rows, cols) * scale


def sampled_bce(
    user: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    scale: float | torch.Tensor | None = None,
    cosine: bool = False,
    temperature: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """The official baseline: per position, BCE on the dot product with the positive (label 1)
    and with one sampled negative (label 0). user, pos, neg: [P, d]."""
    if cosine:
        user, pos, neg = F.normalize(user, dim=-1), F.normalize(pos, dim=-1), F.normalize(neg, dim=-1)
    pos_logit = (user * pos).sum(-1).float() / temperature
    neg_logit = (user * neg).sum(-1).float() / temperature
    per_position = F.softplus(-pos_logit) + F.softplus(neg_logit)  # BCE(pos, 1) + BCE(neg, 0)
    return weighted_sum(per_position, weights, scale)


class NegativeQueue:
    """The negatives of the last ``batches`` training batches: their item-tower outputs
    (detached: no gradient reaches an earlier batch's items), item rows and log Q. Their logits
    are one GEMM wider, and the item tower never runs on them again: ``batches`` x negatives x d
    floats of memory for ``batches`` times as many negatives. The vectors are the ones the
    model produced when the batch was seen, as in cross-batch memory (Wang et al., 2020); the
    state travels in training checkpoints so a resumed run sees the same bank."""

    def __init__(self, batches: int) -> None:
        self.batches = int(batches)
        self.slots: deque[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = deque(maxlen=max(1, self.batches))

    def __len__(self) -> int:
        return len(self.slots)

    def push(self, emb: torch.Tensor, ids: torch.Tensor, log_q: torch.Tensor) -> None:
        """Add one batch's negatives; the oldest batch leaves when ``batches`` are held."""
        if self.batches > 0:
            self.slots.append((emb.detach(), ids.detach(), log_q.detach().float()))

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(vectors [M, d], item rows [M], log Q [M]) of every held batch, oldest first."""
        emb, ids, log_q = zip(*self.slots)
        return torch.cat(emb), torch.cat(ids), torch.cat(log_q)

    def state(self) -> dict[str, torch.Tensor]:
        """Plain CPU tensors (a checkpoint loads with weights_only=True)."""
        if not self.slots:
            return {"sizes": torch.zeros(0, dtype=torch.long)}
        emb, ids, log_q = self.entries()
        sizes = torch.tensor([len(s[1]) for s in self.slots], dtype=torch.long)
        return {"sizes": sizes, "emb": emb.float().cpu(), "ids": ids.cpu(), "log_q": log_q.cpu()}

    def load(self, state: dict[str, torch.Tensor] | None, device: torch.device | str = "cpu") -> None:
        self.slots.clear()
        if not state or not len(state["sizes"]):
            return
        parts = [torch.split(state[k].to(device), state["sizes"].tolist()) for k in ("emb", "ids", "log_q")]
        for emb, ids, log_q in zip(*parts):
            self.push(emb, ids, log_q)
