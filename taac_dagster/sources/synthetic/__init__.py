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

The modules: ``parameters`` (the process's constants, block sizes, feature specifications),
``catalogue`` (items, their features and embeddings), ``users``, ``events`` (click model,
sequences, holdout targets, candidate pool), ``raw_ids`` (raw ids and ``indexer.pkl``),
``hub_layout`` and ``jsonl_layout`` (the two on-disk formats, built with ``arrow``),
``ground_truth`` and ``generate`` (the entry point).
"""

from taac_dagster.sources.synthetic.catalogue import embedding_dims
from taac_dagster.sources.synthetic.events import ClickModel
from taac_dagster.sources.synthetic.generate import SyntheticSummary, generate_dataset
from taac_dagster.sources.synthetic.ground_truth import GROUND_TRUTH_DIR, GroundTruth, load_ground_truth

__all__ = [
    "GROUND_TRUTH_DIR",
    "ClickModel",
    "GroundTruth",
    "SyntheticSummary",
    "embedding_dims",
    "generate_dataset",
    "load_ground_truth",
]
