"""The items: topics, popularity inside a topic, sparse features, and the embedding vectors
of each family (a topic centroid plus noise)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from taac_dagster import formats
from taac_dagster.settings import SyntheticSettings
from taac_dagster.sources.synthetic.parameters import (
    DEFAULT_EMBEDDING_COVERAGE,
    EMBEDDING_COVERAGE,
    EMBEDDING_NOISE,
    EMBEDDING_VALUES_PER_BLOCK,
    ITEM_FEATURE_SPECS,
    TOPIC_SIZE_CONCENTRATION,
    ItemFeatureSpec,
    Stream,
    random_stream,
)
from taac_dagster.sources.synthetic.raw_ids import creative_ids


@dataclass
class ItemFeature:
    values: np.ndarray  # int64 re-ids over all items; > vocab means a value new to the indexer
    present: np.ndarray  # bool
    vocab: int  # re-ids 1..vocab are in the indexer

    def known(self) -> np.ndarray:
        return self.values <= self.vocab


@dataclass
class Catalogue:
    """Warm items are indices 0..num_warm-1 (re-id = index + 1); cold items follow."""

    num_warm: int
    num_cold: int
    num_topics: int
    topic: np.ndarray  # int64[total]
    popularity: np.ndarray  # float64[total]: P(item | its topic); 0 for cold items
    creative_id: np.ndarray  # int64[total]
    topic_items: np.ndarray  # warm indices grouped by topic, most popular first
    topic_start: np.ndarray  # int64[K + 1] into topic_items
    features: dict[str, ItemFeature]

    @property
    def total(self) -> int:
        return self.num_warm + self.num_cold

    @property
    def topic_size(self) -> np.ndarray:
        return np.diff(self.topic_start)


def build_catalogue(cfg: SyntheticSettings) -> Catalogue:
    num_warm, num_cold, num_topics = cfg.num_items, cfg.cold_items, cfg.num_topics
    if num_topics > num_warm:
        raise ValueError(f"num_topics ({num_topics}) must not exceed num_items ({num_warm})")
    total = num_warm + num_cold
    rng = random_stream(cfg.seed, Stream.ITEMS)
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

    return Catalogue(
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


def _item_vocab(spec: ItemFeatureSpec, num_warm: int, num_topics: int) -> int:
    if spec.kind == "item":
        return num_warm
    if spec.vocab is not None:
        return spec.vocab
    vocab = max(2, round(num_warm / spec.items_per_value))
    return max(vocab, num_topics) if spec.kind == "advertiser" else vocab


def _build_item_features(cfg: SyntheticSettings, topic: np.ndarray, num_warm: int) -> dict[str, ItemFeature]:
    rng = random_stream(cfg.seed, Stream.ITEM_FEATURES)
    total, num_topics = len(topic), cfg.num_topics
    group_missing: dict[str, np.ndarray] = {}
    features: dict[str, ItemFeature] = {}
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
        features[spec.feature_id] = ItemFeature(values=values, present=~missing, vocab=vocab)
    return features


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


def embedding_blocks(
    catalogue: Catalogue, family: int, dim: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(item indices, float32 unit vectors): topic centroid + noise, partial coverage of warm
    items, every cold item covered (a model needs something to place them by)."""
    centroids = random_stream(seed, Stream.EMBEDDINGS, family).standard_normal((catalogue.num_topics, dim))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    coverage = EMBEDDING_COVERAGE.get(family, DEFAULT_EMBEDDING_COVERAGE)
    rows = int(np.clip(EMBEDDING_VALUES_PER_BLOCK // dim, 1_024, 262_144))
    for index, lo in enumerate(range(0, catalogue.total, rows)):
        hi = min(catalogue.total, lo + rows)
        rng = random_stream(seed, Stream.EMBEDDINGS, family, index + 1)
        items = np.arange(lo, hi)
        items = items[(rng.random(hi - lo) < coverage) | (items >= catalogue.num_warm)]
        noise = rng.standard_normal((len(items), dim), dtype=np.float32)
        vectors = centroids[catalogue.topic[items]].astype(np.float32)
        vectors += noise * np.float32(EMBEDDING_NOISE / math.sqrt(dim))
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        yield items, vectors
