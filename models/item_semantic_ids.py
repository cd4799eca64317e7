"""Every item's Semantic ID: the RQ code tuple of its vector, a fallback for items without
one, and the disambiguation code (``models.semantic_id_collisions``) that makes tuples unique.

Items without a vector (the source's coverage is partial) are encoded from the mean vector of
the items with one that share their advertiser (sparse feature ``102``, the ``group_key``), run
through the same normalization, whitening and codebooks, so they land near their advertiser's
items. Items without such an advertiser get the reserved *unknown* code K at every level. Both
then go through the disambiguation level, so tuples stay unique.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.item_vectors import ItemVectors, lookup_sorted
from models.semantic_id_collisions import collision_rate, resolve_collisions
from models.semantic_id_quality import reconstruction_error, topic_recovery, utilization
from models.semantic_ids import Encoded, RQCodebooks, chunk_rows, encode, encode_with_errors


class GroupMeans:
    """Running per-group sums of embeddings, for the groups (advertisers) of ``wanted_keys``.

    Fed batch by batch (``add``), so the embeddings never need to be in memory at once; the
    sums take groups x dim float32.
    """

    def __init__(self, wanted_keys: np.ndarray, dim: int) -> None:
        keys = np.asarray(wanted_keys, np.int64)
        self.keys = np.unique(keys[keys > 0])
        self.sums = np.zeros((len(self.keys), dim), np.float32)
        self.counts = np.zeros(len(self.keys), np.int64)

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        position, found = lookup_sorted(self.keys, np.asarray(keys, np.int64))
        if not found.any():
            return
        rows = np.flatnonzero(found)
        rows = rows[np.argsort(position[rows], kind="stable")]
        position = position[rows]
        starts = np.flatnonzero(np.r_[True, position[1:] != position[:-1]])
        partial = np.add.reduceat(np.asarray(vectors[rows], np.float32), starts, axis=0, dtype=np.float64)
        self.sums[position[starts]] += partial.astype(np.float32)
        self.counts[position[starts]] += np.diff(np.r_[starts, len(rows)])

    def codes(self, codebooks: RQCodebooks, keys: np.ndarray) -> np.ndarray:
        """Codes of each key's mean embedding; the unknown code where the group is empty."""
        keys = np.asarray(keys, np.int64)
        out = np.full((len(keys), codebooks.levels), codebooks.unknown_code, np.int32)
        have = np.flatnonzero(self.counts > 0)
        group_codes = np.empty((len(have), codebooks.levels), np.int32)
        chunk = chunk_rows(codebooks.input_dim)
        for lo in range(0, len(have), chunk):
            part = have[lo : lo + chunk]
            group_codes[lo : lo + chunk] = encode(codebooks, self.sums[part] / self.counts[part, None])
        position, found = lookup_sorted(self.keys[have], keys)
        out[found] = group_codes[position[found]]
        return out


@dataclass
class ItemCodes:
    """Every item's code tuple: RQ levels (fallbacks included) plus the disambiguation code."""

    encoded: Encoded  # the embedded items' codes and errors
    rq_codes: np.ndarray  # int32 [n, levels]
    disambiguation: np.ndarray  # int32 [n]
    codes: np.ndarray  # int32 [n, levels + 1]: rq_codes, then the disambiguation code
    missing: np.ndarray  # rows without a vector (advertiser mean or unknown)


