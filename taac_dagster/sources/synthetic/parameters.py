"""The generator's fixed choices: the generative process's parameters, the shapes of raw ids,
the block sizes that fix the random streams, and the feature specifications."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

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


class Stream:
    """Ids of the independent random streams (one per concern, blocks add an index)."""

    ITEMS = 1
    ITEM_FEATURES = 2
    USERS = 3
    USER_FEATURES = 4
    EVENTS = 5
    EMBEDDINGS = 6
    POOL = 7
    PROFILE_TIME = 8


def random_stream(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed % (1 << 63), *stream]))


# --- Feature specifications ------------------------------------------------------------------
@dataclass(frozen=True)
class ItemFeatureSpec:
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
ITEM_FEATURE_SPECS: tuple[ItemFeatureSpec, ...] = (
    ItemFeatureSpec("100", "topic", vocab=6, missing_rate=0.0005, missing_group="base"),
    ItemFeatureSpec("101", "topic", vocab=44, topic_fidelity=0.8, missing_rate=0.0005, missing_group="base"),
    ItemFeatureSpec("102", "advertiser", items_per_value=5, missing_rate=0.008, cold_new_rate=0.3),
    ItemFeatureSpec("111", "item", cold_new_rate=1.0),
    ItemFeatureSpec("112", "topic", vocab=25, topic_fidelity=0.9, missing_rate=0.012, missing_group="meta"),
    ItemFeatureSpec("114", "random", vocab=17, missing_rate=0.0005, missing_group="base"),
    ItemFeatureSpec("115", "random", vocab=187, missing_rate=0.77),
    ItemFeatureSpec("116", "random", vocab=18, missing_rate=0.0005, missing_group="base"),
    ItemFeatureSpec("117", "random", vocab=285, missing_rate=0.012, missing_group="meta"),
    ItemFeatureSpec("118", "random", vocab=745, missing_rate=0.012, missing_group="meta"),
    ItemFeatureSpec("119", "random", vocab=1745, missing_rate=0.012, missing_group="meta"),
    ItemFeatureSpec("120", "random", vocab=1343, missing_rate=0.012, missing_group="meta"),
    ItemFeatureSpec("121", "random", items_per_value=1.25, cold_new_rate=0.5),
    ItemFeatureSpec("122", "random", items_per_value=5, missing_rate=0.0005, missing_group="base", cold_new_rate=0.3),
)
# The Hub release has no 111 column (it behaves like an item id).
HUB_ITEM_FEATURES: tuple[str, ...] = tuple(s.feature_id for s in ITEM_FEATURE_SPECS if s.feature_id != "111")


@dataclass(frozen=True)
class UserFeatureSpec:
    feature_id: str
    vocab: int
    max_values: int = 0  # 0: a scalar feature; else a list of 1..max_values distinct values
    missing_rate: float = 0.0
    interest_linked: float = 0.0  # share of users whose value follows their top topic


USER_FEATURE_SPECS: tuple[UserFeatureSpec, ...] = (
    UserFeatureSpec("103", 67, interest_linked=0.5),
    UserFeatureSpec("104", 2),
    UserFeatureSpec("105", 7, missing_rate=0.16),
    UserFeatureSpec("109", 3),
    UserFeatureSpec("106", 13, max_values=4, missing_rate=0.10),
    UserFeatureSpec("107", 17, max_values=2, missing_rate=0.66),
    UserFeatureSpec("108", 4, max_values=1, missing_rate=0.80),
    UserFeatureSpec("110", 2, max_values=2, missing_rate=0.62),
)
