"""A corpus of broken copies of the real demo sample, one defect each, in both formats.

Each ``Defect`` damages a fresh copy of the sample (competition JSONL, or its Hub-parquet
form from ``conftest.write_demo_as_hub``) and says what the data stage must answer:

- ``reader``: a ``DataFormatError`` naming the file, the line (JSONL) or row (parquet), the
  field when there is one, and phrases of what was expected and found;
- ``check``: the blocking data-quality checks named in ``checks`` fail, and their message holds
  the phrases (the offending ids and where in the input they came from).

Nothing else may come out: a raw DuckDB, pyarrow or Python exception is a bug.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from taac_dagster.formats import HUB_SEQ_EVENT

JSONL, HUB = "jsonl", "hub"
INT64_OVER = 2**63  # one past the largest BIGINT


@dataclass(frozen=True)
class Defect:
    name: str
    format: str
    damage: Callable[[Path], None]
    stage: str  # "reader" or "check"
    file: str | None = None  # the file the error names, relative to the dataset root
    line: int | None = None
    row: int | None = None
    field: str | None = None
    phrases: tuple[str, ...] = ()
    checks: tuple[str, ...] = ()
    track: str = "1M"

    def __str__(self) -> str:
        return f"{self.format}:{self.name}"


# --- JSONL helpers ------------------------------------------------------------------------------
def _lines(root: Path) -> list[str]:
    return (root / "seq.jsonl").read_text().split("\n")


def _write_lines(root: Path, lines: list[str]) -> None:
    (root / "seq.jsonl").write_text("\n".join(lines))


def set_field(line: int, record: int, index: int, value: object) -> Callable[[Path], None]:
    """Damage: field ``index`` of record ``record`` on line ``line`` (1-based) becomes ``value``."""

    def damage(root: Path) -> None:
        lines = _lines(root)
        records = json.loads(lines[line - 1])
        records[record][index] = value
        lines[line - 1] = json.dumps(records)
        _write_lines(root, lines)

    return damage


def set_raw(line: int, old: str, new: str) -> Callable[[Path], None]:
    """Damage: replace the text ``old`` by ``new`` (once) on line ``line``."""

    def damage(root: Path) -> None:
        lines = _lines(root)
        assert old in lines[line - 1], (old, line)
        lines[line - 1] = lines[line - 1].replace(old, new, 1)
        _write_lines(root, lines)

    return damage


def duplicate_line(line: int) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        lines = _lines(root)
        _write_lines(root, [*lines, lines[line - 1]])

    return damage


def timestamps_in_milliseconds(root: Path) -> None:
    lines = []
    for text in _lines(root):
        records = json.loads(text)
        for record in records:
            if record[5] is not None:
                record[5] *= 1000
        lines.append(json.dumps(records))
    _write_lines(root, lines)


def no_clicks(root: Path) -> None:
    lines = []
    for text in _lines(root):
        records = json.loads(text)
        for record in records:
            if record[4] == 1:
                record[4] = 0
        lines.append(json.dumps(records))
    _write_lines(root, lines)


def profiles_only(root: Path) -> None:
    _write_lines(root, [json.dumps([r for r in json.loads(t) if r[2] is not None]) for t in _lines(root)])


def write_bytes(name: str, content: bytes) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        (root / name).write_bytes(content)

    return damage


def one_line(root: Path) -> None:
    """The file written without line breaks: every user's list on one line."""
    (root / "seq.jsonl").write_text("".join(_lines(root)))


def non_utf8(line: int) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        data = (root / "seq.jsonl").read_bytes().split(b"\n")
        data[line - 1] = data[line - 1].replace(b'"112"', b'"1\xff2"', 1)
        (root / "seq.jsonl").write_bytes(b"\n".join(data))

    return damage


