"""Training batches from prepared arrays (models/data.py): which negatives a batch carries, the
item sampler, and ``BatchMaker``, whose batch of a step is a pure function of (seed, step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from models.data import Arrays, history_width

# log Q of item rows under a batch's negatives.
LogQ = Callable[[np.ndarray], np.ndarray]


@dataclass
class NegativeSpec:
    """Which negatives a batch carries (the loss decides how to use them)."""

    in_batch: int = 0  # target items drawn from other positions of the global batch (not with batch_items)
    # Distinct items of the global batch's sequences used as negatives (the item tower embeds
    # them anyway): all of them up to this many, else a uniform subset of this size; log Q is
    # then the probability that an item is among them. 0: none.
    batch_items: int = 0
    sampled: int = 0  # items drawn from the sampler, shared by the whole batch
    # Uniform draws from the candidate pool (cold items included), shared by the whole batch:
    # the items retrieval scores but training sequences may never hold. 0: none.
    pool: int = 0
    per_position: int = 0  # one sampled item per position (the official baseline's BCE), 0 or 1
    # Per-position negatives are drawn from a shared pool of this many sampled items (each
    # position's negative is still a draw from the sampler); the item tower then embeds a few
    # thousand negatives per step instead of one per position. 0: independent draws.
    per_position_pool: int = 4096
    sampler: str = "popularity"  # "popularity" (counts ** alpha) or "uniform" (over trained items)
    alpha: float = 1.0
    logq: bool = True
    # Also subtract log Q from the positive's logit (Yi et al.): the same formula as for a
    # negative, whether or not the positive's item was drawn among this batch's negatives.
    logq_positive: bool = True


class ItemSampler:
    """Draw item rows by popularity**alpha or uniformly over the items seen in training, in
    O(log n) per draw (inverse CDF); ``log_q`` is the log-probability of each row."""

    def __init__(self, counts: np.ndarray, kind: str = "popularity", alpha: float = 1.0) -> None:
        counts = np.asarray(counts, np.float64)
        seen = counts > 0
        if kind == "popularity":
            weights = np.where(seen, counts, 0.0) ** alpha
        elif kind == "uniform":
            weights = seen.astype(np.float64)
        else:
            raise ValueError(f"unknown sampler {kind!r}: popularity or uniform")
        if weights.sum() <= 0:
            raise ValueError("no item occurs in the training sequences: nothing to sample")
        self.p = weights / weights.sum()
        self.cdf = np.cumsum(self.p)
        self.cdf[-1] = 1.0

    def sample(self, rng: np.random.Generator, size: int | tuple[int, ...]) -> np.ndarray:
        return np.searchsorted(self.cdf, rng.random(size), side="right").astype(np.int64)


class BatchMaker:
    """Step-addressable batches: ``batch(step)`` is a pure function of (seed, step), so a run
    resumed at step s sees exactly the batches an uninterrupted run would have seen, and every
    rank of a distributed run builds the same global batch and keeps its own slice.

    Epoch e visits the training sequences in ``default_rng([seed, e]).permutation``; the last
    incomplete batch of an epoch is dropped (every step has the same global batch size).
    """

    def __init__(
        self,
        arrays: Arrays,
        batch_size: int,
        *,
        seed: int = 0,
        action_weights: dict[int, float] | None = None,
        negatives: NegativeSpec | None = None,
        rank: int = 0,
        world: int = 1,
        length_buckets: int = 0,
    ) -> None:
        n = arrays.num_sequences
        self.length_buckets = length_buckets
        self.lengths = (np.asarray(arrays.seq_items) > 0).sum(axis=1) if length_buckets else None
        self.arrays = arrays
        self.global_batch = max(world, min(batch_size, n) // world * world)
        if n < world:
            raise ValueError(f"{n} training sequences cannot feed {world} ranks")
        self.steps_per_epoch = n // self.global_batch
        self.seed = seed
        self.rank, self.world = rank, world
        n_actions = arrays.meta["n_actions"]
        weights = action_weights or {a: 1.0 for a in range(n_actions)}
        self.action_weight = np.array([float(weights.get(a, 0.0)) for a in range(n_actions)], np.float32)
        self.neg = negatives or NegativeSpec()
        counts = np.asarray(arrays.item_counts)
        # In-batch negatives are targets of weighted positions: their distribution is the
        # popularity of those positions' items.
        target_counts = (counts * (self.action_weight > 0)).sum(axis=1)
        self.target_q = target_counts / max(target_counts.sum(), 1)
        self.sampler: ItemSampler | None = None
        if self.neg.sampled or self.neg.per_position:
            self.sampler = ItemSampler(counts.sum(axis=1), self.neg.sampler, self.neg.alpha)
        # Share of training positions per item: the chance that one position holds it.
        self.position_p = counts.sum(axis=1) / max(counts.sum(), 1)
        # The candidate pool's rows (each once) and the chance that one uniform draw gives a row.
        self.pool_rows = np.unique(np.asarray(arrays.cand_rows).astype(np.int64)) if self.neg.pool else np.zeros(0, np.int64)
        self.pool_p = np.zeros(len(counts))
        if self.neg.pool:
            if not len(self.pool_rows):
                raise ValueError("pool negatives asked for, but the arrays have no candidate rows")
            self.pool_p[self.pool_rows] = 1.0 / len(self.pool_rows)
        # logQ: log of the expected number of times an item shows up among the negatives.
        expected = self.neg.in_batch * self.target_q
        if self.neg.sampled:
            expected = expected + self.neg.sampled * self.item_sampler.p
        if self.neg.pool:
            expected = expected + self.neg.pool * self.pool_p
        self.log_q = np.log(np.maximum(expected, 1e-12)).astype(np.float32)
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def item_sampler(self) -> ItemSampler:
        """The sampler of ``sampled`` and ``per_position`` negatives (only those ask for it)."""
        if self.sampler is None:
            raise ValueError("these negatives draw nothing from the item sampler")
        return self.sampler

    def inclusion_log_q(self, rows: np.ndarray, positions: int, keep: float) -> np.ndarray:
        """log P(item row is among a ``batch_items`` batch's negatives), for any rows:

            P = 1 - (1 - keep * (1 - (1 - p_pos)^positions)) * (1 - p_sampler)^sampled * (1 - p_pool)^pool

        where p_pos is the item's share of training positions, ``positions`` the batch's
        non-padding positions and ``keep`` the share of its distinct items kept (1: all of
        them). The same number for a negative and for a positive, drawn or not."""
        rows = np.asarray(rows, np.int64)
        absent = positions * np.log1p(-np.minimum(self.position_p[rows], 1 - 1e-9))  # log P(no position holds it)
        in_batch = -np.expm1(np.minimum(absent, -1e-12))  # P(some position holds it)
        absent = np.log1p(-np.minimum(keep * in_batch, 1 - 1e-12))  # log P(not in the kept subset)
        if self.neg.sampled:
            absent = absent + self.neg.sampled * np.log1p(-np.minimum(self.item_sampler.p[rows], 1 - 1e-9))
        if self.neg.pool:
            absent = absent + self.neg.pool * np.log1p(-np.minimum(self.pool_p[rows], 1 - 1e-9))
        return np.log(-np.expm1(np.minimum(absent, -1e-12))).astype(np.float32)

    def order(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s sequence order; batch i is its i-th slice of ``global_batch`` rows.

        With ``length_buckets`` > 0, the shuffled sequences are cut into chunks of that many
        batches, each chunk is sorted by history length and cut into batches, and the batches
        are shuffled: a batch then holds histories of similar length, so trimming it to its
        longest history leaves little padding, while every batch is still a random draw."""
        # Read once: worker threads build batches of two epochs at once around a boundary.
        cached = self._order
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(self.arrays.num_sequences)
            if self.lengths is not None:
                B = self.global_batch
                used = self.steps_per_epoch * B
                chunk = self.length_buckets * B
                for lo in range(0, used, chunk):
                    part = order[lo : min(lo + chunk, used)]
                    order[lo : lo + len(part)] = part[np.argsort(self.lengths[part], kind="stable")]
                batches = order[:used].reshape(self.steps_per_epoch, B)[rng.permutation(self.steps_per_epoch)]
                order[:used] = batches.reshape(-1)
            cached = self._order = (epoch, order)
        return cached[1]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        epoch, i = divmod(step, self.steps_per_epoch)
        rows = self.order(epoch)[i * self.global_batch : (i + 1) * self.global_batch]
        rows = np.sort(rows)  # sequential reads of the memory maps; the set is what is random
        return self.make(rows, np.random.default_rng([self.seed, 1_000_003, step]))

    def pool_draws(self, rng: np.random.Generator) -> np.ndarray:
        """``pool`` uniform draws from the candidate pool's rows (none: no random number used)."""
        if not self.neg.pool:
            return np.zeros(0, np.int64)
        return self.pool_rows[rng.integers(0, len(self.pool_rows), self.neg.pool)]

    def make(self, rows: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Global batch of the training sequences ``rows``; this rank's slice is returned."""
        a = self.arrays
        items = np.asarray(a.seq_items[rows])
        # No compute on padding: the batch keeps only as many (right-aligned) columns as its
        # longest history.
        width = history_width(items)
        items = np.ascontiguousarray(items[:, -width:])
        actions = np.asarray(a.seq_actions[rows, -width:]).astype(np.int64)
        weights = self.action_weight[actions] * (items > 0)
        total = float(weights.sum())
        out, log_q = self.shared_negatives(items, weights, rng)
        has_negatives = len(out.get("neg_items", ())) > 0
        if self.neg.per_position:
            out["pos_neg_items"] = self.position_negatives(items.shape, rng)
        # This rank's slice of the per-sequence arrays.
        per_rank = len(rows) // self.world
        mine = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        rows, items, actions, weights = rows[mine], items[mine], actions[mine], weights[mine]
        if "pos_neg_items" in out:
            out["pos_neg_items"] = out["pos_neg_items"][mine]
        users = np.asarray(a.seq_users[rows]).astype(np.int64)
        out.update(
            items=items.astype(np.int64),
            actions=actions,
            times=np.asarray(a.seq_times[rows, -width:]).astype(np.int64),
            user_sparse=np.asarray(a.user_sparse[users]).astype(np.int64),
            user_multi=np.asarray(a.user_multi[users]).astype(np.int64),
            weights=weights.astype(np.float32),
            pos_logq=(np.where(items > 0, log_q(items), 0).astype(np.float32)
                      if (self.neg.logq and self.neg.logq_positive and has_negatives)
                      else np.zeros(items.shape, np.float32)),
            # The loss is summed over this rank and divided by the global weight total; DDP
            # averages gradients over ranks, so the world size comes back in here.
            loss_scale=np.asarray(self.world / max(total, 1e-12), np.float32),
        )
        return out

    def shared_negatives(
        self, items: np.ndarray, weights: np.ndarray, rng: np.random.Generator
    ) -> tuple[dict[str, np.ndarray], LogQ]:
        """The negatives the whole global batch shares (``neg_items``, ``neg_logq``; none: no
        entry) and the log Q of any item rows under them (for the positives)."""
        out: dict[str, np.ndarray] = {}
        if self.neg.in_batch:
            candidates = np.flatnonzero(weights.reshape(-1) > 0)
            if len(candidates) == 0:
                candidates = np.flatnonzero(items.reshape(-1) > 0)
            pick = rng.integers(0, len(candidates), self.neg.in_batch)
            in_batch = items.reshape(-1)[candidates[pick]].astype(np.int64)
        else:
            in_batch = np.zeros(0, np.int64)
        sampled = self.item_sampler.sample(rng, self.neg.sampled) if self.neg.sampled else np.zeros(0, np.int64)
        neg = np.concatenate([in_batch, sampled])
        log_q: LogQ = lambda rows: self.log_q[rows]  # noqa: E731  (log Q of any item rows)
        if self.neg.batch_items:
            # Each distinct item once: log Q is the log-probability that the item is in the set
            # (inclusion_log_q), for the negatives and for every position's item alike.
            distinct = np.unique(items[items > 0].astype(np.int64))
            keep = min(1.0, self.neg.batch_items / max(1, len(distinct)))
            if keep < 1.0:
                distinct = np.sort(rng.choice(distinct, self.neg.batch_items, replace=False))
            positions = int((items > 0).sum())
            neg = np.unique(np.concatenate([distinct, sampled, self.pool_draws(rng)]))
            log_q = lambda rows: self.inclusion_log_q(rows, positions, keep)  # noqa: E731
            out["neg_items"] = neg
            out["neg_logq"] = log_q(neg) if self.neg.logq else np.zeros(len(neg), np.float32)
        else:
            neg = np.concatenate([neg, self.pool_draws(rng)])
            if len(neg):
                # Each distinct negative once (sorted), its multiplicity folded into log Q: a
                # negative drawn k times weighs k in the softmax denominator, i.e. logit + log k.
                neg, counts = np.unique(neg, return_counts=True)
                base = log_q(neg) if self.neg.logq else np.zeros(len(neg), np.float32)
                out["neg_items"] = neg
                out["neg_logq"] = (base - np.log(counts)).astype(np.float32)
        return out, log_q

    def position_negatives(self, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        """One sampled negative per position of the global batch (the official baseline's BCE)."""
        if self.neg.per_position_pool:
            pool = self.item_sampler.sample(rng, self.neg.per_position_pool)
            return pool[rng.integers(0, len(pool), shape)]
        return self.item_sampler.sample(rng, shape)
