"""Synthetic TencentGR-shaped dataset with planted structure and a known ground truth.

``generate_dataset`` writes a dataset in one of the two real on-disk formats (docs/domain.md),
so the readers cannot tell it from downloaded data, plus a ``ground_truth/``
folder that the real data does not have. ``load_ground_truth`` reads that folder back and
answers "what is the true probability of each item being next?", which gives the report its
ceiling (the oracle) next to the popularity floor.

The generative process, exactly as ``GroundTruth.next_item_probs`` evaluates it:

* Items belong to one of K latent topics. Inside a topic of n items, the item of popularity
  rank r (0 = most popular) is drawn with probability ln((r + 2) / (r + 1)) / ln(n + 1): a
  Zipf-like law with an exact inverse CDF, so sampling is O(1) per event.
* Each user has a sparse Dirichlet mixture over a few topics (its interests).
* The topic of a user's first event comes from the mixture; every later event keeps the
  previous item's topic with probability ``STICKINESS``, otherwise it is drawn afresh from
  the mixture. The item inside the topic is drawn by popularity.
* Every event is an exposure or a click. The click probability is higher when the item's
  topic is the user's top interest, so P(item | click) is P(item) tilted by that factor; on
  the 10M track a fixed share of clicks become conversions regardless of the item.

Everything is vectorized numpy over flat event arrays, generated in fixed-size blocks of users
with one random stream per block, so memory stays bounded and the output depends on the seed
and the settings only (same seed and settings: byte-identical files).
"""

from __future__ import annotations

import collections
import json
import math
import pickle
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from taac_dagster import formats
from taac_dagster.settings import SyntheticSettings
from taac_dagster.tracks import CLICK, CONVERSION, EXPOSURE, Track, get_track

FORMAT_VERSION = 1
GROUND_TRUTH_DIR = "ground_truth"

# --- Parameters of the generative process (recorded in ground_truth/model.json) ------------
STICKINESS = 0.5  # P(next event keeps the previous item's topic)
INTEREST_SLOTS = 3  # topics drawn per user (duplicates merge), so mixtures are sparse
INTEREST_DIRICHLET_ALPHA = 0.6  # Dirichlet concentration over a user's slots
TOPIC_SIZE_CONCENTRATION = 5.0  # Dirichlet over topic shares: topics of uneven size
TOP_INTEREST_CLICK_LIFT = 2.0  # click odds on the user's top topic vs. other topics
MAX_CLICK_PROBABILITY = 0.95
MAX_HISTORY = 100
MIN_HISTORY = 2  # a holdout needs a target and at least one event before it
HISTORY_LENGTH_CONCENTRATION = 2.0  # Beta(a, b) with a + b = this: most users near the cap
# Gaps between events: log-normal seconds, median about an hour, tail of days (real data:
# quartiles ~12 min / 1 h / 9 h).
GAP_LOG_MEDIAN = math.log(3_500.0)
GAP_LOG_SIGMA = 2.0
MAX_GAP_SECONDS = 7 * 86_400
LAST_EVENT_LATEST = 1_748_000_000  # 2025-05-23: histories end around here, as in the real data
LAST_EVENT_SPREAD = 3 * 86_400
PROFILE_SNAPSHOT = 1_748_040_000  # user-profile record time (competition format)
PROFILE_SPREAD = 12_000
EMBEDDING_NOISE = 1.0  # noise norm relative to the unit topic centroid: same-topic cos ~0.5
# Share of warm items a family covers (cold items are always covered). 82 follows the 1M
# release's sizes: ~128 GB of embeddings, 81 ~0.9 GB, 83-86 ~30 GB each, leaves ~7 GB for 82,
# i.e. ~1.7M vectors of 1,024 float32 (4 KiB) out of 4.78M items: ~35% (a loose figure; the
# release publishes no per-family counts). The others are guesses.
EMBEDDING_COVERAGE: dict[int, float] = {81: 0.9, 82: 0.35, 83: 0.75, 84: 0.7, 85: 0.7, 86: 0.65}
DEFAULT_EMBEDDING_COVERAGE = 0.7

# --- Raw id shapes (like the real indexer) -------------------------------------------------
CREATIVE_ID_BASE = 20_000_000_000
USER_ID_PREFIX = "user_"
MIN_RAW_DIGITS = 7  # feature raw value = <feature id> * 10**digits + code, e.g. 1120000028

# --- Block sizes: they fix the random streams, so changing them changes the data ----------
USERS_PER_BLOCK = 25_000
ITEMS_PER_BLOCK = 500_000
EMBEDDING_VALUES_PER_BLOCK = 1 << 23

_LARGE_STRING = pa.large_string()
# The event table is most of the bytes: zstd makes it ~35% smaller at no cost in speed, and
# dictionary pages pay off only for the 2-3 action types (ids and times are near-unique).
SEQ_PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "use_dictionary": ["seq.list.element.action_type"],
}


class _Stream:
    """Ids of the independent random streams (one per concern, blocks add an index)."""

    ITEMS = 1
    ITEM_FEATURES = 2
    USERS = 3
    USER_FEATURES = 4
    EVENTS = 5
    EMBEDDINGS = 6
    POOL = 7
    PROFILE_TIME = 8


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed % (1 << 63), *stream]))


# --- Feature specifications ------------------------------------------------------------------
@dataclass(frozen=True)
class _ItemFeatureSpec:
    feature_id: str
    # "topic": a per-topic value (with prob topic_fidelity); "advertiser": advertisers belong
    # to one topic each; "item": unique per item (feature 111); "random": uniform.
    kind: str
    vocab: int | None = None  # fixed vocabulary size, or None to scale with the catalogue
    items_per_value: float = 1.0  # vocabulary = warm items / this, when vocab is None
    topic_fidelity: float = 1.0
    missing_rate: float = 0.0
    missing_group: str | None = None  # features of one group go missing together
    cold_new_rate: float = 0.0  # share of cold items whose value is new (not in the indexer)