class _Build:
    """Pickles a dict through BUILD: an object whose attributes the pickle sets."""

    def __reduce__(self):
        return (dict, (), {"attribute": 1})


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def indexer_with(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        with open(root / "indexer.pkl", "rb") as handle:
            indexer = pickle.load(handle)
        change(indexer)
        (root / "indexer.pkl").write_bytes(pickle.dumps(indexer))

    return damage


def _set_item_reid(indexer: dict, value: object) -> None:
    key = next(iter(indexer["i"]))
    indexer["i"][key] = value


def _set_item_key(indexer: dict, key: object) -> None:
    indexer["i"][key] = 1


EMB_PART = "creative_emb/emb_81_32/part-0000"


def emb_line(number: int, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        path = root / EMB_PART
        lines = path.read_text().split("\n")
        row = json.loads(lines[number - 1])
        change(row)
        lines[number - 1] = json.dumps(row)
        path.write_text("\n".join(lines))

    return damage


def _emb_element(row: dict, value: object) -> None:
    row["emb"][3] = value


def with_predict_set(change: Callable[[list[dict]], None] | None = None) -> Callable[[Path], None]:
    """Adds a predict_set.jsonl of a few real items (and applies ``change`` to its rows)."""

    def damage(root: Path) -> None:
        with open(root / "indexer.pkl", "rb") as handle:
            indexer = pickle.load(handle)
        rows = [
            {"creative_id": cid, "retrieval_id": i + 1, "features": {"100": 1}}
            for i, cid in enumerate(list(indexer["i"])[:20])
        ]
        if change:
            change(rows)
        (root / "predict_set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    return damage


# --- Hub helpers ------------------------------------------------------------------------------------
SEQ_PART = "seq/part-0.parquet"


def hub_seq_event(row: int, event: int, key: str, value: object) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        path = root / SEQ_PART
        table = pq.read_table(path)
        seqs = table.column("seq").to_pylist()
        seqs[row][event][key] = value
        pq.write_table(table.set_column(1, "seq", pa.array(seqs, pa.list_(HUB_SEQ_EVENT))), path)

    return damage


def hub_column(folder: str, column: str, array: Callable[[pa.ChunkedArray], pa.Array]) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        [path] = (root / folder).rglob("*.parquet")
        table = pq.read_table(path)
        index = table.column_names.index(column)
        pq.write_table(table.set_column(index, column, array(table.column(column))), path)

    return damage


def hub_duplicate_row(row: int) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        path = root / SEQ_PART
        table = pq.read_table(path)
        pq.write_table(pa.concat_tables([table, table.slice(row, 1)]), path)

    return damage


def hub_timestamps_ms(root: Path) -> None:
    path = root / SEQ_PART
    table = pq.read_table(path)
    seqs = [[{**e, "timestamp": e["timestamp"] * 1000} for e in seq] for seq in table.column("seq").to_pylist()]
    pq.write_table(table.set_column(1, "seq", pa.array(seqs, pa.list_(HUB_SEQ_EVENT))), path)


def hub_empty_seq(root: Path) -> None:
    path = root / SEQ_PART
    pq.write_table(pq.read_table(path).slice(0, 0), path)


def corrupt_page(relative: str) -> Callable[[Path], None]:
    """Damage: garble bytes inside the first data page, leaving the footer (schema) intact."""

    def damage(root: Path) -> None:
        path = root / relative
        data = bytearray(path.read_bytes())
        for i in range(1000, 1400):
            data[i] ^= 0x5A
        path.write_bytes(bytes(data))

    return damage


def hub_emb_row(row: int, change: Callable[[list], list]) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        [path] = (root / "mm_emb").rglob("*.parquet")
        table = pq.read_table(path)
        embs = table.column("emb").to_pylist()
        embs[row] = change(embs[row])
        pq.write_table(table.set_column(1, "emb", pa.array(embs, pa.list_(pa.float32()))), path)

    return damage


def _element(index: int, value: object) -> Callable[[list], list]:
    def change(vector: list) -> list:
        vector = list(vector)
        vector[index] = value
        return vector

    return change


# --- the corpus -------------------------------------------------------------------------------------
SEQ = "seq.jsonl"

CORPUS: list[Defect] = [
    # Competition JSONL: the type of every field of a record.
    Defect("fractional item id", JSONL, set_field(5, 2, 1, 1.5), "reader", SEQ, line=5, field="item_id",
           phrases=("record 2", "integer re-id", "found 1.5")),
    Defect("timestamp written as a string", JSONL, set_field(7, 0, 5, "1745813860"), "reader", SEQ, line=7,
           field="timestamp", phrases=("integer Unix seconds", '"1745813860" (a string)')),
    Defect("user id as a string", JSONL, set_field(2, 0, 0, "800"), "reader", SEQ, line=2, field="user_id",
           phrases=('"800"',)),
    Defect("item id 0 (padding)", JSONL, set_field(3, 4, 1, 0), "reader", SEQ, line=3, field="item_id",
           phrases=("from 1", "found 0")),
    Defect("item id beyond int64", JSONL, set_field(3, 4, 1, INT64_OVER), "reader", SEQ, line=3, field="item_id",
           phrases=(str(INT64_OVER),)),
    Defect("negative timestamp", JSONL, set_field(4, 1, 5, -5), "reader", SEQ, line=4, field="timestamp",
           phrases=("found -5",)),
    Defect("timestamp with a fraction", JSONL, set_field(4, 1, 5, 1745813860.5), "reader", SEQ, line=4,
           field="timestamp", phrases=("1745813860.5",)),
    Defect("action type 2 on the 1M track", JSONL, set_field(3, 1, 4, 2), "reader", SEQ, line=3, field="action_type",
           phrases=("one of 0, 1", "found 2")),
    Defect("action type 7 on the 10M track", JSONL, set_field(3, 1, 4, 7), "reader", SEQ, line=3,
           field="action_type", phrases=("one of 0, 1, 2", "found 7"), track="10M"),
    Defect("action type as a boolean", JSONL, set_field(3, 1, 4, True), "reader", SEQ, line=3, field="action_type",
           phrases=("true",)),
    Defect("item feature value as a string", JSONL, set_raw(6, '"100": 6', '"100": "6"'), "reader", SEQ, line=6,
           field="item_feature", phrases=('"100": "6"',)),
    Defect("item feature value with a fraction", JSONL, set_raw(6, '"100": 6', '"100": 6.5'), "reader", SEQ, line=6,
           field="item_feature", phrases=("6.5",)),
    Defect("item features as a list", JSONL, set_field(6, 0, 3, [6, 18]), "reader", SEQ, line=6, field="item_feature",
           phrases=("[6, 18] (a list)",)),
    Defect("sparse user feature as a list", JSONL, set_raw(1, '"103": 46', '"103": [46]'), "reader", SEQ, line=1,
           field="user_feature", phrases=("single integer re-id",)),
    Defect("multi-valued user feature with a fraction", JSONL, set_raw(5, '"106": [4, 7, 3]', '"106": [4, 7.5, 3]'),
           "reader", SEQ, line=5, field="user_feature", phrases=("7.5",)),
    Defect("user-profile record with an item", JSONL, set_field(2, 98, 1, 5), "reader", SEQ, line=2, field="item_id",
           phrases=("null in a user-profile record",)),
    Defect("record with 5 fields", JSONL, lambda root: _edit_records(root, 7, lambda r: r[2].pop()), "reader", SEQ,
           line=7, phrases=("record 2", "6 fields", "5 fields instead of 6")),
    Defect("record that is not a list", JSONL, lambda root: _edit_records(root, 8, lambda r: r.__setitem__(3, {"user": 1})),
           "reader", SEQ, line=8, phrases=("record 3", "not a list")),
    Defect("another user inside a line", JSONL, set_field(9, 3, 0, 640), "reader", SEQ, line=9, field="user_id",
           phrases=("one user per line", "found 640")),
    Defect("line that is an object", JSONL, lambda root: _replace_line(root, 3, '{"user": 320}'), "reader", SEQ,
           line=3, phrases=("a JSON object",)),
    Defect("empty line list", JSONL, lambda root: _replace_line(root, 4, "[]"), "reader", SEQ, line=4,
           phrases=("an empty list",)),
    Defect("truncated last line", JSONL, lambda root: _truncate_last(root), "reader", SEQ, line=88,
           phrases=("invalid JSON", "truncated")),
    Defect("non-UTF-8 bytes", JSONL, non_utf8(4), "reader", SEQ, line=4, phrases=("not UTF-8", "\\xff")),
    Defect("file written as one huge line", JSONL, one_line, "reader", SEQ, line=1,
           phrases=("more than one JSON value on the line",)),
    Defect("empty seq.jsonl", JSONL, write_bytes("seq.jsonl", b""), "reader", SEQ, phrases=("an empty file",)),
    Defect("seq.jsonl of blank lines", JSONL, write_bytes("seq.jsonl", b"\n\n  \n"), "reader", SEQ,
           phrases=("no records",)),
    # indexer.pkl
    Defect("empty indexer.pkl", JSONL, write_bytes("indexer.pkl", b""), "reader", "indexer.pkl",
           phrases=("an empty file",)),
    Defect("pickle whose opcodes build objects", JSONL,
           write_bytes("indexer.pkl", pickle.dumps({"u": {}, "i": _Build(), "f": {}}, protocol=2)), "reader",
           "indexer.pkl", phrases=("opcodes that build objects",)),
    Defect("pickle that runs code", JSONL, write_bytes("indexer.pkl", pickle.dumps({"u": _Exploit()})), "reader",
           "indexer.pkl", phrases=("refused for safety", "system")),
    Defect("garbage indexer.pkl", JSONL, write_bytes("indexer.pkl", b"\x80\x04garbage"), "reader", "indexer.pkl",
           phrases=("valid pickle",)),
    Defect("indexer re-id as a string", JSONL, indexer_with(lambda ix: _set_item_reid(ix, "5")), "reader",
           "indexer.pkl", phrases=("indexer['i']", "re-ids", "'5'")),
    Defect("indexer re-id beyond int64", JSONL, indexer_with(lambda ix: _set_item_reid(ix, INT64_OVER)), "reader",
           "indexer.pkl", phrases=("indexer['i']", str(INT64_OVER))),
    Defect("indexer creative id that is not digits", JSONL, indexer_with(lambda ix: _set_item_key(ix, "cid_x")),
           "reader", "indexer.pkl", phrases=("indexer['i']", "'cid_x'")),
    Defect("indexer feature map that is a list", JSONL, indexer_with(lambda ix: ix["f"].__setitem__("100", [1])),
           "reader", "indexer.pkl", phrases=("indexer['f']['100']",)),
    # creative_emb (JSON lines)
    Defect("embedding element as a string", JSONL, emb_line(10, lambda r: _emb_element(r, "0.5")), "reader", EMB_PART,
           line=10, field="emb", phrases=('element 3 = "0.5"',)),
    Defect("embedding element null", JSONL, emb_line(11, lambda r: _emb_element(r, None)), "reader", EMB_PART,
           line=11, field="emb", phrases=("element 3 = null",)),
    Defect("embedding of the wrong length", JSONL, emb_line(12, lambda r: r.__setitem__("emb", r["emb"][:31])),
           "reader", EMB_PART, line=12, field="emb", phrases=("length 31",)),
    Defect("embedding id with a fraction", JSONL, emb_line(13, lambda r: r.__setitem__("anonymous_cid", 1.5)),
           "reader", EMB_PART, line=13, field="anonymous_cid", phrases=("1.5",)),
    Defect("empty embedding part", JSONL, write_bytes(EMB_PART, b""), "reader", EMB_PART, phrases=("an empty file",)),
    # predict_set.jsonl
    Defect("candidate id with a fraction", JSONL,
           with_predict_set(lambda rows: rows[4].__setitem__("creative_id", 1.5)), "reader", "predict_set.jsonl",
           line=5, field="creative_id", phrases=("1.5",)),
    Defect("candidate feature as a string", JSONL,
           with_predict_set(lambda rows: rows[2].__setitem__("features", {"100": "x"})), "reader",
           "predict_set.jsonl", line=3, field="features", phrases=('"x"',)),
    Defect("empty predict_set.jsonl", JSONL, write_bytes("predict_set.jsonl", b""), "reader", "predict_set.jsonl",
           phrases=("an empty file",)),
    # Invariants over whole tables: the checks name the ids and where they came from.
    Defect("a user on two lines", JSONL, duplicate_line(10), "check",
           checks=("events_valid", "sequences_valid", "holdout_valid"), phrases=("user 641", "seq.jsonl line 10", "line 89")),
    Defect("timestamps in milliseconds", JSONL, timestamps_in_milliseconds, "check", checks=("events_valid",),
           phrases=("not plausible as Unix seconds", "Milliseconds?", "seq.jsonl line")),
    Defect("no user ever clicks", JSONL, no_clicks, "check", checks=("holdout_valid",),
           phrases=("table holdout is empty", "no user has a target")),
    Defect("no interaction records", JSONL, profiles_only, "check", checks=("events_valid",),
           phrases=("table events is empty",)),
    Defect("NaN in an embedding", JSONL, emb_line(20, lambda r: _emb_element(r, float("nan"))), "check",
           checks=("embeddings_valid",), phrases=("NaN", "creative ids", "creative_emb/emb_81_32")),
    # Hub parquet.
    Defect("uint64 user ids", HUB, hub_column("seq", "user_id", lambda c: pa.array(c.to_pylist(), pa.uint64())),
           "reader", SEQ_PART, phrases=("column 'user_id'", "not uint64", "found type uint64")),
    Defect("action type 2 on the 1M track", HUB, hub_seq_event(2, 1, "action_type", 2), "reader", SEQ_PART, row=2,
           field="seq[1].action_type", phrases=("one of 0, 1", "found 2")),
    Defect("action type beyond INTEGER", HUB, hub_seq_event(2, 1, "action_type", 2**40), "reader", SEQ_PART, row=2,
           field="seq[1].action_type", phrases=(str(2**40),)),
    Defect("item id 0 (padding)", HUB, hub_seq_event(4, 3, "item_id", 0), "reader", SEQ_PART, row=4,
           field="seq[3].item_id", phrases=("from 1", "found 0")),
    Defect("negative timestamp", HUB, hub_seq_event(5, 0, "timestamp", -1), "reader", SEQ_PART, row=5,
           field="seq[0].timestamp", phrases=("found -1",)),
    Defect("null user id", HUB, hub_column("seq", "user_id", lambda c: pa.array([None, *c.to_pylist()[1:]], pa.int64())),
           "reader", SEQ_PART, row=0, phrases=("non-null user_id",)),
    Defect("empty seq file", HUB, hub_empty_seq, "reader", SEQ_PART, phrases=("an empty file (0 rows)",)),
    Defect("timestamp column of strings", HUB,
           lambda root: pq.write_table(
               pq.read_table(root / SEQ_PART).set_column(
                   1, "seq",
                   pa.array([[{**e, "timestamp": str(e["timestamp"])} for e in s] for s in pq.read_table(root / SEQ_PART).column("seq").to_pylist()],
                            pa.list_(pa.struct([("item_id", pa.int64()), ("action_type", pa.int64()), ("timestamp", pa.string())])))),
               root / SEQ_PART),
           "reader", SEQ_PART, phrases=("column 'seq'", "timestamp: string")),
    Defect("item feature of floats", HUB, hub_column("item_feat", "100", lambda c: pa.array(c.to_pylist(), pa.float64())),
           "reader", "item_feat/part-0.parquet", phrases=("column '100'", "found type double")),
    Defect("user feature list of floats", HUB,
           hub_column("user_feat", "106", lambda c: pa.array(c.to_pylist(), pa.list_(pa.float64()))), "reader",
           "user_feat/part-0.parquet", phrases=("column '106'", "list<element: double>")),
    Defect("corrupt data page", HUB, corrupt_page(SEQ_PART), "reader", SEQ_PART,
           phrases=("data DuckDB can read", "decompression")),
    Defect("not a parquet file", HUB, write_bytes("user_feat/part-0.parquet", b"not parquet"), "reader",
           "user_feat/part-0.parquet", phrases=("readable parquet file",)),
    Defect("embedding id that is not digits", HUB,
           hub_column("mm_emb", "anonymous_cid", lambda c: pa.array(["cid-17", *c.to_pylist()[1:]], pa.string())),
           "reader", "mm_emb/emb_81_32_parquet/part-0.parquet", row=0, phrases=("'cid-17'",)),
    Defect("embedding with a null element", HUB, hub_emb_row(7, _element(2, None)), "reader",
           "mm_emb/emb_81_32_parquet/part-0.parquet", row=7, field="emb", phrases=("1 null element",)),
    Defect("a user on two rows", HUB, hub_duplicate_row(9), "check", checks=("events_valid", "sequences_valid"),
           phrases=("seq/part-0.parquet row 9", "row 88")),
    Defect("timestamps in milliseconds", HUB, hub_timestamps_ms, "check", checks=("events_valid",),
           phrases=("not plausible as Unix seconds",)),
    Defect("NaN in an embedding", HUB, hub_emb_row(3, _element(0, float("nan"))), "check", checks=("embeddings_valid",),
           phrases=("NaN", "creative ids", "mm_emb/emb_81_32_parquet")),
    Defect("infinity in an embedding", HUB, hub_emb_row(5, _element(4, float("inf"))), "check",
           checks=("embeddings_valid",), phrases=("an infinity",)),
]


def _edit_records(root: Path, number: int, change: Callable[[list], object]) -> None:
    lines = _lines(root)
    records = json.loads(lines[number - 1])
    change(records)
    lines[number - 1] = json.dumps(records)
    _write_lines(root, lines)


def _replace_line(root: Path, number: int, text: str) -> None:
    lines = _lines(root)
    lines[number - 1] = text
    _write_lines(root, lines)


def _truncate_last(root: Path) -> None:
    lines = _lines(root)
    lines[-1] = lines[-1][: len(lines[-1]) // 2]
    _write_lines(root, lines)


# Valid controls: real data the stage must accept as it is.
VALID_CONTROLS: list[tuple[str, str, Callable[[Path], None]]] = [
    ("the demo sample", JSONL, lambda root: None),
    ("the demo sample with a published pool", JSONL, with_predict_set()),
    ("the demo sample with blank lines and CRLF line ends", JSONL,
     lambda root: (root / "seq.jsonl").write_text("\n\n".join(_lines(root)).replace("\n", "\r\n") + "\r\n")),
    ("the demo sample with embedding ids as strings", JSONL,
     emb_line(1, lambda r: r.__setitem__("anonymous_cid", str(r["anonymous_cid"])))),
    ("the demo sample in the Hub layout", HUB, lambda root: None),
    ("the Hub layout with int32 ids", HUB, hub_column("seq", "user_id", lambda c: pa.array(c.to_pylist(), pa.int32()))),
]
