"""Multi-modal embeddings of one family -> ``emb_<family>.parquet`` beside the DuckDB file.

Output columns: ``creative_id`` (raw id as BIGINT; the source may hold it as an integer or as a
string of digits, as the Hub release's ``anonymous_cid`` does), ``item_id`` (re-id, NULL for items
the indexer does not know: cold candidates), ``emb`` (FLOAT[dim], fixed size). Sorted by
creative id, so the file is the same for the same input.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from taac_dagster.atomic import atomic_file
from taac_dagster.errors import DataFormatError
from taac_dagster.formats import RAW_ID_TYPE, hub_embedding_dirs, jsonl_embedding_sources, parse_raw_id, raw_id_sql
from taac_dagster.readers.hub_parquet import RAW_ID, check_schema, files_sql, locate_bad_raw_id, parquet_files
from taac_dagster.safe_pickle import load_plain_pickle


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


def _jsonl_parts(folder: Path) -> list[Path]:
    parts = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith((".", "_")))
    if not parts:
        raise DataFormatError(folder, "JSON-lines part files {anonymous_cid, emb}", "an empty folder")
    return parts


def _diagnose_jsonl(parts: list[Path], dim: int) -> None:
    """Raise a DataFormatError naming the first bad line of the part files; return if none."""
    expected = f'a JSON object {{"anonymous_cid": <{RAW_ID_TYPE}>, "emb": [{dim} floats]}}'
    for part in parts:
        with open(part, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    row = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise DataFormatError(part, expected, f"invalid JSON: {exc}", line=number) from None
                if not isinstance(row, dict):
                    raise DataFormatError(part, expected, str(raw[:120]), line=number)
                if parse_raw_id(row.get("anonymous_cid")) is None:
                    raise DataFormatError(part, expected, f"anonymous_cid {row.get('anonymous_cid')!r:.60}", line=number)
                emb = row.get("emb")
                if not isinstance(emb, list) or len(emb) != dim:
                    found = f"an embedding of length {len(emb)}" if isinstance(emb, list) else f"emb = {emb!r:.60}"
                    raise DataFormatError(part, expected, found, line=number)


def _diagnose_parquet(con: duckdb.DuckDBPyConnection, files: list[Path], source: EmbeddingSource) -> None:
    """Raise a DataFormatError naming the first bad row (file, row, value); return if none."""
    locate_bad_raw_id(con, files, "anonymous_cid")
    rows = con.execute(
        f"""SELECT filename, file_row_number, anonymous_cid IS NULL, len(emb)
            FROM read_parquet({files_sql(files)}, filename=true, file_row_number=true, union_by_name=true)
            WHERE emb IS NULL OR len(emb) <> {source.dim} OR anonymous_cid IS NULL
            ORDER BY filename, file_row_number LIMIT 1"""
    ).fetchall()
    if rows:
        filename, row, null_id, length = rows[0]
        if null_id:
            raise DataFormatError(filename, f"a non-null anonymous_cid ({RAW_ID_TYPE})", "null", row=int(row))
        raise DataFormatError(
            filename, f"an embedding of length {source.dim} (family {source.family})", f"length {length}", row=int(row)
        )


def _copy_sql(select_source: str, dim: int, out: Path) -> str:
    return f"""
        COPY (
            SELECT e.creative_id, ix.item_id, CAST(e.emb AS FLOAT[{dim}]) AS emb
            FROM ({select_source}) e LEFT JOIN stg_item_index ix USING (creative_id)
            ORDER BY e.creative_id
        ) TO '{out}' (FORMAT parquet, COMPRESSION zstd)
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
    parts = _jsonl_parts(source.path)
    # VARCHAR takes a JSON number and a JSON string alike; raw_id_sql keeps digits only.
    select = (
        f"SELECT {raw_id_sql('anonymous_cid')} AS creative_id, emb FROM read_json({files_sql(parts)}, "
        "format='newline_delimited', columns={anonymous_cid: 'VARCHAR', emb: 'FLOAT[]'})"
    )
    return select, partial(_diagnose_jsonl, parts, source.dim)


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
            except duckdb.Error as exc:
                diagnose()
                raise DataFormatError(source.path, f"family {source.family} embeddings", str(exc)) from exc
            # An id that is not digits is NULL after raw_id_sql: find it and name it.
            bad = con.execute(
                f"SELECT count(*) FROM read_parquet('{tmp}') WHERE creative_id IS NULL OR emb IS NULL"
            ).fetchall()[0][0]
            if bad:
                diagnose()
                raise DataFormatError(
                    source.path, f"family {source.family} embeddings, each with an id and a vector", f"{bad} rows without"
                )
        counts = con.execute(
            f"""SELECT count(*), count(item_id), count(*) - count(DISTINCT creative_id)
                FROM read_parquet('{tmp}')"""
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
    matrix = np.asarray(list(data.values()), dtype=np.float32).reshape(len(data), source.dim)
    table = pa.table(
        {"creative_id": ids, "emb": pa.FixedSizeListArray.from_arrays(matrix.reshape(-1), source.dim)}
    )
    con.register("_pickle_emb", table)
    try:
        con.execute(_copy_sql("SELECT creative_id, emb FROM _pickle_emb", source.dim, tmp))
    finally:
        con.unregister("_pickle_emb")


def read_embedding_matrix(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(creative_ids, item_ids with -1 for unknown, float32 matrix) of one family file."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    emb = table.column("emb").combine_chunks()
    dim = emb.type.list_size if pa.types.is_fixed_size_list(emb.type) else len(emb[0])
    matrix = emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)
    creative = table.column("creative_id").to_numpy()
    items = table.column("item_id").fill_null(-1).to_numpy()
    return creative, items, matrix