# Vocabulary sizes follow the real 1k-user sample; missing rates follow it too (115 is mostly
# absent; 112/117-120 go missing together).
ITEM_FEATURE_SPECS: tuple[_ItemFeatureSpec, ...] = (
    _ItemFeatureSpec("100", "topic", vocab=6, missing_rate=0.0005, missing_group="base"),
    _ItemFeatureSpec("101", "topic", vocab=44, topic_fidelity=0.8, missing_rate=0.0005, missing_group="base"),
    _ItemFeatureSpec("102", "advertiser", items_per_value=5, missing_rate=0.008, cold_new_rate=0.3),
    _ItemFeatureSpec("111", "item", cold_new_rate=1.0),
    _ItemFeatureSpec("112", "topic", vocab=25, topic_fidelity=0.9, missing_rate=0.012, missing_group="meta"),
    _ItemFeatureSpec("114", "random", vocab=17, missing_rate=0.0005, missing_group="base"),
    _ItemFeatureSpec("115", "random", vocab=187, missing_rate=0.77),
    _ItemFeatureSpec("116", "random", vocab=18, missing_rate=0.0005, missing_group="base"),
    _ItemFeatureSpec("117", "random", vocab=285, missing_rate=0.012, missing_group="meta"),
    _ItemFeatureSpec("118", "random", vocab=745, missing_rate=0.012, missing_group="meta"),
    _ItemFeatureSpec("119", "random", vocab=1745, missing_rate=0.012, missing_group="meta"),
    _ItemFeatureSpec("120", "random", vocab=1343, missing_rate=0.012, missing_group="meta"),
    _ItemFeatureSpec("121", "random", items_per_value=1.25, cold_new_rate=0.5),
    _ItemFeatureSpec("122", "random", items_per_value=5, missing_rate=0.0005, missing_group="base", cold_new_rate=0.3),
)
# The Hub release has no 111 column (it behaves like an item id).
HUB_ITEM_FEATURES: tuple[str, ...] = tuple(s.feature_id for s in ITEM_FEATURE_SPECS if s.feature_id != "111")


@dataclass(frozen=True)
class _UserFeatureSpec:
    feature_id: str
    vocab: int
    max_values: int = 0  # 0: a scalar feature; else a list of 1..max_values distinct values
    missing_rate: float = 0.0
    interest_linked: float = 0.0  # share of users whose value follows their top topic


USER_FEATURE_SPECS: tuple[_UserFeatureSpec, ...] = (
    _UserFeatureSpec("103", 67, interest_linked=0.5),
    _UserFeatureSpec("104", 2),
    _UserFeatureSpec("105", 7, missing_rate=0.16),
    _UserFeatureSpec("109", 3),
    _UserFeatureSpec("106", 13, max_values=4, missing_rate=0.10),
    _UserFeatureSpec("107", 17, max_values=2, missing_rate=0.66),
    _UserFeatureSpec("108", 4, max_values=1, missing_rate=0.80),
    _UserFeatureSpec("110", 2, max_values=2, missing_rate=0.62),
)


# --- Results ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticSummary:
    track: str
    format: str
    users: int
    items: int  # warm items (with a re-id)
    cold_items: int
    events: int
    clicks: int  # action_type 1
    conversions: int  # action_type 2
    candidates: int
    families: dict[int, int]  # family -> dim written
    bytes_written: int
    seconds: float
    users_with_target: int = 0
    forced_clicks: int = 0  # users whose only click was forced (see _force_one_click)

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")

    def to_metadata(self) -> dict[str, Any]:
        return {
            "track": self.track,
            "format": self.format,
            "users": self.users,
            "items": self.items,
            "cold_items": self.cold_items,
            "events": self.events,
            "clicks": self.clicks,
            "conversions": self.conversions,
            "candidates": self.candidates,
            "families": {str(f): d for f, d in self.families.items()},
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "events_per_second": round(self.events_per_second, 1),
            "users_with_target": self.users_with_target,
            "forced_clicks": self.forced_clicks,
        }


# --- Raw ids ---------------------------------------------------------------------------------
def _scramble(codes: np.ndarray, digits: int, salt: int) -> np.ndarray:
    """A bijection of [0, 10**digits): raw ids look random yet never collide."""
    if digits > 9:  # keeps multiplier * code < 10**18, inside int64
        raise ValueError(f"raw ids of {digits} digits are not supported (at most 9)")
    modulus = 10**digits
    multiplier = (2_654_435_761 * (salt + 1)) % modulus | 1
    while math.gcd(multiplier, modulus) != 1:  # coprime to 10: odd and not a multiple of 5
        multiplier += 2
    offset = (40_503 * (salt + 7)) % modulus
    return (codes.astype(np.int64) * multiplier + offset) % modulus


def _digits_for(count: int, minimum: int) -> int:
    return max(minimum, len(str(max(count, 1))))


def feature_raw_values(feature_id: str, reids: np.ndarray, vocab_upper: int, seed: int) -> np.ndarray:
    """Raw values like the real ones (1120000028) for feature re-ids; unique per feature."""
    digits = _digits_for(vocab_upper, MIN_RAW_DIGITS)
    return int(feature_id) * 10**digits + _scramble(reids, digits, salt=seed * 1_000 + int(feature_id))


def creative_ids(count: int, seed: int) -> np.ndarray:
    """Raw creative ids: 20_0xx_xxx_xxx, unique."""
    digits = _digits_for(count, MIN_RAW_DIGITS) + 1
    return CREATIVE_ID_BASE + _scramble(np.arange(count), digits, salt=seed * 1_000 + 1)


def raw_user_ids(count: int, seed: int) -> list[str]:
    digits = _digits_for(count, 8)
    codes = _scramble(np.arange(count), digits, salt=seed * 1_000 + 2)
    return [f"{USER_ID_PREFIX}{code:0{digits}d}" for code in codes.tolist()]


# --- Items -----------------------------------------------------------------------------------
@dataclass
class _ItemFeature:
    values: np.ndarray  # int64 re-ids over all items; > vocab means a value new to the indexer
    present: np.ndarray  # bool
    vocab: int  # re-ids 1..vocab are in the indexer

    def known(self) -> np.ndarray:
        return self.values <= self.vocab


@dataclass
class _Catalogue:
    """Warm items are indices 0..num_warm-1 (re-id = index + 1); cold items follow."""

    num_warm: int
    num_cold: int
    num_topics: int
    topic: np.ndarray  # int64[total]
    popularity: np.ndarray  # float64[total]: P(item | its topic); 0 for cold items
    creative_id: np.ndarray  # int64[total]
    topic_items: np.ndarray  # warm indices grouped by topic, most popular first
    topic_start: np.ndarray  # int64[K + 1] into topic_items
    features: dict[str, _ItemFeature]

    @property
    def total(self) -> int:
        return self.num_warm + self.num_cold

    @property
    def topic_size(self) -> np.ndarray:
        return np.diff(self.topic_start)


