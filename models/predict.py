"""Model inputs for the users of a ``predict_seq.jsonl`` (the competition's inference file).

The file has the format of ``seq.jsonl`` (one user per line, interaction and profile records);
the pipeline's step (taac_dagster/steps/predict.py) parses it with the same reader into a
throwaway in-memory DuckDB and hands over one row per user (histories and features), and each
user's whole sequence becomes the history (its last ``max_len`` events), encoded exactly like
the training arrays: item re-ids the model knows keep their row, others become 0 (unknown), null action
types count as exposures, times are relative to the arrays' time origin (earlier ones clamped to it), user features are
clipped to the training vocabularies. Raw user ids come from ``indexer.pkl`` beside it (the
re-id when the indexer does not name the user).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from models.data import Arrays, encode_user_features, list_parts, pad_lists

PREDICT_FILE = "predict_seq.jsonl"


@dataclass
class PredictInputs:
    path: Path
    user_ids: np.ndarray  # re-ids [n]
    raw_user_ids: np.ndarray  # object [n]
    batch: dict[str, np.ndarray]  # holdout_batch's keys: items, actions, times, user_sparse, user_multi

    def __len__(self) -> int:
        return len(self.user_ids)

    def slice(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        return {key: value[lo:hi] for key, value in self.batch.items()}


def find_predict_file(local_path: Path | None) -> Path | None:
    if local_path is None:
        return None
    path = Path(local_path) / PREDICT_FILE
    return path if path.is_file() else None


def predict_inputs(path: Path, histories: pa.Table, features: pa.Table, arrays: Arrays) -> PredictInputs:
    """Model inputs for each user of ``path`` (ordered by re-id) from one row per user:
    ``histories`` (user_id, item_ids, actions, times, raw_user_id) and ``features`` (user_id and
    the user feature columns, in the same order)."""
    meta = arrays.meta
    width, id_rows = int(meta["max_len"]), int(meta["id_rows"])
    users = histories.column("user_id").to_numpy().astype(np.int64)
    lengths, items = list_parts(histories.column("item_ids"))
    items = np.where((items > 0) & (items < id_rows), items, 0)
    _, actions = list_parts(histories.column("actions"))
    _, times = list_parts(histories.column("times"))
    actions = np.clip(actions, 0, int(meta["n_actions"]) - 1)
    vocab = {c: int(meta["user_vocab"][c]) for c in meta["user_sparse"] + meta["user_multi"]}
    sparse, multi, _ = encode_user_features(features, vocab, int(meta["multi_len"]),
                                            sparse_features=meta["user_sparse"], multi_features=meta["user_multi"])
    raw = histories.column("raw_user_id").to_numpy(zero_copy_only=False).astype(object)
    missing = np.array([r is None for r in raw], dtype=bool)
    raw[missing] = users[missing]
    # Inference data may predate the training data's first event: clamp to the origin rather
    # than refuse (the time features then read "as early as training saw").
    relative = np.clip(times.astype(np.int64) - int(meta["time_origin"]), 0, 2**31 - 1)
    batch = {
        "items": pad_lists(lengths, items.astype(np.int64), width, np.int64, left=True),
        "actions": pad_lists(lengths, actions.astype(np.int64), width, np.int64, left=True),
        "times": pad_lists(lengths, relative, width, np.int64, left=True),
        "user_sparse": sparse.astype(np.int64),
        "user_multi": multi.astype(np.int64),
    }
    return PredictInputs(Path(path), users, raw, batch)
