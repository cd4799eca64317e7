"""The users of a ``predict_seq.jsonl`` (the competition's inference file) for the user vectors
and the submission: which file the settings point at, and its users read into model inputs.

The file is parsed by the reader of ``seq.jsonl`` into a throwaway in-memory DuckDB; one row per
user (its whole sequence, its raw id from ``indexer.pkl`` beside the file, its features) goes to
``models.predict.predict_inputs``, which encodes it like the training arrays.
"""

from __future__ import annotations

from pathlib import Path

from models.data import Arrays
from models.predict import PredictInputs, find_predict_file, predict_inputs
from taac_dagster.db import connect
from taac_dagster.errors import DataFormatError
from taac_dagster.readers.jsonl import stage_seq_jsonl
from taac_dagster.readers.staging import stage_indexer
from taac_dagster.settings import TaacSettings

HISTORIES_SQL = """
    SELECT ids.user_id,
           coalesce(list(e.item_id ORDER BY e.position) FILTER (WHERE e.item_id IS NOT NULL), []) AS item_ids,
           coalesce(list(coalesce(e.action_type, 0) ORDER BY e.position) FILTER (WHERE e.item_id IS NOT NULL), [])
               AS actions,
           coalesce(list(e."timestamp" ORDER BY e.position) FILTER (WHERE e.item_id IS NOT NULL), []) AS times,
           (SELECT min(raw_user_id) FROM stg_user_index r WHERE r.user_id = ids.user_id) AS raw_user_id
    FROM ids LEFT JOIN stg_events e USING (user_id)
    GROUP BY ids.user_id ORDER BY ids.user_id
    """
FEATURES_SQL = (
    "SELECT ids.user_id, f.* EXCLUDE (user_id) FROM ids LEFT JOIN stg_user_features f USING (user_id) "
    "ORDER BY ids.user_id"
)


def configured_predict_file(settings: TaacSettings) -> Path | None:
    """The predict_seq.jsonl the submission is for: the local source's, when it has one."""
    return find_predict_file(settings.local_path) if settings.source == "local" else None


def read_predict_inputs(path: Path, arrays: Arrays, settings: TaacSettings | None = None) -> PredictInputs:
    """Parse ``path`` and build model inputs for each of its users (ordered by re-id)."""
    path = Path(path)
    con = connect(None, settings)
    try:
        stage_seq_jsonl(con, path)
        indexer = path.parent / "indexer.pkl"
        if indexer.is_file():
            stage_indexer(con, indexer)
        else:
            con.execute("CREATE TABLE stg_user_index (raw_user_id VARCHAR, user_id BIGINT)")
        con.execute("CREATE TABLE ids AS SELECT user_id FROM stg_events UNION SELECT user_id FROM stg_user_features")
        histories = con.sql(HISTORIES_SQL).to_arrow_table()
        features = con.sql(FEATURES_SQL).to_arrow_table()
    finally:
        con.close()
    if histories.num_rows == 0:
        raise DataFormatError(path, "one JSON list of records per user", "no users")
    return predict_inputs(path, histories, features, arrays)


__all__ = ["configured_predict_file", "read_predict_inputs"]