def _build_catalogue(cfg: SyntheticSettings) -> _Catalogue:
    num_warm, num_cold, num_topics = cfg.num_items, cfg.cold_items, cfg.num_topics
    if num_topics > num_warm:
        raise ValueError(f"num_topics ({num_topics}) must not exceed num_items ({num_warm})")
    total = num_warm + num_cold
    rng = _rng(cfg.seed, _Stream.ITEMS)
    shares = rng.dirichlet(np.full(num_topics, TOPIC_SIZE_CONCENTRATION))
    topic = rng.choice(num_topics, size=total, p=shares).astype(np.int64)
    topic[:num_topics] = np.arange(num_topics)  # every topic has at least one warm item

    # Popularity rank inside a topic is random with respect to the re-id.
    by_topic = np.lexsort((rng.random(num_warm), topic[:num_warm]))
    topic_start = np.searchsorted(topic[by_topic], np.arange(num_topics + 1)).astype(np.int64)
    rank = np.empty(num_warm, dtype=np.int64)
    rank[by_topic] = np.arange(num_warm) - topic_start[topic[by_topic]]
    sizes = np.diff(topic_start)
    popularity = np.zeros(total)
    popularity[:num_warm] = np.log1p(1.0 / (rank + 1)) / np.log1p(sizes[topic[:num_warm]])

    return _Catalogue(
        num_warm=num_warm,
        num_cold=num_cold,
        num_topics=num_topics,
        topic=topic,
        popularity=popularity,
        creative_id=creative_ids(total, cfg.seed),
        topic_items=by_topic.astype(np.int64),
        topic_start=topic_start,
        features=_build_item_features(cfg, topic, num_warm),
    )


def _item_vocab(spec: _ItemFeatureSpec, num_warm: int, num_topics: int) -> int:
    if spec.kind == "item":
        return num_warm
    if spec.vocab is not None:
        return spec.vocab
    vocab = max(2, round(num_warm / spec.items_per_value))
    return max(vocab, num_topics) if spec.kind == "advertiser" else vocab


def _build_item_features(cfg: SyntheticSettings, topic: np.ndarray, num_warm: int) -> dict[str, _ItemFeature]:
    rng = _rng(cfg.seed, _Stream.ITEM_FEATURES)
    total, num_topics = len(topic), cfg.num_topics
    group_missing: dict[str, np.ndarray] = {}
    features: dict[str, _ItemFeature] = {}
    for spec in ITEM_FEATURE_SPECS:
        vocab = _item_vocab(spec, num_warm, num_topics)
        if spec.kind == "topic":
            per_topic = rng.integers(1, vocab + 1, size=num_topics)
            noise = rng.integers(1, vocab + 1, size=total)
            values = np.where(rng.random(total) < spec.topic_fidelity, per_topic[topic], noise)
        elif spec.kind == "advertiser":
            # Advertiser a (1-based) belongs to topic (a - 1) % K: same-advertiser items share
            # a topic, as ads of one advertiser share a theme.
            per_topic_count = (vocab - np.arange(num_topics) + num_topics - 1) // num_topics
            pick = np.floor(rng.random(total) * per_topic_count[topic]).astype(np.int64)
            values = topic + 1 + num_topics * pick
        elif spec.kind == "item":
            values = np.zeros(total, dtype=np.int64)
            values[:num_warm] = rng.permutation(num_warm) + 1
        else:
            values = rng.integers(1, vocab + 1, size=total)
        values = values.astype(np.int64)

        if spec.missing_group is not None:
            if spec.missing_group not in group_missing:
                group_missing[spec.missing_group] = rng.random(total) < spec.missing_rate
            missing = group_missing[spec.missing_group]
        else:
            missing = rng.random(total) < spec.missing_rate

        # Cold items: some values are new to the indexer (re-ids past the vocabulary).
        if total > num_warm and spec.cold_new_rate > 0:
            new = rng.random(total - num_warm) < spec.cold_new_rate
            cold_values = values[num_warm:]
            cold_values[new] = vocab + 1 + np.arange(int(new.sum()))
        features[spec.feature_id] = _ItemFeature(values=values, present=~missing, vocab=vocab)
    return features


# --- Users -----------------------------------------------------------------------------------
@dataclass
class _UserFeature:
    present: np.ndarray  # bool[U]
    values: np.ndarray  # int64[U] for scalars; flat int64 values for lists
    offsets: np.ndarray | None = None  # int64[U + 1] for lists


@dataclass
class _Population:
    """Users are indices 0..U-1 (re-id = index + 1)."""

    slot_topic: np.ndarray  # int64[U, S], sorted per row
    slot_weight: np.ndarray  # float32[U, S], duplicates merged (zero weight)
    slot_cumweight: np.ndarray  # float64[U, S]: what the sampler compares against
    top_topic: np.ndarray  # int64[U]
    length: np.ndarray  # int64[U] events per user
    features: dict[str, _UserFeature]

    @property
    def num_users(self) -> int:
        return len(self.length)

    def dense_interest(self, lo: int, hi: int, num_topics: int) -> np.ndarray:
        dense = np.zeros((hi - lo, num_topics), dtype=np.float32)
        rows = np.repeat(np.arange(hi - lo), self.slot_topic.shape[1])
        np.add.at(dense, (rows, self.slot_topic[lo:hi].ravel()), self.slot_weight[lo:hi].ravel())
        return dense


