"""Collaborative item vectors (models/collaborative.py): co-occurrence counts on hand-made
sequences, geometry on planted topics, fold-in of rare items, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from models.collaborative import (
    CollaborativeConfig,
    collaborative_vectors,
    cooccurrence,
    frequent_items,
    item_counts,
    ppmi,
)


def batches_of(sequences: list[list[int]], users_per_batch: int = 2):
    """A SequenceBatches function over Python lists, ``users_per_batch`` sequences a batch."""

    def batches():
        for lo in range(0, len(sequences), users_per_batch):
            part = sequences[lo : lo + users_per_batch]
            yield np.array([i for s in part for i in s], np.int64), np.array([len(s) for s in part])

    return batches


def planted_sequences(topics: int = 8, per_topic: int = 40, users: int = 400, seed: int = 0) -> list[list[int]]:
    """Each user draws its history from one topic's items (ids topic * per_topic + 1 ...)."""
    rng = np.random.default_rng(seed)
    items = np.arange(1, topics * per_topic + 1).reshape(topics, per_topic)
    return [rng.choice(items[rng.integers(topics)], size=int(rng.integers(5, 30))).tolist() for _ in range(users)]


def test_cooccurrence_counts_pairs_within_the_window_weighted_by_distance():
    sequences = [[1, 2, 3, 4], [4, 1], [2, 2, 5]]
    index_of = np.arange(-1, 6)  # item i -> row i - 1
    counts = cooccurrence(batches_of(sequences, 1), index_of, 5, window=2).toarray()
    expected = np.zeros((5, 5), np.float32)
    for a, b, w in [(1, 2, 1), (2, 3, 1), (3, 4, 1), (1, 3, 0.5), (2, 4, 0.5), (4, 1, 1), (2, 5, 1), (2, 5, 0.5)]:
        expected[a - 1, b - 1] += w
        expected[b - 1, a - 1] += w
    np.testing.assert_allclose(counts, expected)  # no pair across sequences, no item with itself
    # Batches of any size sum to the same matrix.
    np.testing.assert_allclose(cooccurrence(batches_of(sequences, 3), index_of, 5, window=2).toarray(), expected)


def test_ppmi_keeps_positive_associations_only():
    counts = cooccurrence(batches_of([[1, 2]] * 5 + [[3, 4]] * 5 + [[1, 3]]), np.arange(-1, 5), 4, window=1)
    pmi = ppmi(counts, smoothing=1.0).toarray()
    assert pmi[0, 1] > 0 and pmi[2, 3] > 0  # pairs seen often together
    assert pmi[0, 3] == 0 and (pmi >= 0).all()  # never together: 0, never negative


def test_frequent_items_break_ties_by_id():
    counts = item_counts(batches_of([[5, 3, 3, 7], [7, 9, 5]]))
    assert counts[[3, 5, 7, 9]].tolist() == [2, 2, 2, 1]
    assert frequent_items(counts, 3).tolist() == [3, 5, 7]


def test_items_that_cooccur_are_closer_than_items_that_never_do():
    sequences = planted_sequences()
    result = collaborative_vectors(batches_of(sequences, 64), CollaborativeConfig(dim=16, seed=0))
    assert result.vectors.shape == (320, 16) and result.item_ids.tolist() == list(range(1, 321))
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, rtol=1e-5)
    topic = (result.item_ids - 1) // 40
    cosine = result.vectors @ result.vectors.T
    same = (topic[:, None] == topic[None, :]) & ~np.eye(len(topic), dtype=bool)
    assert cosine[same].mean() > 0.7 and abs(cosine[topic[:, None] != topic[None, :]].mean()) < 0.1
    # Every item is nearer to the centre of its own topic than to any other topic's.
    centres = np.stack([result.vectors[topic == t].mean(0) for t in range(8)])
    assert ((result.vectors @ centres.T).argmax(1) == topic).all()


def test_deterministic_by_seed_and_independent_of_batching():
    sequences = planted_sequences(seed=1)
    cfg = CollaborativeConfig(dim=12, seed=3)
    first = collaborative_vectors(batches_of(sequences, 50), cfg)
    again = collaborative_vectors(batches_of(sequences, 50), cfg)
    np.testing.assert_array_equal(first.vectors, again.vectors)
    np.testing.assert_array_equal(first.item_ids, again.item_ids)
    # Other batches sum the counts in another order (float32): the basis of a near-degenerate
    # spectrum may rotate, but the geometry is the same.
    rebatched = collaborative_vectors(batches_of(sequences, 7), cfg)
    topic = (rebatched.item_ids - 1) // 40
    centres = np.stack([rebatched.vectors[topic == t].mean(0) for t in range(8)])
    assert ((rebatched.vectors @ centres.T).argmax(1) == topic).all()
    other_seed = collaborative_vectors(batches_of(sequences, 50), CollaborativeConfig(dim=12, seed=4))
    assert not np.array_equal(other_seed.vectors, first.vectors)


def test_rare_items_are_folded_in_beside_their_neighbours():
    """Only the 200 most frequent items enter the SVD; the rest get the mean direction of the
    frequent items around their occurrences, so they land in their topic too."""
    sequences = planted_sequences()
    cfg = CollaborativeConfig(dim=16, max_items=200)
    result = collaborative_vectors(batches_of(sequences, 64), cfg)
    assert result.stats["frequent_items"] == 200 and result.stats["folded_in"] == 120
    counts = item_counts(batches_of(sequences))
    rare = np.isin(result.item_ids, frequent_items(counts, 200), invert=True)
    topic = (result.item_ids - 1) // 40
    centres = np.stack([result.vectors[~rare & (topic == t)].mean(0) for t in range(8)])
    assert ((result.vectors[rare] @ centres.T).argmax(1) == topic[rare]).mean() > 0.95


def test_items_without_any_neighbour_get_no_vector():
    # Item 9 only ever appears alone; items never in a sequence are simply absent.
    result = collaborative_vectors(batches_of([[1, 2, 3], [2, 3, 1], [9], [4, 5], [5, 4]]), CollaborativeConfig(dim=2))
    assert 9 not in result.item_ids.tolist() and set(result.item_ids.tolist()) <= {1, 2, 3, 4, 5}
    assert result.stats["items_in_sequences"] == 6


@pytest.mark.parametrize("bad", [{"dim": 0}, {"window": 0}, {"max_items": 1}])
def test_config_is_checked(bad):
    with pytest.raises(ValueError):
        CollaborativeConfig(**bad)
