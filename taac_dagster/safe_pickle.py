"""Load pickles from outside (``indexer.pkl``) without running arbitrary code."""

from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path
from typing import Any

from taac_dagster.errors import DataFormatError

# (module, name) pairs a plain-data pickle may reference. Builtin containers and scalars need
# no global; defaultdict does, and its default factory is one of the plain types. OrderedDict
# loads as a plain dict (ordered too): none of these types has a __dict__, so an opcode that
# would set attributes on an object (BUILD) fails and is reported instead of obeyed.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "defaultdict"): collections.defaultdict,
    ("collections", "OrderedDict"): dict,
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
                self._source, _PLAIN, f"a reference to {module}.{name}, which is refused for safety"
            ) from None


_PLAIN = "a pickle of plain containers (dict, list, defaultdict) of ints, strings and floats"


def load_plain_pickle(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, _PLAIN, "no such file")
    if path.stat().st_size == 0:
        raise DataFormatError(path, _PLAIN, "an empty file (0 bytes)")
    with open(path, "rb") as handle:
        try:
            return RestrictedUnpickler(handle, path).load()
        except DataFormatError:
            raise
        except (pickle.UnpicklingError, EOFError) as exc:
            raise DataFormatError(path, "a valid pickle file", f"unreadable data ({exc})") from None
        except (AttributeError, TypeError) as exc:
            raise DataFormatError(
                path, _PLAIN, f"opcodes that build objects plain data does not have ({type(exc).__name__}: {exc})"
            ) from None
        except Exception as exc:  # anything an allowed constructor raises on crafted arguments
            raise DataFormatError(path, "a valid pickle file", f"unreadable data ({type(exc).__name__}: {exc})") from None


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
