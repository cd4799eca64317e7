"""The Hub release's parquet layout (format A of docs/domain.md)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from taac_dagster import formats
from taac_dagster.settings import SyntheticSettings
from taac_dagster.sources.synthetic.arrow import int_list, masked_int64, write_parquet_blocks
from taac_dagster.sources.synthetic.catalogue import Catalogue, embedding_blocks
from taac_dagster.sources.synthetic.events import EventBlock, EventTally, candidate_pool
from taac_dagster.sources.synthetic.parameters import (
    HUB_ITEM_FEATURES,
    ITEMS_PER_BLOCK,
    USER_FEATURE_SPECS,
    USERS_PER_BLOCK,
)
from taac_dagster.sources.synthetic.users import Population

# The event table is most of the bytes: zstd makes it ~35% smaller at no cost in speed, and
# dictionary pages pay off only for the 2-3 action types (ids and times are near-unique).
SEQ_PARQUET_OPTIONS: dict[str, Any] = {
    "compression": "zstd",
    "use_dictionary": ["seq.list.element.action_type"],
}


def _hub_seq_table(block: EventBlock) -> pa.Table:
    events = pa.StructArray.from_arrays(
        [pa.array(block.item), pa.array(block.action), pa.array(block.timestamp)],
        fields=list(formats.HUB_SEQ_EVENT),
    )
    seq = pa.ListArray.from_arrays(pa.array(block.offsets.astype(np.int32)), events)
    user_id = np.arange(block.first_user + 1, block.first_user + block.num_users + 1, dtype=np.int64)
    return pa.table({"user_id": pa.array(user_id), "seq": seq})


def _hub_user_tables(population: Population) -> Iterator[pa.Table]:
    for lo in range(0, population.num_users, USERS_PER_BLOCK * 4):
        hi = min(population.num_users, lo + USERS_PER_BLOCK * 4)
        columns: dict[str, pa.Array] = {"user_id": pa.array(np.arange(lo + 1, hi + 1, dtype=np.int64))}
        for spec in USER_FEATURE_SPECS:
            feat = population.features[spec.feature_id]
            if feat.offsets is None:
                columns[spec.feature_id] = masked_int64(feat.values[lo:hi], feat.present[lo:hi])
            else:
                start, stop = feat.offsets[lo], feat.offsets[hi]
                columns[spec.feature_id] = int_list(
                    feat.offsets[lo : hi + 1] - start, feat.values[start:stop], feat.present[lo:hi]
                )
        yield pa.table(columns)


def _hub_item_tables(catalogue: Catalogue) -> Iterator[pa.Table]:
    for lo in range(0, catalogue.num_warm, ITEMS_PER_BLOCK):
        hi = min(catalogue.num_warm, lo + ITEMS_PER_BLOCK)
        columns: dict[str, pa.Array] = {"item_id": pa.array(np.arange(lo + 1, hi + 1, dtype=np.int64))}
        for fid in HUB_ITEM_FEATURES:
            feat = catalogue.features[fid]
            columns[fid] = masked_int64(feat.values[lo:hi], feat.present[lo:hi])
        yield pa.table(columns)


def _hub_candidate_table(catalogue: Catalogue, pool: np.ndarray) -> pa.Table:
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


def _hub_embedding_tables(catalogue: Catalogue, family: int, dim: int, seed: int) -> Iterator[pa.Table]:
    for items, vectors in embedding_blocks(catalogue, family, dim, seed):
        offsets = np.arange(0, len(items) * dim + 1, dim, dtype=np.int32)
        emb = pa.ListArray.from_arrays(pa.array(offsets), pa.array(vectors.ravel()))
        # The real release stores the raw creative id of mm_emb as a string of digits.
        cids = pa.array(catalogue.creative_id[items]).cast(pa.string())
        yield pa.table({"anonymous_cid": cids, "emb": emb})


def write_hub_layout(
    out_dir: Path, blocks: Iterator[EventBlock], catalogue: Catalogue, population: Population,
    tally: EventTally, cfg: SyntheticSettings, dims: dict[int, int],
) -> np.ndarray:
    write_parquet_blocks(
        out_dir / "seq" / "part-00000.parquet", (_hub_seq_table(b) for b in blocks), **SEQ_PARQUET_OPTIONS
    )
    write_parquet_blocks(out_dir / "user_feat" / "part-00000.parquet", _hub_user_tables(population))
    write_parquet_blocks(out_dir / "item_feat" / "part-00000.parquet", _hub_item_tables(catalogue))
    pool = candidate_pool(catalogue, tally.target_item, cfg)
    candidate_path = out_dir / "candidate" / "part-00000.parquet"
    candidate_path.parent.mkdir(parents=True)
    pq.write_table(_hub_candidate_table(catalogue, pool), candidate_path)
    for family, dim in dims.items():
        path = out_dir / "mm_emb" / f"emb_{family}_{dim}_parquet" / "part-00000.parquet"
        write_parquet_blocks(path, _hub_embedding_tables(catalogue, family, dim, cfg.seed))
    return pool
