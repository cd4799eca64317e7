"""Raw ids shaped like the real indexer's, and ``indexer.pkl``, which maps them to re-ids."""

from __future__ import annotations

import collections
import math
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from taac_dagster.sources.synthetic.parameters import (
    CREATIVE_ID_BASE,
    ITEM_FEATURE_SPECS,
    MIN_RAW_DIGITS,
    USER_FEATURE_SPECS,
    USER_ID_PREFIX,
)

if TYPE_CHECKING:  # the catalogue takes its creative ids from here
    from taac_dagster.sources.synthetic.catalogue import Catalogue
    from taac_dagster.sources.synthetic.users import Population

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


# --- Indexer ---------------------------------------------------------------------------------
def _build_indexer(catalogue: Catalogue, population: Population, seed: int) -> dict[str, Any]:
    items = catalogue.creative_id[: catalogue.num_warm].tolist()
    vocab: collections.defaultdict[str, dict[int, int]] = collections.defaultdict(dict)
    for item_spec in ITEM_FEATURE_SPECS:
        size = catalogue.features[item_spec.feature_id].vocab
        # Leave room in the raw code space for the cold items' new values.
        upper = size + catalogue.num_cold
        raw = feature_raw_values(item_spec.feature_id, np.arange(1, size + 1), upper, seed)
        vocab[item_spec.feature_id] = dict(zip(raw.tolist(), range(1, size + 1)))
    for user_spec in USER_FEATURE_SPECS:
        raw = feature_raw_values(user_spec.feature_id, np.arange(1, user_spec.vocab + 1), user_spec.vocab, seed)
        vocab[user_spec.feature_id] = dict(zip(raw.tolist(), range(1, user_spec.vocab + 1)))
    return {
        "u": dict(zip(raw_user_ids(population.num_users, seed), range(1, population.num_users + 1))),
        "i": dict(zip(items, range(1, catalogue.num_warm + 1))),
        "f": vocab,
    }


def write_indexer(path: Path, catalogue: Catalogue, population: Population, seed: int) -> None:
    indexer = _build_indexer(catalogue, population, seed)
    with open(path, "wb") as handle:
        pickle.dump(indexer, handle, protocol=4)
