"""Tell which of the two real on-disk formats a folder holds."""

from __future__ import annotations

from pathlib import Path

from taac_dagster.errors import DataFormatError
from taac_dagster.formats import HUB_FORMAT, JSONL_FORMAT

_EXPECTED = (
    "a TencentGR dataset: either the Hub parquet layout (seq/*.parquet, user_feat/, item_feat/, "
    "indexer.pkl) or the competition JSONL layout (seq.jsonl, indexer.pkl)"
)


def detect_format(root: str | Path) -> str:
    root = Path(root)
    if not root.exists():
        raise DataFormatError(root, _EXPECTED, "no such file or folder")
    if not root.is_dir():
        raise DataFormatError(root, _EXPECTED, "a file, not a folder")
    has_indexer = (root / "indexer.pkl").is_file()
    hub_parts = any((root / "seq").glob("*.parquet")) if (root / "seq").is_dir() else False
    jsonl = (root / "seq.jsonl").is_file()
    if hub_parts and has_indexer:
        return HUB_FORMAT
    if jsonl and has_indexer:
        return JSONL_FORMAT
    listing = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())[:20]
    found = "entries " + (", ".join(listing) if listing else "(empty folder)")
    if (hub_parts or jsonl) and not has_indexer:
        found += "; indexer.pkl is missing"
    raise DataFormatError(root, _EXPECTED, found)
