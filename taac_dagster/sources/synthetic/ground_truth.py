"""``ground_truth/``: the generative model written beside the dataset, and ``GroundTruth``,
which reads it back and gives the true next-item probabilities (the report's oracle)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from taac_dagster.settings import SyntheticSettings
from taac_dagster.sources.synthetic.arrow import write_parquet_blocks
from taac_dagster.sources.synthetic.catalogue import Catalogue
from taac_dagster.sources.synthetic.events import ClickModel
from taac_dagster.sources.synthetic.parameters import (
    DEFAULT_EMBEDDING_COVERAGE,
    EMBEDDING_COVERAGE,
    EMBEDDING_NOISE,
    INTEREST_DIRICHLET_ALPHA,
    INTEREST_SLOTS,
    MAX_HISTORY,
    MIN_HISTORY,
    STICKINESS,
    USERS_PER_BLOCK,
)
from taac_dagster.sources.synthetic.users import Population

FORMAT_VERSION = 1
GROUND_TRUTH_DIR = "ground_truth"
# model.json's "generator": the package, whichever of its modules writes the file.
GENERATOR = "taac_dagster.sources.synthetic"


def write_ground_truth(
    folder: Path, catalogue: Catalogue, population: Population, clicks: ClickModel,
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

    write_parquet_blocks(folder / "users.parquet", user_tables())
    model = {
        "format_version": FORMAT_VERSION,
        "generator": GENERATOR,
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
