"""The click model, the event sequences (generated in blocks of users), the holdout targets
they end in, and the candidate pool built around those targets."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from taac_dagster.settings import SyntheticSettings
from taac_dagster.sources.synthetic.catalogue import Catalogue
from taac_dagster.sources.synthetic.parameters import (
    GAP_LOG_MEDIAN,
    GAP_LOG_SIGMA,
    LAST_EVENT_LATEST,
    LAST_EVENT_SPREAD,
    MAX_CLICK_PROBABILITY,
    MAX_GAP_SECONDS,
    STICKINESS,
    TOP_INTEREST_CLICK_LIFT,
    USERS_PER_BLOCK,
    Stream,
    random_stream,
)
from taac_dagster.sources.synthetic.users import Population
from taac_dagster.tracks import CLICK, CONVERSION, EXPOSURE, Track


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


def click_model(cfg: SyntheticSettings, population: Population, track: Track) -> ClickModel:
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
class EventBlock:
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
    catalogue: Catalogue,
    population: Population,
    clicks: ClickModel,
    track: Track,
    seed: int,
) -> EventBlock:
    rng = random_stream(seed, Stream.EVENTS, index)
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
    return EventBlock(lo, offsets, item, action, timestamp, target_item, forced)


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
class EventTally:
    """Counts and targets gathered while the event blocks stream past the writers."""

    target_item: np.ndarray
    events: int = 0
    clicks: int = 0
    conversions: int = 0
    forced_clicks: int = 0

    def add(self, block: EventBlock) -> None:
        self.events += len(block.item)
        self.clicks += int((block.action == CLICK).sum())
        self.conversions += int((block.action == CONVERSION).sum())
        self.forced_clicks += block.forced_clicks
        self.target_item[block.first_user : block.first_user + block.num_users] = block.target_item


def event_blocks(
    catalogue: Catalogue, population: Population, clicks: ClickModel, track: Track, seed: int, tally: EventTally
) -> Iterator[EventBlock]:
    for index, lo in enumerate(range(0, population.num_users, USERS_PER_BLOCK)):
        hi = min(population.num_users, lo + USERS_PER_BLOCK)
        block = _generate_event_block(index, lo, hi, catalogue, population, clicks, track, seed)
        tally.add(block)
        yield block


# --- Candidate pool --------------------------------------------------------------------------
def candidate_pool(catalogue: Catalogue, target_item: np.ndarray, cfg: SyntheticSettings) -> np.ndarray:
    """Item indices in retrieval order: all holdout targets, extra warm items, all cold items."""
    rng = random_stream(cfg.seed, Stream.POOL)
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
