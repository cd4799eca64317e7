"""Multi-modal embeddings of one family -> ``emb_<family>.parquet`` beside the DuckDB file.

Output columns: ``creative_id`` (raw id as BIGINT; the source may hold it as an integer or as a
string of digits, as the Hub release's ``anonymous_cid`` does), ``item_id`` (re-id, NULL for items
the indexer does not know: cold candidates), ``emb`` (FLOAT[dim], fixed size). Sorted by
creative id, so the file is the same for the same input.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from taac_dagster.atomic import atomic_file
from taac_dagster.errors import DataFormatError
from taac_dagster.formats import RAW_ID_TYPE, hub_embedding_dirs, jsonl_embedding_sources, parse_raw_id, raw_id_sql
from taac_dagster.readers import json_lines
from taac_dagster.readers.hub_parquet import RAW_ID, check_schema, files_sql, locate_bad_raw_id, parquet_files
from taac_dagster.safe_pickle import load_plain_pickle
from taac_dagster.sql import read_path, sql_literal


@dataclass(frozen=True)
class EmbeddingSource:
    family: int
    dim: int
    path: Path  # a folder of part files, or a .pkl
    kind: str  # "parquet", "jsonl" or "pickle"


def embedding_folder(root: Path, dataset_format: str) -> Path:
    """Where a dataset keeps its multi-modal embeddings (``mm_emb/`` or ``creative_emb/``)."""
    from taac_dagster.formats import HUB_FORMAT

    return root / ("mm_emb" if dataset_format == HUB_FORMAT else "creative_emb")


def _family_sources(root: Path, dataset_format: str) -> dict[int, tuple[int, Path]]:
    from taac_dagster.formats import HUB_FORMAT

    return hub_embedding_dirs(root) if dataset_format == HUB_FORMAT else jsonl_embedding_sources(root)


def select_embedding_families(root: Path, dataset_format: str, requested: list[int] | None) -> list[int]:
    """The families to read: every family the dataset holds when ``requested`` is None (auto;
    possibly none), else ``requested``, each of which must be there (an error names the folder
    searched, the family and the families found)."""
    found = _family_sources(root, dataset_format)
    if requested is None:
        return sorted(found)
    for family in requested:
        find_embedding_source(root, dataset_format, family)
    return list(dict.fromkeys(int(f) for f in requested))


def families_text(families: list[int] | None) -> str:
    """A family setting or selection as recorded in metadata: "auto", "none" or "81,82"."""
    if families is None:
        return "auto"
    return ",".join(str(f) for f in families) or "none"


def find_embedding_source(root: Path, dataset_format: str, family: int) -> EmbeddingSource:
    from taac_dagster.formats import HUB_FORMAT

    found = _family_sources(root, dataset_format)
    if family not in found:
        have = ", ".join(str(f) for f in sorted(found)) or "none"
        raise DataFormatError(
            embedding_folder(root, dataset_format),
            f"embeddings of family {family} (a folder emb_{family}_<dim>"
            + ("_parquet" if dataset_format == HUB_FORMAT else "")
            + ")",
            f"families {have}; choose from these with TAAC_EMBEDDING_FAMILIES, or set it to auto (every "
            "family found, possibly none)",
        )
    dim, path = found[family]
    if dataset_format == HUB_FORMAT:
        kind = "parquet"
    else:
        kind = "pickle" if path.suffix == ".pkl" else "jsonl"
    return EmbeddingSource(family, dim, path, kind)


def _is_float_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) and (
        pa.types.is_floating(t.value_type)
    )


def _jsonl_parts(folder: Path, dim: int) -> list[Path]:
    parts = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith((".", "_")))
    if not parts:
        raise DataFormatError(folder, "JSON-lines part files {anonymous_cid, emb}", "an empty folder")
    for part in parts:
        json_lines.require_content(part, _jsonl_expected(dim))
    return parts


def _jsonl_expected(dim: int) -> str:
    return f'a JSON object {{"anonymous_cid": <{RAW_ID_TYPE}>, "emb": [{dim} numbers]}} per line'


# A JSON number as DuckDB writes it back (NaN and infinities included: the embeddings_valid
# check names those); a string, a boolean, null or a nested list is not one.
_NUMBER = r"-?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?|NaN|Infinity)"
_NUMBERS_RE = rf"\[\s*(?:{_NUMBER}(?:\s*,\s*{_NUMBER})*)?\s*\]"


def _jsonl_columns_sql(dim: int) -> str:
    """creative_id and emb of a JSON-lines object ``json``: NULL unless they have the format's
    types (a raw id; ``dim`` numbers that fit FLOAT), so a bad value is never converted."""
    cid_ok = "json_type(json, '$.anonymous_cid') IN ('BIGINT', 'UBIGINT', 'VARCHAR')"
    emb = "TRY_CAST(json->'$.emb' AS FLOAT[])"
    return f"""CASE WHEN {cid_ok} THEN {raw_id_sql("json->>'$.anonymous_cid'")} END AS creative_id,
               CASE WHEN regexp_full_match((json->'$.emb')::VARCHAR, '{_NUMBERS_RE}')
                         AND len({emb}) = {dim} AND list_count({emb}) = {dim} THEN {emb} END AS emb"""


def _jsonl_problem(row: object, dim: int) -> tuple[str | None, str]:
    """(field, found) for a line the SQL above could not convert."""
    if not isinstance(row, dict):
        return None, f"a JSON {type(row).__name__}"
    if parse_raw_id(row.get("anonymous_cid")) is None:
        return "anonymous_cid", json.dumps(row.get("anonymous_cid"))[:80]
    emb = row.get("emb")
    if not isinstance(emb, list):
        return "emb", json.dumps(emb)[:80]
    if len(emb) != dim:
        return "emb", f"an embedding of length {len(emb)}"
    bad = next((i for i, x in enumerate(emb) if isinstance(x, bool) or not isinstance(x, (int, float))), None)
    if bad is not None:
        return "emb", f"element {bad} = {json.dumps(emb[bad])}"
    return "emb", "a value outside the range of a 32-bit float"


def _diagnose_jsonl(con: duckdb.DuckDBPyConnection, parts: list[Path], dim: int) -> None:
    """Raise a DataFormatError naming the first bad line of the part files; return if none."""
    expected = _jsonl_expected(dim)
    for part in parts:
        try:
            rows = con.execute(
                f"""SELECT ordinality FROM (
                        SELECT ordinality, {_jsonl_columns_sql(dim)}
                        FROM read_ndjson_objects(?, maximum_object_size={json_lines.MAX_LINE_BYTES}) WITH ORDINALITY)
                    WHERE creative_id IS NULL OR emb IS NULL ORDER BY ordinality LIMIT 1""",
                [read_path(part)],
            ).fetchall()
        except duckdb.Error:
            json_lines.diagnose_lines(part, expected)
            raise
        if rows:
            number, raw = json_lines.physical_line(part, int(rows[0][0]))
            field, found = _jsonl_problem(json.loads(raw), dim)
            raise DataFormatError(part, expected, found, line=number, field=field)


def _diagnose_parquet(con: duckdb.DuckDBPyConnection, files: list[Path], source: EmbeddingSource) -> None:
    """Raise a DataFormatError naming the first bad row (file, row, value); return if none."""
    locate_bad_raw_id(con, files, "anonymous_cid")
    rows = con.execute(
        f"""SELECT filename, file_row_number, anonymous_cid IS NULL, len(emb), list_count(emb)
            FROM read_parquet({files_sql(files)}, filename=true, file_row_number=true, union_by_name=true)
            WHERE emb IS NULL OR len(emb) <> {source.dim} OR list_count(emb) <> len(emb) OR anonymous_cid IS NULL
            ORDER BY filename, file_row_number LIMIT 1"""
    ).fetchall()
    if rows:
        filename, row, null_id, length, non_null = rows[0]
        if null_id:
            raise DataFormatError(
                filename, f"a non-null anonymous_cid ({RAW_ID_TYPE})", "null", row=int(row), field="anonymous_cid"
            )
        if length == source.dim and non_null != length:
            raise DataFormatError(
                filename, f"an embedding of {source.dim} numbers (family {source.family})",
                f"{length - non_null} null element(s)", row=int(row), field="emb",
            )
        raise DataFormatError(
            filename, f"an embedding of length {source.dim} (family {source.family})",
            "null" if length is None else f"length {length}", row=int(row), field="emb",
        )


def _copy_sql(select_source: str, dim: int, out: Path) -> str:
    # A vector of the wrong length or with null elements stays NULL (not an error here): the
    # count after the copy finds it and the diagnosis names its file and row or line.
    # No ORDER BY: every reader matches rows by id, and sorting a 1,024-d family of the real
    # 1M release (1.7M vectors, ~7 GB) ran DuckDB out of its 7.4 GiB; unsorted, the copy streams.
    return f"""
        COPY (
            SELECT e.creative_id, ix.item_id,
                   CASE WHEN len(e.emb) = {dim} AND list_count(e.emb) = {dim} THEN CAST(e.emb AS FLOAT[{dim}]) END AS emb
            FROM ({select_source}) e LEFT JOIN stg_item_index ix USING (creative_id)
        ) TO {sql_literal(out)} (FORMAT parquet, COMPRESSION zstd)
    """


def _family_select(con: duckdb.DuckDBPyConnection, source: EmbeddingSource) -> tuple[str, Callable[[], None]]:
    """The SELECT reading a parquet or JSON-lines family as (creative_id BIGINT, emb), and the
    diagnosis that names its first bad row or line (it returns when it finds none)."""
    if source.kind == "parquet":
        files = parquet_files(source.path)
        check_schema(files, {"anonymous_cid": RAW_ID, "emb": (_is_float_list, "list<float>")})
        select = (
            f"SELECT {raw_id_sql('anonymous_cid')} AS creative_id, emb "
            f"FROM read_parquet({files_sql(files)}, union_by_name=true)"
        )
        return select, partial(_diagnose_parquet, con, files, source)
    parts = _jsonl_parts(source.path, source.dim)
    select = (
        f"SELECT {_jsonl_columns_sql(source.dim)} "
        f"FROM read_ndjson_objects({files_sql(parts)}, maximum_object_size={json_lines.MAX_LINE_BYTES})"
    )
    return select, partial(_diagnose_jsonl, con, parts, source.dim)


def write_family_embeddings(
    con: duckdb.DuckDBPyConnection, source: EmbeddingSource, out_path: Path
) -> dict[str, int]:
    """Validate and write one family; needs ``stg_item_index`` staged. Returns counts."""
    with atomic_file(out_path) as tmp:
        if source.kind == "pickle":
            _write_pickle_embeddings(con, source, tmp)
        else:
            select, diagnose = _family_select(con, source)
            try:
                con.execute(_copy_sql(select, source.dim, tmp))
            except (duckdb.OutOfMemoryException, duckdb.InterruptException):
                raise  # not bad data: the memory limit (TAAC_DUCKDB_MEMORY_LIMIT) or a stop
            except duckdb.Error as exc:
                diagnose()
                raise DataFormatError(
                    source.path, f"family {source.family} embeddings", f"data DuckDB cannot read ({json_lines.short(exc)})"
                ) from None
            # A value of the wrong type or range is NULL after the conversion: find it and name it.
            bad = con.execute(
                "SELECT count(*) FROM read_parquet(?) WHERE creative_id IS NULL OR emb IS NULL", [read_path(tmp)]
            ).fetchall()[0][0]
            if bad:
                diagnose()
                raise DataFormatError(
                    source.path, f"family {source.family} embeddings, each with an id and a vector", f"{bad} rows without"
                )
        counts = con.execute(
            "SELECT count(*), count(item_id), count(*) - count(DISTINCT creative_id) FROM read_parquet(?)", [read_path(tmp)]
        ).fetchall()[0]
    return {"rows": int(counts[0]), "indexed_items": int(counts[1]), "duplicate_ids": int(counts[2])}


def _write_pickle_embeddings(con: duckdb.DuckDBPyConnection, source: EmbeddingSource, tmp: Path) -> None:
    data = load_plain_pickle(source.path)
    if not isinstance(data, dict):
        raise DataFormatError(source.path, "a dict {creative id: list of floats}", type(data).__name__)
    ids = np.empty(len(data), np.int64)
    for position, (cid, emb) in enumerate(data.items()):
        parsed = parse_raw_id(cid)
        if parsed is None:
            raise DataFormatError(source.path, f"creative id keys ({RAW_ID_TYPE})", f"key {cid!r:.60}", row=position)
        ids[position] = parsed
        if not isinstance(emb, list) or len(emb) != source.dim:
            found = f"length {len(emb)}" if isinstance(emb, list) else type(emb).__name__
            raise DataFormatError(
                source.path, f"an embedding of length {source.dim} for creative id {cid}", found, row=position
            )
    # Inferred, not forced: a string such as "0.5" must be an error, not a float. Checked before
    # numpy sees them: one long string would make numpy size every cell of the matrix to it.
    values = list(data.values())
    if not {type(v) for emb in values for v in emb} <= {int, float}:
        _raise_pickle_element(source, data)
    inferred = np.array(values) if values else np.zeros((0, source.dim))
    if inferred.dtype.kind not in "fiu" or inferred.ndim != 2:
        _raise_pickle_element(source, data)
    matrix = inferred.astype(np.float32, copy=False).reshape(len(data), source.dim)
    table = pa.table(
        {"creative_id": ids, "emb": pa.FixedSizeListArray.from_arrays(matrix.reshape(-1), source.dim)}
    )
    con.register("_pickle_emb", table)
    try:
        con.execute(_copy_sql("SELECT creative_id, emb FROM _pickle_emb", source.dim, tmp))
    finally:
        con.unregister("_pickle_emb")


def _raise_pickle_element(source: EmbeddingSource, data: dict) -> None:
    """Name the first embedding of a pickled family holding something other than numbers."""
    for position, (cid, emb) in enumerate(data.items()):
        bad = next((i for i, x in enumerate(emb) if isinstance(x, bool) or not isinstance(x, (int, float))), None)
        if bad is not None:
            raise DataFormatError(
                source.path, f"an embedding of {source.dim} numbers for creative id {cid}",
                f"element {bad} = {emb[bad]!r:.60}", row=position, field="emb",
            )
    raise DataFormatError(source.path, f"embeddings of {source.dim} numbers", "values numpy cannot read as numbers")


def read_embedding_matrix(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(creative_ids, item_ids with -1 for unknown, float32 matrix) of one family file."""
    blocks = list(iter_embedding_blocks(path))
    if not blocks:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return tuple(np.concatenate(part) for part in zip(*blocks))  # type: ignore[return-value]


def iter_embedding_blocks(path: Path, block_bytes: int = 64 << 20) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``read_embedding_matrix`` in blocks of about ``block_bytes`` of vectors, so that a reader
    that scatters the vectors into its own matrix holds that matrix and one block (a few copies
    of it while converting), never the whole file twice."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as handle:
        kind = handle.schema_arrow.field("emb").type
        dim = kind.list_size if pa.types.is_fixed_size_list(kind) else 1024
        rows = max(1024, block_bytes // (4 * max(1, dim)))
        for batch in handle.iter_batches(batch_size=rows, columns=["creative_id", "item_id", "emb"]):
            emb = batch.column("emb")
            dim = emb.type.list_size if pa.types.is_fixed_size_list(emb.type) else (len(emb[0]) if len(emb) else 0)
            matrix = emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)
            creative = batch.column("creative_id").to_numpy()
            items = batch.column("item_id").fill_null(-1).to_numpy()
            yield creative, items, matrix
