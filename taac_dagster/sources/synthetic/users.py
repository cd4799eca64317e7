"""The users: sparse topic interests, history lengths and profile features."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from taac_dagster.settings import SyntheticSettings
from taac_dagster.sources.synthetic.parameters import (
    HISTORY_LENGTH_CONCENTRATION,
    INTEREST_DIRICHLET_ALPHA,
    INTEREST_SLOTS,
    MAX_HISTORY,
    MIN_HISTORY,
    USER_FEATURE_SPECS,
    Stream,
    random_stream,
)


@dataclass
class UserFeature:
    present: np.ndarray  # bool[U]
    values: np.ndarray  # int64[U] for scalars; flat int64 values for lists
    offsets: np.ndarray | None = None  # int64[U + 1] for lists


@dataclass
class Population:
    """Users are indices 0..U-1 (re-id = index + 1)."""

    slot_topic: np.ndarray  # int64[U, S], sorted per row
    slot_weight: np.ndarray  # float32[U, S], duplicates merged (zero weight)
    slot_cumweight: np.ndarray  # float64[U, S]: what the sampler compares against
    top_topic: np.ndarray  # int64[U]
    length: np.ndarray  # int64[U] events per user
    features: dict[str, UserFeature]

    @property
    def num_users(self) -> int:
        return len(self.length)

    def dense_interest(self, lo: int, hi: int, num_topics: int) -> np.ndarray:
        dense = np.zeros((hi - lo, num_topics), dtype=np.float32)
        rows = np.repeat(np.arange(hi - lo), self.slot_topic.shape[1])
        np.add.at(dense, (rows, self.slot_topic[lo:hi].ravel()), self.slot_weight[lo:hi].ravel())
        return dense


def build_population(cfg: SyntheticSettings) -> Population:
    rng = random_stream(cfg.seed, Stream.USERS)
    num_users, num_topics = cfg.num_users, cfg.num_topics
    slots = min(INTEREST_SLOTS, num_topics)
    topics = rng.integers(0, num_topics, size=(num_users, slots))
    weights = rng.dirichlet(np.full(slots, INTEREST_DIRICHLET_ALPHA), size=num_users)
    order = np.argsort(topics, axis=1, kind="stable")
    topics = np.take_along_axis(topics, order, axis=1)
    weights = np.take_along_axis(weights, order, axis=1)
    for j in range(1, slots):  # merge a repeated topic into its last slot
        repeat = topics[:, j] == topics[:, j - 1]
        weights[repeat, j] += weights[repeat, j - 1]
        weights[repeat, j - 1] = 0.0
    # The ground truth stores float32 weights: generate from exactly those values.
    weights32 = weights.astype(np.float32)
    cumweight = np.cumsum(weights32.astype(np.float64), axis=1)
    top_topic = topics[np.arange(num_users), np.argmax(weights32, axis=1)]
    return Population(
        slot_topic=topics.astype(np.int64),
        slot_weight=weights32,
        slot_cumweight=cumweight,
        top_topic=top_topic.astype(np.int64),
        length=_history_lengths(rng, num_users, cfg.mean_history),
        features=_build_user_features(cfg, top_topic),
    )


def _history_lengths(rng: np.random.Generator, num_users: int, mean: float) -> np.ndarray:
    """Beta-shaped lengths in [MIN_HISTORY, MAX_HISTORY] with the requested mean: at the real
    mean of 91 most users sit at the cap and very short histories are rare."""
    share = min(max((mean - MIN_HISTORY) / (MAX_HISTORY - MIN_HISTORY), 0.01), 0.99)
    a, b = share * HISTORY_LENGTH_CONCENTRATION, (1 - share) * HISTORY_LENGTH_CONCENTRATION
    fraction = rng.beta(a, b, size=num_users)
    return (MIN_HISTORY + np.rint(fraction * (MAX_HISTORY - MIN_HISTORY))).astype(np.int64)


def _build_user_features(cfg: SyntheticSettings, top_topic: np.ndarray) -> dict[str, UserFeature]:
    rng = random_stream(cfg.seed, Stream.USER_FEATURES)
    num_users = len(top_topic)
    features: dict[str, UserFeature] = {}
    for spec in USER_FEATURE_SPECS:
        present = rng.random(num_users) >= spec.missing_rate
        if spec.max_values == 0:
            values = rng.integers(1, spec.vocab + 1, size=num_users)
            if spec.interest_linked > 0:
                per_topic = rng.integers(1, spec.vocab + 1, size=cfg.num_topics)
                linked = rng.random(num_users) < spec.interest_linked
                values = np.where(linked, per_topic[top_topic], values)
            features[spec.feature_id] = UserFeature(present=present, values=values.astype(np.int64))
        else:
            features[spec.feature_id] = _distinct_value_lists(rng, present, spec.vocab, spec.max_values)
    return features


def _distinct_value_lists(
    rng: np.random.Generator, present: np.ndarray, vocab: int, max_values: int
) -> UserFeature:
    """Lists of 1..max_values distinct values in 1..vocab (nothing for absent users)."""
    num_users = len(present)
    lengths = np.where(present, rng.integers(1, max_values + 1, size=num_users), 0)
    lengths = np.minimum(lengths, vocab)
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    owner = np.repeat(np.arange(num_users), lengths)
    # Values walk forward from a random start by steps small enough never to wrap onto
    # themselves: distinct without a per-user loop.
    max_step = max(1, (vocab - 1) // max(1, max_values - 1))
    steps = rng.integers(1, max_step + 1, size=len(owner))
    steps[offsets[:-1][lengths > 0]] = 0
    walked = np.cumsum(steps)
    walked -= walked[offsets[owner]]  # offsets[owner]: start of the owner's list
    start = rng.integers(0, vocab, size=num_users)
    values = (start[owner] + walked) % vocab + 1
    return UserFeature(present=present, values=values.astype(np.int64), offsets=offsets)
