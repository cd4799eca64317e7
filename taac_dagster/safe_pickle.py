"""Load pickles from outside (``indexer.pkl``) without running arbitrary code."""

from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path
from typing import Any

from taac_dagster.errors import DataFormatError

# (module, name) pairs a plain-data pickle may reference. Builtin containers and scalars need
# no global; defaultdict does, and its default factory is one of the plain types.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "defaultdict"): collections.defaultdict,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "int"): int,
    ("builtins", "str"): str,
    ("builtins", "float"): float,
    ("__builtin__", "dict"): dict,
    ("__builtin__", "list"): list,
    ("__builtin__", "int"): int,
    ("__builtin__", "str"): str,
    ("__builtin__", "float"): float,
}


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: Path) -> None:
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataFormatError(
                self._source,
                "a pickle of plain containers (dict, list, defaultdict) of ints, strings "
                "and floats",
                f"a reference to {module}.{name}, which is refused for safety",
            ) from None


def load_plain_pickle(path: str | Path) -> Any:
    path = Path(path)
    with open(path, "rb") as handle:
        try:
            return RestrictedUnpickler(handle, path).load()
        except DataFormatError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
            raise DataFormatError(path, "a valid pickle file", f"unreadable data ({exc})") from exc


def load_indexer(path: str | Path) -> dict[str, Any]:
    """Load and shape-check ``indexer.pkl``: ``{'u': {...}, 'i': {...}, 'f': {fid: {...}}}``."""
    path = Path(path)
    data = load_plain_pickle(path)
    if not isinstance(data, dict):
        raise DataFormatError(path, "a dict with keys 'u', 'i', 'f'", type(data).__name__)
    missing = [key for key in ("u", "i", "f") if key not in data]
    if missing:
        raise DataFormatError(
            path, "a dict with keys 'u', 'i', 'f'", f"keys {sorted(map(str, data))} (missing {missing})"
        )
    for key in ("u", "i", "f"):
        if not isinstance(data[key], dict):
            raise DataFormatError(path, f"indexer[{key!r}] to be a dict", type(data[key]).__name__)
    for fid, vocab in data["f"].items():
        if not isinstance(vocab, dict):
            raise DataFormatError(path, f"indexer['f'][{fid!r}] to be a dict", type(vocab).__name__)
    return data