def _build_population(cfg: SyntheticSettings) -> _Population:
    rng = _rng(cfg.seed, _Stream.USERS)
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
    return _Population(
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


def _build_user_features(cfg: SyntheticSettings, top_topic: np.ndarray) -> dict[str, _UserFeature]:
    rng = _rng(cfg.seed, _Stream.USER_FEATURES)
    num_users = len(top_topic)
    features: dict[str, _UserFeature] = {}
    for spec in USER_FEATURE_SPECS:
        present = rng.random(num_users) >= spec.missing_rate
        if spec.max_values == 0:
            values = rng.integers(1, spec.vocab + 1, size=num_users)
            if spec.interest_linked > 0:
                per_topic = rng.integers(1, spec.vocab + 1, size=cfg.num_topics)
                linked = rng.random(num_users) < spec.interest_linked
                values = np.where(linked, per_topic[top_topic], values)
            features[spec.feature_id] = _UserFeature(present=present, values=values.astype(np.int64))
        else:
            features[spec.feature_id] = _distinct_value_lists(rng, present, spec.vocab, spec.max_values)
    return features


def _distinct_value_lists(
    rng: np.random.Generator, present: np.ndarray, vocab: int, max_values: int
) -> _UserFeature:
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
    return _UserFeature(present=present, values=values.astype(np.int64), offsets=offsets)


# --- Click model -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ClickModel:
    p_click_top_interest: float
    p_click_other: float
    conversion_share: float  # of clicks (10M track only; 0 on 1M)

    def to_json(self) -> dict[str, float]:
        return {
            "p_click_top_interest": self.p_click_top_interest,
            "p_click_other": self.p_click_other,
            "top_interest_lift": TOP_INTEREST_CLICK_LIFT,
            "conversion_share_of_clicks": self.conversion_share,
        }


def _click_model(cfg: SyntheticSettings, population: _Population, track: Track) -> ClickModel:
    # The topic chain is stationary at the user's mixture, so a user's events hit the top
    # topic with probability max(weights). Solve for the base rate that makes the expected
    # click share equal cfg.click_rate.
    top_share = population.slot_weight.max(axis=1).astype(np.float64)
    match = float(np.average(top_share, weights=population.length))
    p_other = cfg.click_rate / (1.0 + match * (TOP_INTEREST_CLICK_LIFT - 1.0))
    p_top = min(MAX_CLICK_PROBABILITY, TOP_INTEREST_CLICK_LIFT * p_other)
    return ClickModel(p_top, p_other, cfg.conversion_rate if track.weighted else 0.0)


# --- Events ----------------------------------------------------------------------------------
@dataclass
class _EventBlock:
    first_user: int  # index of the block's first user
    offsets: np.ndarray  # int64[n_users + 1], block-relative
    item: np.ndarray  # int64 item re-ids
    action: np.ndarray  # int64
    timestamp: np.ndarray  # int64 Unix seconds
    target_item: np.ndarray  # int64[n_users] holdout target re-id, 0 when none
    forced_clicks: int

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1


def _generate_event_block(
    index: int,
    lo: int,
    hi: int,
    catalogue: _Catalogue,
    population: _Population,
    clicks: ClickModel,
    track: Track,
    seed: int,
) -> _EventBlock:
    rng = _rng(seed, _Stream.EVENTS, index)
    lengths = population.length[lo:hi]
    offsets = np.zeros(hi - lo + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    starts = offsets[:-1]
    n = int(offsets[-1])
    owner_local = np.repeat(np.arange(hi - lo), lengths)
    owner = owner_local + lo

    # Topic chain: a fresh draw from the mixture, or (sticky) the previous event's topic. The
    # topic of a sticky event is that of the last fresh event before it: a forward fill.
    sticky = rng.random(n) < STICKINESS
    sticky[starts] = False
    slot = (rng.random(n)[:, None] > population.slot_cumweight[owner, :-1]).sum(axis=1)
    fresh_topic = population.slot_topic[owner, slot]
    source = np.where(sticky, 0, np.arange(n))
    np.maximum.accumulate(source, out=source)
    topic = fresh_topic[source]

    # Item inside the topic by popularity: inverse CDF of F(x) = ln(1 + x) / ln(1 + n).
    size = catalogue.topic_size[topic]
    rank = np.floor(np.expm1(rng.random(n) * np.log1p(size))).astype(np.int64)
    np.minimum(rank, size - 1, out=rank)
    item = catalogue.topic_items[catalogue.topic_start[topic] + rank] + 1

    p_click = np.where(topic == population.top_topic[owner], clicks.p_click_top_interest, clicks.p_click_other)
    draw = rng.random(n)
    click = draw < p_click
    forced = _force_one_click(click, draw / p_click, owner_local, starts)
    action = np.where(click, CLICK, EXPOSURE).astype(np.int64)
    if track.weighted:
        converts = rng.random(n) < clicks.conversion_share
        action[click & converts] = CONVERSION

    timestamp = _timestamps(rng, offsets, owner_local)
    target_item = _holdout_targets(item, action, starts, track)
    return _EventBlock(lo, offsets, item, action, timestamp, target_item, forced)


def _force_one_click(click: np.ndarray, score: np.ndarray, owner: np.ndarray, starts: np.ndarray) -> int:
    """Give every user at least one click (a holdout target): for a user without one, the
    event closest to being clicked (lowest draw / p_click) becomes a click. That event is
    picked roughly in proportion to p_click, the same tilt as a real click, so the forced
    target follows the click model closely. Rare at realistic lengths (0.9**90); common
    only for short histories."""
    has_click = np.maximum.reduceat(click, starts)
    if has_click.all():
        return 0
    events = np.flatnonzero(~has_click[owner])
    events = events[np.lexsort((score[events], owner[events]))]
    first = np.ones(len(events), dtype=bool)
    first[1:] = owner[events[1:]] != owner[events[:-1]]
    click[events[first]] = True
    return int((~has_click).sum())


def _timestamps(rng: np.random.Generator, offsets: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Chronological per user, ending near LAST_EVENT_LATEST; log-normal gaps of >= 1 s."""
    n = int(offsets[-1])
    gaps = np.exp(GAP_LOG_MEDIAN + GAP_LOG_SIGMA * rng.standard_normal(n))
    gaps = np.clip(gaps, 1, MAX_GAP_SECONDS).astype(np.int64)
    gaps[offsets[:-1]] = 0
    elapsed = np.cumsum(gaps)
    end = LAST_EVENT_LATEST - rng.integers(0, LAST_EVENT_SPREAD, size=len(offsets) - 1)
    last = offsets[1:] - 1
    return end[owner] - (elapsed[last][owner] - elapsed)


def _holdout_targets(item: np.ndarray, action: np.ndarray, starts: np.ndarray, track: Track) -> np.ndarray:
    """Per user the last event of the first target type present (tracks.target_priority)."""
    position = np.arange(len(item))
    target = np.full(len(starts), -1, dtype=np.int64)
    for action_type in track.target_priority:
        last = np.maximum.reduceat(np.where(action == action_type, position, -1), starts)
        target = np.where(target < 0, last, target)
    return np.where(target >= 0, item[np.maximum(target, 0)], 0)


@dataclass
class _EventTally:
    """Counts and targets gathered while the event blocks stream past the writers."""

    target_item: np.ndarray
    events: int = 0
    clicks: int = 0
    conversions: int = 0
    forced_clicks: int = 0

    def add(self, block: _EventBlock) -> None:
        self.events += len(block.item)
        self.clicks += int((block.action == CLICK).sum())
        self.conversions += int((block.action == CONVERSION).sum())
        self.forced_clicks += block.forced_clicks
        self.target_item[block.first_user : block.first_user + block.num_users] = block.target_item


def _event_blocks(
    catalogue: _Catalogue, population: _Population, clicks: ClickModel, track: Track, seed: int, tally: _EventTally
) -> Iterator[_EventBlock]:
    for index, lo in enumerate(range(0, population.num_users, USERS_PER_BLOCK)):
        hi = min(population.num_users, lo + USERS_PER_BLOCK)
        block = _generate_event_block(index, lo, hi, catalogue, population, clicks, track, seed)
        tally.add(block)
        yield block


# --- Candidate pool --------------------------------------------------------------------------
def _candidate_pool(catalogue: _Catalogue, target_item: np.ndarray, cfg: SyntheticSettings) -> np.ndarray:
    """Item indices in retrieval order: all holdout targets, extra warm items, all cold items."""
    rng = _rng(cfg.seed, _Stream.POOL)
    num_warm = catalogue.num_warm
    targets = np.unique(target_item[target_item > 0]) - 1
    wanted = cfg.candidate_pool_size
    if wanted is None:
        wanted = min(num_warm, max(2 * len(targets), int(0.3 * num_warm)))
    warm_size = min(num_warm, max(len(targets), wanted))
    is_target = np.zeros(num_warm, dtype=bool)
    is_target[targets] = True
    extra = rng.choice(np.flatnonzero(~is_target), size=warm_size - len(targets), replace=False)
    members = np.concatenate([targets, np.sort(extra), np.arange(num_warm, catalogue.total)])
    return members[rng.permutation(len(members))]


# --- Embeddings ------------------------------------------------------------------------------
def embedding_dims(families: Sequence[int], cfg: SyntheticSettings, track: str = "1M") -> dict[int, int]:
    """Dimension written per family: the real one (84 is 32-d on 10M), capped by the setting."""
    dims: dict[int, int] = {}
    for family in families:
        family = int(family)
        if family not in formats.EMBEDDING_FAMILY_DIMS:
            raise ValueError(f"unknown embedding family {family}; known: {sorted(formats.EMBEDDING_FAMILY_DIMS)}")
        real = 32 if (track == "10M" and family == 84) else formats.EMBEDDING_FAMILY_DIMS[family]
        dims[family] = real if cfg.max_embedding_dim is None else min(real, cfg.max_embedding_dim)
    return dims


def _embedding_blocks(
    catalogue: _Catalogue, family: int, dim: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(item indices, float32 unit vectors): topic centroid + noise, partial coverage of warm
    items, every cold item covered (a model needs something to place them by)."""
    centroids = _rng(seed, _Stream.EMBEDDINGS, family).standard_normal((catalogue.num_topics, dim))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    coverage = EMBEDDING_COVERAGE.get(family, DEFAULT_EMBEDDING_COVERAGE)
    rows = int(np.clip(EMBEDDING_VALUES_PER_BLOCK // dim, 1_024, 262_144))
    for index, lo in enumerate(range(0, catalogue.total, rows)):
        hi = min(catalogue.total, lo + rows)
        rng = _rng(seed, _Stream.EMBEDDINGS, family, index + 1)
        items = np.arange(lo, hi)
        items = items[(rng.random(hi - lo) < coverage) | (items >= catalogue.num_warm)]
        noise = rng.standard_normal((len(items), dim), dtype=np.float32)
        vectors = centroids[catalogue.topic[items]].astype(np.float32)
        vectors += noise * np.float32(EMBEDDING_NOISE / math.sqrt(dim))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        yield items, vectors


# --- Indexer ---------------------------------------------------------------------------------
def _build_indexer(catalogue: _Catalogue, population: _Population, seed: int) -> dict[str, Any]:
    items = catalogue.creative_id[: catalogue.num_warm].tolist()
    vocab: collections.defaultdict[str, dict[int, int]] = collections.defaultdict(dict)
    for spec in ITEM_FEATURE_SPECS:
        size = catalogue.features[spec.feature_id].vocab
        # Leave room in the raw code space for the cold items' new values.
        upper = size + catalogue.num_cold
        raw = feature_raw_values(spec.feature_id, np.arange(1, size + 1), upper, seed)
        vocab[spec.feature_id] = dict(zip(raw.tolist(), range(1, size + 1)))
    for spec in USER_FEATURE_SPECS:
        raw = feature_raw_values(spec.feature_id, np.arange(1, spec.vocab + 1), spec.vocab, seed)
        vocab[spec.feature_id] = dict(zip(raw.tolist(), range(1, spec.vocab + 1)))
    return {
        "u": dict(zip(raw_user_ids(population.num_users, seed), range(1, population.num_users + 1))),
        "i": dict(zip(items, range(1, catalogue.num_warm + 1))),
        "f": vocab,
    }


def _write_indexer(path: Path, catalogue: _Catalogue, population: _Population, seed: int) -> None:
    indexer = _build_indexer(catalogue, population, seed)
    with open(path, "wb") as handle:
        pickle.dump(indexer, handle, protocol=4)


# --- Arrow helpers ---------------------------------------------------------------------------
def _masked_int64(values: np.ndarray, present: np.ndarray) -> pa.Array:
    return pa.array(values.astype(np.int64, copy=False), type=pa.int64(), mask=~present)


def _int_list(offsets: np.ndarray, values: np.ndarray, present: np.ndarray | None = None) -> pa.Array:
    mask = None if present is None else pa.array(~present)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=pa.int64()), mask=mask)


def _write_parquet_blocks(path: Path, tables: Iterator[pa.Table], **options: Any) -> None:
    """One row group per table; ``options`` go to pq.ParquetWriter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer: pq.ParquetWriter | None = None
    try:
        for table in tables:
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema, **options)
            writer.write_table(table, row_group_size=max(1, table.num_rows))
    finally:
        if writer is not None:
            writer.close()


def _text(value: str) -> pa.Scalar:
    return pa.scalar(value, _LARGE_STRING)


def _concat(*parts: pa.Array | pa.Scalar) -> pa.Array:
    return pc.binary_join_element_wise(*parts, _text(""))


def _int_text(values: np.ndarray, present: np.ndarray | None = None) -> pa.Array:
    mask = None if present is None else ~present
    return pc.cast(pa.array(values, type=pa.int64(), mask=mask), _LARGE_STRING)


def _json_object(pieces: list[pa.Array]) -> pa.Array:
    """'{' + the non-null '"key": value' pieces joined by ', ' + '}'. Joined as 32-bit strings:
    pyarrow drops all-null rows when it skips nulls over large strings."""
    small = [pc.cast(p, pa.string()) for p in pieces]
    body = pc.binary_join_element_wise(*small, ", ", null_handling="skip")
    return _concat(_text("{"), pc.cast(body, _LARGE_STRING), _text("}"))


def _join_lines(lines: pa.Array, separator: str) -> pa.Buffer:
    whole = pa.LargeListArray.from_arrays(pa.array([0, len(lines)], type=pa.int64()), lines)
    return pc.binary_join(whole, _text(separator))[0].as_buffer()


# --- Hub parquet layout ----------------------------------------------------------------------
def _hub_seq_table(block: _EventBlock) -> pa.Table:
    events = pa.StructArray.from_arrays(
        [pa.array(block.item), pa.array(block.action), pa.array(block.timestamp)],
        fields=list(formats.HUB_SEQ_EVENT),
    )
    seq = pa.ListArray.from_arrays(pa.array(block.offsets.astype(np.int32)), events)
    user_id = np.arange(block.first_user + 1, block.first_user + block.num_users + 1, dtype=np.int64)
    return pa.table({"user_id": pa.array(user_id), "seq": seq})


def _hub_user_tables(population: _Population) -> Iterator[pa.Table]:
    for lo in range(0, population.num_users, USERS_PER_BLOCK * 4):
        hi = min(population.num_users, lo + USERS_PER_BLOCK * 4)
        columns: dict[str, pa.Array] = {"user_id": pa.array(np.arange(lo + 1, hi + 1, dtype=np.int64))}
        for spec in USER_FEATURE_SPECS:
            feat = population.features[spec.feature_id]
            if feat.offsets is None:
                columns[spec.feature_id] = _masked_int64(feat.values[lo:hi], feat.present[lo:hi])
            else:
                start, stop = feat.offsets[lo], feat.offsets[hi]
                columns[spec.feature_id] = _int_list(
                    feat.offsets[lo : hi + 1] - start, feat.values[start:stop], feat.present[lo:hi]
                )
        yield pa.table(columns)


def _hub_item_tables(catalogue: _Catalogue) -> Iterator[pa.Table]:
    for lo in range(0, catalogue.num_warm, ITEMS_PER_BLOCK):
        hi = min(catalogue.num_warm, lo + ITEMS_PER_BLOCK)
        columns: dict[str, pa.Array] = {"item_id": pa.array(np.arange(lo + 1, hi + 1, dtype=np.int64))}
        for fid in HUB_ITEM_FEATURES:
            feat = catalogue.features[fid]
            columns[fid] = _masked_int64(feat.values[lo:hi], feat.present[lo:hi])
        yield pa.table(columns)


def _hub_candidate_table(catalogue: _Catalogue, pool: np.ndarray) -> pa.Table:
    columns: dict[str, pa.Array] = {
        "item_id": pa.array(catalogue.creative_id[pool]),
        "retrieval_id": pa.array(np.arange(1, len(pool) + 1, dtype=np.int64)),
    }
    fields = list(formats.CANDIDATE_FEATURE_STRUCT)
    for fid in HUB_ITEM_FEATURES:
        feat = catalogue.features[fid]
        values, known = feat.values[pool], feat.known()[pool]
        columns[fid] = pa.StructArray.from_arrays(
            [pa.array(np.where(known, values, 0)), pa.array(~known)],
            fields=fields,
            mask=pa.array(~feat.present[pool]),
        )
    return pa.table(columns)


def _hub_embedding_tables(catalogue: _Catalogue, family: int, dim: int, seed: int) -> Iterator[pa.Table]:
    for items, vectors in _embedding_blocks(catalogue, family, dim, seed):
        offsets = np.arange(0, len(items) * dim + 1, dim, dtype=np.int32)
        emb = pa.ListArray.from_arrays(pa.array(offsets), pa.array(vectors.ravel()))
        # The real release stores the raw creative id of mm_emb as a string of digits.
        cids = pa.array(catalogue.creative_id[items]).cast(pa.string())
        yield pa.table({"anonymous_cid": cids, "emb": emb})


def _write_hub_layout(
    out_dir: Path, blocks: Iterator[_EventBlock], catalogue: _Catalogue, population: _Population,
    tally: _EventTally, cfg: SyntheticSettings, dims: dict[int, int],
) -> np.ndarray:
    _write_parquet_blocks(
        out_dir / "seq" / "part-00000.parquet", (_hub_seq_table(b) for b in blocks), **SEQ_PARQUET_OPTIONS
    )
    _write_parquet_blocks(out_dir / "user_feat" / "part-00000.parquet", _hub_user_tables(population))
    _write_parquet_blocks(out_dir / "item_feat" / "part-00000.parquet", _hub_item_tables(catalogue))
    pool = _candidate_pool(catalogue, tally.target_item, cfg)
    candidate_path = out_dir / "candidate" / "part-00000.parquet"
    candidate_path.parent.mkdir(parents=True)
    pq.write_table(_hub_candidate_table(catalogue, pool), candidate_path)
    for family, dim in dims.items():
        path = out_dir / "mm_emb" / f"emb_{family}_{dim}_parquet" / "part-00000.parquet"
        _write_parquet_blocks(path, _hub_embedding_tables(catalogue, family, dim, cfg.seed))
    return pool


# --- Competition JSONL layout ----------------------------------------------------------------
def _item_feature_json(catalogue: _Catalogue, items: np.ndarray, zero_unknown: bool) -> pa.Array:
    """'{"100": 6, ...}' per item, all item features incl. 111, missing ones left out."""
    pieces = []
    for spec in ITEM_FEATURE_SPECS:
        feat = catalogue.features[spec.feature_id]
        values = feat.values[items]
        if zero_unknown:
            values = np.where(feat.known()[items], values, 0)
        pieces.append(_concat(_text(f'"{spec.feature_id}": '), _int_text(values, feat.present[items])))
    return _json_object(pieces)


def _user_profile_records(population: _Population, seed: int) -> pa.Array:
    """'[uid, null, {...}, null, null, ts]' per user: the profile record closing each line."""
    pieces = []
    for spec in USER_FEATURE_SPECS:
        feat = population.features[spec.feature_id]
        if feat.offsets is None:
            text = _int_text(feat.values, feat.present)
        else:
            as_text = pc.cast(_int_list(feat.offsets, feat.values, feat.present), pa.large_list(_LARGE_STRING))
            text = _concat(_text("["), pc.binary_join(as_text, _text(", ")), _text("]"))
        pieces.append(_concat(_text(f'"{spec.feature_id}": '), text))
    profile = _json_object(pieces)
    num_users = population.num_users
    when = PROFILE_SNAPSHOT + _rng(seed, _Stream.PROFILE_TIME).integers(0, PROFILE_SPREAD, size=num_users)
    uid = _int_text(np.arange(1, num_users + 1))
    return _concat(_text("["), uid, _text(", null, "), profile, _text(", null, null, "), _int_text(when), _text("]"))


def _jsonl_seq_lines(block: _EventBlock, item_json: pa.Array, profiles: pa.Array) -> pa.Array:
    owner = np.repeat(np.arange(block.num_users), np.diff(block.offsets)) + block.first_user + 1
    records = _concat(
        _text("["), _int_text(owner), _text(", "), _int_text(block.item), _text(", null, "),
        item_json.take(pa.array(block.item - 1)), _text(", "), _int_text(block.action), _text(", "),
        _int_text(block.timestamp), _text("]"),
    )
    per_user = pc.binary_join(pa.LargeListArray.from_arrays(pa.array(block.offsets), records), _text(", "))
    profile = profiles.slice(block.first_user, block.num_users)
    return _concat(_text("["), per_user, _text(", "), profile, _text("]"))


def _write_jsonl_lines(path: Path, chunks: Iterator[pa.Array]) -> None:
    """One record per line, no trailing newline after the last (as in the real files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        first = True
        for lines in chunks:
            if len(lines) == 0:
                continue
            if not first:
                handle.write(b"\n")
            handle.write(_join_lines(lines, "\n"))
            first = False


def _jsonl_predict_lines(catalogue: _Catalogue, pool: np.ndarray) -> Iterator[pa.Array]:
    for lo in range(0, len(pool), ITEMS_PER_BLOCK):
        members = pool[lo : lo + ITEMS_PER_BLOCK]
        yield _concat(
            _text('{"creative_id": '), _int_text(catalogue.creative_id[members]),
            _text(', "retrieval_id": '), _int_text(np.arange(lo + 1, lo + len(members) + 1)),
            _text(', "features": '), _item_feature_json(catalogue, members, zero_unknown=True), _text("}"),
        )


def _jsonl_embedding_lines(catalogue: _Catalogue, family: int, dim: int, seed: int) -> Iterator[pa.Array]:
    for items, vectors in _embedding_blocks(catalogue, family, dim, seed):
        # json.dumps writes floats as Python reprs, like the real files; per row is fine at
        # the scale this layout is meant for.
        rows = [
            f'{{"anonymous_cid": {cid}, "emb": {json.dumps(vec)}}}'
            for cid, vec in zip(catalogue.creative_id[items].tolist(), vectors.astype(np.float64).tolist())
        ]
        yield pa.array(rows, type=_LARGE_STRING)


def _write_jsonl_layout(
    out_dir: Path, blocks: Iterator[_EventBlock], catalogue: _Catalogue, population: _Population,
    tally: _EventTally, cfg: SyntheticSettings, dims: dict[int, int],
) -> np.ndarray:
    item_json = _item_feature_json(catalogue, np.arange(catalogue.num_warm), zero_unknown=False)
    profiles = _user_profile_records(population, cfg.seed)
    _write_jsonl_lines(out_dir / "seq.jsonl", (_jsonl_seq_lines(b, item_json, profiles) for b in blocks))
    del item_json, profiles
    pool = _candidate_pool(catalogue, tally.target_item, cfg)
    _write_jsonl_lines(out_dir / "predict_set.jsonl", _jsonl_predict_lines(catalogue, pool))
    for family, dim in dims.items():
        # The real folder holds part-0000 (see fixtures/tencentgr_demo/creative_emb/).
        path = out_dir / "creative_emb" / f"emb_{family}_{dim}" / "part-0000"
        _write_jsonl_lines(path, _jsonl_embedding_lines(catalogue, family, dim, cfg.seed))
    return pool


# --- Ground truth ----------------------------------------------------------------------------
def _write_ground_truth(
    folder: Path, catalogue: _Catalogue, population: _Population, clicks: ClickModel,
    cfg: SyntheticSettings, track: str, dims: dict[int, int],
) -> None:
    folder.mkdir()
    warm = catalogue.num_warm
    item_id = np.concatenate([np.arange(1, warm + 1), np.zeros(catalogue.num_cold, dtype=np.int64)])
    items = pa.table({
        "item_id": pa.array(item_id, type=pa.int64(), mask=np.arange(catalogue.total) >= warm),
        "creative_id": pa.array(catalogue.creative_id),
        "topic": pa.array(catalogue.topic.astype(np.int32)),
        "popularity": pa.array(catalogue.popularity),  # P(item | topic); 0 for cold items
        "is_cold": pa.array(np.arange(catalogue.total) >= warm),
    })
    pq.write_table(items, folder / "items.parquet")

    def user_tables() -> Iterator[pa.Table]:
        k = catalogue.num_topics
        for lo in range(0, population.num_users, USERS_PER_BLOCK * 4):
            hi = min(population.num_users, lo + USERS_PER_BLOCK * 4)
            dense = population.dense_interest(lo, hi, k)
            offsets = np.arange(0, (hi - lo) * k + 1, k, dtype=np.int32)
            yield pa.table({
                "user_id": pa.array(np.arange(lo + 1, hi + 1, dtype=np.int64)),
                "interest": pa.ListArray.from_arrays(pa.array(offsets), pa.array(dense.ravel())),
                "top_topic": pa.array(population.top_topic[lo:hi].astype(np.int32)),
                "history_length": pa.array(population.length[lo:hi]),
            })

    _write_parquet_blocks(folder / "users.parquet", user_tables())
    model = {
        "format_version": FORMAT_VERSION,
        "generator": __name__,
        "track": track,
        "seed": cfg.seed,
        "format": cfg.format,
        "num_topics": cfg.num_topics,
        "num_users": population.num_users,
        "num_items": catalogue.num_warm,
        "num_cold_items": catalogue.num_cold,
        "stickiness": STICKINESS,
        "popularity": "P(rank r | topic of n items) = ln((r + 2) / (r + 1)) / ln(n + 1)",
        "next_topic": "stickiness * [previous item's topic] + (1 - stickiness) * user interest; "
        "the first event uses the interest only",
        "interest": {"slots": INTEREST_SLOTS, "dirichlet_alpha": INTEREST_DIRICHLET_ALPHA},
        "click_model": clicks.to_json(),
        "history": {"min": MIN_HISTORY, "max": MAX_HISTORY, "mean_requested": cfg.mean_history},
        "embeddings": {str(f): {"dim": d, "coverage": EMBEDDING_COVERAGE.get(f, DEFAULT_EMBEDDING_COVERAGE),
                                 "noise": EMBEDDING_NOISE} for f, d in dims.items()},
        "settings": cfg.model_dump(),
    }
    (folder / "model.json").write_text(json.dumps(model, indent=2, sort_keys=True) + "\n")


@dataclass
class GroundTruth:
    """The generative model of a synthetic dataset, indexed by re-ids (row 0 = padding)."""

    track: str
    seed: int
    num_topics: int
    stickiness: float
    clicks: ClickModel
    item_topic: np.ndarray  # int64[N + 1]; -1 at 0
    item_popularity: np.ndarray  # float64[N + 1]: P(item | its topic); 0 at 0
    user_interest: np.ndarray  # float64[U + 1, K]
    user_top_topic: np.ndarray  # int64[U + 1]
    cold_creative_ids: np.ndarray
    cold_topics: np.ndarray
    model: dict[str, Any]

    @property
    def num_items(self) -> int:
        return len(self.item_topic) - 1

    @property
    def num_users(self) -> int:
        return len(self.user_top_topic) - 1

    def topic_weights(self, user_ids: np.ndarray, prev_item_ids: np.ndarray, given_click: bool = True) -> np.ndarray:
        """(users x topics): unnormalized P(next item's topic), times the click factor.

        ``prev_item_ids`` 0 means "no previous event": the first event draws from the interest
        mixture only.
        """
        users = np.asarray(user_ids, dtype=np.int64)
        prev = np.asarray(prev_item_ids, dtype=np.int64)
        if users.shape != prev.shape or users.ndim != 1:
            raise ValueError("user_ids and prev_item_ids must be 1-d arrays of the same length")
        if users.size and (users.min() < 1 or users.max() > self.num_users):
            raise ValueError(f"user ids must lie in 1..{self.num_users}")
        if prev.size and (prev.min() < 0 or prev.max() > self.num_items):
            raise ValueError(f"previous item ids must lie in 0..{self.num_items}")
        mix = self.user_interest[users]
        has_prev = prev > 0
        weights = np.where(has_prev[:, None], (1.0 - self.stickiness) * mix, mix)
        rows = np.flatnonzero(has_prev)
        weights[rows, self.item_topic[prev[rows]]] += self.stickiness
        if given_click:
            factor = np.full_like(weights, self.clicks.p_click_other)
            factor[np.arange(len(users)), self.user_top_topic[users]] = self.clicks.p_click_top_interest
            weights *= factor
        return weights

    def _item_terms(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        items = np.asarray(item_ids, dtype=np.int64)
        valid = (items >= 1) & (items <= self.num_items)  # cold/unknown items: probability 0
        safe = np.where(valid, items, 0)
        return np.maximum(self.item_topic[safe], 0), np.where(valid, self.item_popularity[safe], 0.0)

    def next_item_probs(
        self, user_ids: np.ndarray, prev_item_ids: np.ndarray, item_ids: np.ndarray, *, given_click: bool = True
    ) -> np.ndarray:
        """(users x items) true probability that the user's next event is each item,
        restricted to ``item_ids`` and renormalized (rows sum to 1; a row with no mass in the
        set is uniform). ``given_click`` (default) conditions on the event being a click or
        conversion, the target type; False gives the plain next-event probability. Ids that
        are not warm items (0, cold) get probability 0."""
        topic, popularity = self._item_terms(item_ids)
        probs = np.take(self.topic_weights(user_ids, prev_item_ids, given_click), topic, axis=1) * popularity
        empty = probs.sum(axis=1) <= 0
        if empty.any():
            real = popularity > 0
            probs[np.ix_(empty, real if real.any() else np.ones_like(real))] = 1.0
        return probs / probs.sum(axis=1, keepdims=True)

    def oracle_topk(
        self, user_ids: np.ndarray, prev_item_ids: np.ndarray, candidate_item_ids: np.ndarray,
        k: int = 10, *, given_click: bool = True, max_cells: int = 1 << 24,
    ) -> np.ndarray:
        """(users x k) candidate item ids by true next-item probability, best first. Works
        in user chunks of at most ``max_cells`` scores."""
        candidates = np.asarray(candidate_item_ids, dtype=np.int64)
        users = np.asarray(user_ids, dtype=np.int64)
        prev = np.asarray(prev_item_ids, dtype=np.int64)
        k = min(k, len(candidates))
        topic, popularity = self._item_terms(candidates)
        out = np.zeros((len(users), k), dtype=np.int64)
        step = max(1, max_cells // max(1, len(candidates)))
        for lo in range(0, len(users), step):
            weights = self.topic_weights(users[lo : lo + step], prev[lo : lo + step], given_click)
            scores = np.take(weights, topic, axis=1)
            scores *= popularity
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
            out[lo : lo + step] = candidates[np.take_along_axis(top, order, axis=1)]
        return out


def load_ground_truth(path: str | Path) -> GroundTruth:
    """Read ``ground_truth/`` (pass the dataset folder or the ground_truth folder itself)."""
    folder = Path(path)
    if (folder / GROUND_TRUTH_DIR).is_dir():
        folder = folder / GROUND_TRUTH_DIR
    model = json.loads((folder / "model.json").read_text())
    if model.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder}: ground truth format {model.get('format_version')}, expected {FORMAT_VERSION}")
    num_topics = int(model["num_topics"])

    items = pq.read_table(folder / "items.parquet")
    cold = items.column("is_cold").to_numpy()
    topic = items.column("topic").to_numpy().astype(np.int64)
    popularity = items.column("popularity").to_numpy()
    item_topic = np.concatenate([[-1], topic[~cold]])
    item_popularity = np.concatenate([[0.0], popularity[~cold]])

    users = pq.read_table(folder / "users.parquet")
    interest = users.column("interest").combine_chunks().flatten().to_numpy().astype(np.float64)
    interest = interest.reshape(users.num_rows, num_topics)
    top = users.column("top_topic").to_numpy().astype(np.int64)
    click = model["click_model"]
    return GroundTruth(
        track=model["track"],
        seed=int(model["seed"]),
        num_topics=num_topics,
        stickiness=float(model["stickiness"]),
        clicks=ClickModel(
            float(click["p_click_top_interest"]),
            float(click["p_click_other"]),
            float(click["conversion_share_of_clicks"]),
        ),
        item_topic=item_topic,
        item_popularity=item_popularity,
        user_interest=np.vstack([np.zeros((1, num_topics)), interest]),
        user_top_topic=np.concatenate([[0], top]),
        cold_creative_ids=items.column("creative_id").to_numpy()[cold],
        cold_topics=topic[cold],
        model=model,
    )


# --- Entry point -----------------------------------------------------------------------------
def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def generate_dataset(
    out_dir: Path, track: str, cfg: SyntheticSettings, families: Sequence[int]
) -> SyntheticSummary:
    """Write a synthetic dataset in ``cfg.format`` into ``out_dir`` (an existing empty folder;
    the caller makes the write atomic) and return what was written."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty: the generator writes into an empty folder")
    rules = get_track(track)
    dims = embedding_dims(families, cfg, track)

    catalogue = _build_catalogue(cfg)
    population = _build_population(cfg)
    clicks = _click_model(cfg, population, rules)
    tally = _EventTally(target_item=np.zeros(population.num_users, dtype=np.int64))
    blocks = _event_blocks(catalogue, population, clicks, rules, cfg.seed, tally)
    if cfg.format == formats.HUB_FORMAT:
        pool = _write_hub_layout(out_dir, blocks, catalogue, population, tally, cfg, dims)
    elif cfg.format == formats.JSONL_FORMAT:
        pool = _write_jsonl_layout(out_dir, blocks, catalogue, population, tally, cfg, dims)
    else:
        raise ValueError(f"unknown synthetic format {cfg.format!r}")
    _write_indexer(out_dir / "indexer.pkl", catalogue, population, cfg.seed)
    _write_ground_truth(out_dir / GROUND_TRUTH_DIR, catalogue, population, clicks, cfg, track, dims)

    return SyntheticSummary(
        track=track,
        format=cfg.format,
        users=population.num_users,
        items=catalogue.num_warm,
        cold_items=catalogue.num_cold,
        events=tally.events,
        clicks=tally.clicks,
        conversions=tally.conversions,
        candidates=len(pool),
        families=dims,
        bytes_written=_folder_bytes(out_dir),
        seconds=time.perf_counter() - started,
        users_with_target=int((tally.target_item > 0).sum()),
        forced_clicks=tally.forced_clicks,
    )


__all__ = [
    "ClickModel",
    "GroundTruth",
    "SyntheticSummary",
    "embedding_dims",
    "generate_dataset",
    "load_ground_truth",
]