def encode_items(codebooks: RQCodebooks, vectors: ItemVectors, logger: logging.Logger) -> ItemCodes:
    """One streaming pass encodes every item with a vector and sums, per advertiser, the vectors
    that items without one borrow (their advertiser's mean, else the unknown code); then the
    disambiguation code makes every tuple unique."""
    reader, group_key = vectors.reader, vectors.universe["group_key"]
    has_embedding = reader.has_embedding
    embedded, missing = np.flatnonzero(has_embedding), np.flatnonzero(~has_embedding)
    n_embedded, levels = len(embedded), codebooks.levels
    embedded_keys = group_key[embedded]
    means = GroupMeans(group_key[missing], vectors.dim)
    encoded = Encoded(
        np.empty((n_embedded, levels), np.int32), np.empty((n_embedded, levels), np.float32), np.empty(n_embedded, np.float32),
    )
    done = 0
    for index, batch in reader.batches():
        part = encode_with_errors(codebooks, batch)
        encoded.codes[index], encoded.level_sq_error[index], encoded.sq_norm[index] = (
            part.codes, part.level_sq_error, part.sq_norm
        )
        means.add(embedded_keys[index], batch)
        done += len(index)
        if n_embedded >= 200_000 and done % 200_000 < len(index):
            logger.info(f"encoded {done:,} of {n_embedded:,} items")
    rq_codes = np.full((len(has_embedding), levels), codebooks.unknown_code, np.int32)
    rq_codes[embedded] = encoded.codes
    rq_codes[missing] = means.codes(codebooks, group_key[missing])
    priority = np.full(len(has_embedding), np.inf)
    priority[embedded] = encoded.level_sq_error[:, -1]
    disamb = resolve_collisions(rq_codes, priority, vectors.universe["creative_id"])
    item_codes = ItemCodes(encoded, rq_codes, disamb, np.concatenate([rq_codes, disamb[:, None]], axis=1), missing)
    after = collision_rate(item_codes.codes)
    if after != 0.0:
        raise AssertionError(f"collision resolution left {after:.2%} duplicate tuples")
    return item_codes


def code_metrics(codebooks: RQCodebooks, vectors: ItemVectors, item_codes: ItemCodes) -> dict[str, Any]:
    """Counts, utilization and reconstruction error per level, collision rates (the metadata)."""
    missing, rq_codes, encoded = item_codes.missing, item_codes.rq_codes, item_codes.encoded
    unknown = int((rq_codes[missing, 0] == codebooks.unknown_code).sum())
    metrics: dict[str, Any] = {
        "items": len(rq_codes),
        "items_with_embedding": len(encoded.codes),
        "items_fallback_advertiser": len(missing) - unknown,
        "items_fallback_unknown": unknown,
        "items_without_creative_id_skipped": int(vectors.universe["items_without_creative_id"][0]),
        "levels": codebooks.levels,
        "codebook_size": codebooks.codebook_size,
        "utilization": [round(u, 4) for u in utilization(encoded.codes, codebooks.codebook_size)],
        "reconstruction_error": [round(e, 4) for e in reconstruction_error(encoded)],
        "collision_rate_before": round(collision_rate(rq_codes), 4),
        "collision_rate_before_embedded": round(collision_rate(encoded.codes), 4),
        "collision_rate_after": 0.0,  # encode_items refuses anything else
        "max_disambiguation": int(item_codes.disambiguation.max(initial=0)),
        "content_coverage": round(vectors.coverage.share, 4),
    }
    if vectors.collaborative_stats is not None:
        metrics["collaborative"] = vectors.collaborative_stats
    return metrics


def item_topic_recovery(
    truth: tuple[np.ndarray, np.ndarray], codebooks: RQCodebooks, vectors: ItemVectors, item_codes: ItemCodes, seed: int
) -> dict[str, Any]:
    """Synthetic data: how well level-1 codes recover the planted topics (NMI, purity, chance)."""
    has_embedding, rq_codes = vectors.reader.has_embedding, item_codes.rq_codes
    pos, found = lookup_sorted(truth[0], vectors.universe["creative_id"])
    topics = truth[1][pos]
    on = has_embedding & found
    recovery = topic_recovery(rq_codes[on, 0], topics[on], seed=seed)
    # Fallback items (advertiser mean): does their level-1 code's majority topic match theirs?
    fb = ~has_embedding & found & (rq_codes[:, 0] != codebooks.unknown_code)
    if fb.any():
        joint = np.zeros((codebooks.codebook_size, int(truth[1].max()) + 1), np.int64)
        np.add.at(joint, (rq_codes[on, 0], topics[on]), 1)
        recovery["fallback_topic_accuracy"] = round(float((joint.argmax(1)[rq_codes[fb, 0]] == topics[fb]).mean()), 4)
    return recovery
