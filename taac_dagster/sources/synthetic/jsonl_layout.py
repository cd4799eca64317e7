"""The competition's JSON-lines layout (format B of docs/domain.md)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from taac_dagster.settings import SyntheticSettings
from taac_dagster.sources.synthetic.arrow import LARGE_STRING, concat, int_list, int_text, join_lines, json_object, literal
from taac_dagster.sources.synthetic.catalogue import Catalogue, embedding_blocks
from taac_dagster.sources.synthetic.events import EventBlock, EventTally, candidate_pool
from taac_dagster.sources.synthetic.parameters import (
    ITEM_FEATURE_SPECS,
    ITEMS_PER_BLOCK,
    PROFILE_SNAPSHOT,
    PROFILE_SPREAD,
    USER_FEATURE_SPECS,
    Stream,
    random_stream,
)
from taac_dagster.sources.synthetic.users import Population


def _item_feature_json(catalogue: Catalogue, items: np.ndarray, zero_unknown: bool) -> pa.Array:
    """'{"100": 6, ...}' per item, all item features incl. 111, missing ones left out."""
    pieces = []
    for spec in ITEM_FEATURE_SPECS:
        feat = catalogue.features[spec.feature_id]
        values = feat.values[items]
        if zero_unknown:
            values = np.where(feat.known()[items], values, 0)
        pieces.append(concat(literal(f'"{spec.feature_id}": '), int_text(values, feat.present[items])))
    return json_object(pieces)


def _user_profile_records(population: Population, seed: int) -> pa.Array:
    """'[uid, null, {...}, null, null, ts]' per user: the profile record closing each line."""
    pieces = []
    for spec in USER_FEATURE_SPECS:
        feat = population.features[spec.feature_id]
        if feat.offsets is None:
            text = int_text(feat.values, feat.present)
        else:
            as_text = pc.cast(int_list(feat.offsets, feat.values, feat.present), pa.large_list(LARGE_STRING))
            text = concat(literal("["), pc.binary_join(as_text, literal(", ")), literal("]"))
        pieces.append(concat(literal(f'"{spec.feature_id}": '), text))
    profile = json_object(pieces)
    num_users = population.num_users
    when = PROFILE_SNAPSHOT + random_stream(seed, Stream.PROFILE_TIME).integers(0, PROFILE_SPREAD, size=num_users)
    uid = int_text(np.arange(1, num_users + 1))
    return concat(literal("["), uid, literal(", null, "), profile, literal(", null, null, "), int_text(when), literal("]"))


def _jsonl_seq_lines(block: EventBlock, item_json: pa.Array, profiles: pa.Array) -> pa.Array:
    owner = np.repeat(np.arange(block.num_users), np.diff(block.offsets)) + block.first_user + 1
    records = concat(
        literal("["), int_text(owner), literal(", "), int_text(block.item), literal(", null, "),
        item_json.take(pa.array(block.item - 1)), literal(", "), int_text(block.action), literal(", "),
        int_text(block.timestamp), literal("]"),
    )
    per_user = pc.binary_join(pa.LargeListArray.from_arrays(pa.array(block.offsets), records), literal(", "))
    profile = profiles.slice(block.first_user, block.num_users)
    return concat(literal("["), per_user, literal(", "), profile, literal("]"))


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
            handle.write(join_lines(lines, "\n"))
            first = False


def _jsonl_predict_lines(catalogue: Catalogue, pool: np.ndarray) -> Iterator[pa.Array]:
    for lo in range(0, len(pool), ITEMS_PER_BLOCK):
        members = pool[lo : lo + ITEMS_PER_BLOCK]
        yield concat(
            literal('{"creative_id": '), int_text(catalogue.creative_id[members]),
            literal(', "retrieval_id": '), int_text(np.arange(lo + 1, lo + len(members) + 1)),
            literal(', "features": '), _item_feature_json(catalogue, members, zero_unknown=True), literal("}"),
        )


def _jsonl_embedding_lines(catalogue: Catalogue, family: int, dim: int, seed: int) -> Iterator[pa.Array]:
    for items, vectors in embedding_blocks(catalogue, family, dim, seed):
        # json.dumps writes floats as Python reprs, like the real files; per row is fine at
        # the scale this layout is meant for.
        rows = [
            f'{{"anonymous_cid": {cid}, "emb": {json.dumps(vec)}}}'
            for cid, vec in zip(catalogue.creative_id[items].tolist(), vectors.astype(np.float64).tolist())
        ]
        yield pa.array(rows, type=LARGE_STRING)


def write_jsonl_layout(
    out_dir: Path, blocks: Iterator[EventBlock], catalogue: Catalogue, population: Population,
    tally: EventTally, cfg: SyntheticSettings, dims: dict[int, int],
) -> np.ndarray:
    item_json = _item_feature_json(catalogue, np.arange(catalogue.num_warm), zero_unknown=False)
    profiles = _user_profile_records(population, cfg.seed)
    _write_jsonl_lines(out_dir / "seq.jsonl", (_jsonl_seq_lines(b, item_json, profiles) for b in blocks))
    del item_json, profiles
    pool = candidate_pool(catalogue, tally.target_item, cfg)
    _write_jsonl_lines(out_dir / "predict_set.jsonl", _jsonl_predict_lines(catalogue, pool))
    for family, dim in dims.items():
        # The real folder holds part-0000 (see fixtures/tencentgr_demo/creative_emb/).
        path = out_dir / "creative_emb" / f"emb_{family}_{dim}" / "part-0000"
        _write_jsonl_lines(path, _jsonl_embedding_lines(catalogue, family, dim, cfg.seed))
    return pool
