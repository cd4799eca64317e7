"""Load pickles from outside (``indexer.pkl``) without running arbitrary code.

Refusing code is not enough: a few kilobytes of opcodes can also ask for gigabytes or for
hours. So, before the C unpickler runs, ``_check_opcodes`` reads every opcode once and refuses
the three ways a small file costs far more than its size:

* a memo slot far beyond the objects stored so far (``LONG_BINPUT 2**27`` makes the unpickler
  size its memo at 2 GB);
* dict keys that hash alike: Python's hash of an int is the int modulo 2**61 - 1, so thousands
  of integers beyond 64 bits, or tuples of integers, can share one hash and each insertion
  compares against all the keys before it (quadratic: a 220 KB file took seconds). Ids and
  re-ids fit in 64 bits (int64 or uint64), where at most 14 integers share a hash, and plain
  data has no tuple of two or more items nor sets;
* shared references: one list stored once and fetched from the memo 100K times costs bytes
  here and gigabytes to whoever converts the data (numpy, Arrow). ``_check_expansion`` counts
  every value as often as it is referenced and refuses more than ``MAX_EXPANSION`` per byte.

Loading calls only ``defaultdict(factory)`` and ``OrderedDict()`` (``_Global``): a call such as
``str(x)`` or ``list(x)`` on a shared structure would build the expansion inside the load.
"""

from __future__ import annotations

import collections
import io
import pickle
import pickletools
from pathlib import Path
from typing import Any

from taac_dagster.errors import DataFormatError

_PLAIN = "a pickle of plain containers (dict, list, defaultdict) of ints, strings and floats"
_VALID = "a valid pickle file"

# Values (elements, entries, characters), each counted as often as it is referenced, allowed per
# byte of file. Without sharing a value costs at least one byte (an int 2, a float 9); a few
# shared short strings stay far below this, a vector shared by thousands of keys does not.
MAX_EXPANSION = 8


class _Global:
    """A class a pickle names (``find_class``). It may be a defaultdict's default factory; the
    load may call only ``defaultdict(factory)`` and ``dict()`` (an OrderedDict, loaded as a
    plain dict, ordered too) on it, which make empty containers."""

    __slots__ = ("cls",)

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def __call__(self, *args: Any) -> Any:
        if self.cls is dict and not args:
            return {}
        if self.cls is collections.defaultdict and len(args) <= 1:
            factory = args[0] if args else None
            if factory is None or isinstance(factory, _Global):
                return collections.defaultdict(None if factory is None else factory.cls)
        raise TypeError(f"a call of {self.cls.__name__} with {len(args)} argument(s), which plain data does not make")


# (module, name) pairs a plain-data pickle may reference. Builtin containers and scalars need
# no global; defaultdict does, and its default factory is one of the plain types. None of these
# types has a __dict__, so an opcode that would set attributes on an object (BUILD) fails and
# is reported instead of obeyed.
_ALLOWED_GLOBALS: dict[tuple[str, str], type] = {
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
            return _Global(_ALLOWED_GLOBALS[(module, name)])
        except KeyError:
            raise DataFormatError(
                self._source, _PLAIN, f"a reference to {module}.{name}, which is refused for safety"
            ) from None


# --- Opcode tables for _check_opcodes, from pickletools' description of every opcode ----------
_LINE, _TWO_LINES = -1, -6  # argument: up to a newline; two such lines (GLOBAL, INST)
_LENGTH_BYTES = {  # argument: a length of this many bytes (signed or not), then that many bytes
    pickletools.TAKEN_FROM_ARGUMENT1: (1, False),
    pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
    pickletools.TAKEN_FROM_ARGUMENT4U: (4, False),
    pickletools.TAKEN_FROM_ARGUMENT8U: (8, False),
}
_OP = {op.name: ord(op.code) for op in pickletools.opcodes}
_ARG: dict[int, int] = {}  # opcode -> size of its argument, or _LINE, _TWO_LINES, a TAKEN_FROM_*
_DELTA: dict[int, int] = {}  # opcode -> change of the stack's depth
_TO_MARK: dict[int, int] = {}  # opcode that pops to the last mark -> items it leaves above the mark
for _op in pickletools.opcodes:
    _code = ord(_op.code)
    _ARG[_code] = _TWO_LINES if _op.arg and _op.arg.name == "stringnl_noescape_pair" else (_op.arg.n if _op.arg else 0)
    if pickletools.markobject in _op.stack_before:
        _TO_MARK[_code] = len(_op.stack_after) - _op.stack_before.index(pickletools.markobject)
    elif _op.name != "MARK":
        _DELTA[_code] = len(_op.stack_after) - len(_op.stack_before)
_REUSES = {_OP[name] for name in ("GET", "BINGET", "LONG_BINGET", "DUP")}
_SETS = {_OP[name] for name in ("EMPTY_SET", "ADDITEMS", "FROZENSET")}
_TEXT_INTS = {_OP["INT"], _OP["LONG"]}
_SLOT_STORES = {_OP["PUT"], _OP["LONG_BINPUT"]}  # a BINPUT's slot is one byte: at most 255
_TUPLES = {_OP["TUPLE"], _OP["TUPLE2"], _OP["TUPLE3"]}
_SHORT = {_OP[name] for name in ("SHORT_BINUNICODE", "SHORT_BINBYTES", "SHORT_BINSTRING", "LONG1")}  # 1-byte length
_MARK, _POP, _STOP, _PUT, _LONG1, _LONG4, _MEMOIZE, _BINPUT, _TUPLE = (
    _OP[name] for name in ("MARK", "POP", "STOP", "PUT", "LONG1", "LONG4", "MEMOIZE", "BINPUT", "TUPLE")
)
_MAYBE_NOT_PLAIN = _SETS | _TEXT_INTS | _TUPLES | {_LONG4}  # refused or not by their argument or the stack
_CHECKED = _REUSES | _SETS | _TEXT_INTS | _SLOT_STORES | _TUPLES | _SHORT | {_MARK, _POP, _STOP, _LONG4, _MEMOIZE, _BINPUT}
# opcode -> its size with its argument where nothing about it needs a look (most of a file), else 0
_SKIP = [1 + _ARG[c] if c in _DELTA and _ARG[c] >= 0 and c not in _CHECKED else 0 for c in range(256)]


def _is_64_bit(little_endian: bytes) -> bool:
    """Whether a LONG1 / LONG4 argument is an int64 or a uint64 (at most 14 such share a hash)."""
    return len(little_endian) <= 9 and -(2**63) <= int.from_bytes(little_endian, "little", signed=True) < 2**64


def _check_opcodes(data: bytes, path: Path) -> int:
    """Read every opcode of ``data`` once (linear) and refuse what would cost far more than the
    file (module docstring); returns how many times an object is used again (memo gets, DUP)."""
    pos, end, depth, stored, reuses = 0, len(data), 0, 0, 0
    marks: list[int] = []
    while pos < end:
        code = data[pos]
        if _SKIP[code]:
            pos += _SKIP[code]
            depth += _DELTA[code]
            continue
        if code in _SHORT and pos + 1 < end:  # strings and ids above 2**31: many, so first
            if code == _LONG1 and data[pos + 1] > 8 and not _is_64_bit(data[pos + 2 : pos + 2 + data[pos + 1]]):
                raise DataFormatError(path, _PLAIN, f"an integer outside the 64-bit range at byte {pos}")
            pos += 2 + data[pos + 1]
            depth += 1
            continue
        if code == _MEMOIZE or code == _BINPUT:
            pos += 1 if code == _MEMOIZE else 2
            stored += 1
            continue
        start = pos
        pos = _argument_end(data, code, start, path)
        if code in _REUSES:
            reuses += 1
        elif code in _SLOT_STORES:
            _check_memo_slot(data, code, start, pos, stored, path)
            stored += 1
        elif code in _MAYBE_NOT_PLAIN:
            _refuse_not_plain(data, code, start, pos, bool(marks) and depth - marks[-1] > 1, path)
        elif code == _MARK:
            marks.append(depth)
            continue
        elif code == _POP and marks and marks[-1] == depth:
            marks.pop()  # as the unpickler does: a POP right after a MARK drops the mark
            continue
        elif code == _STOP:
            return reuses
        if code in _TO_MARK:
            if not marks:
                raise DataFormatError(path, _VALID, f"unreadable data (opcode {code:#04x} at byte {start} without a mark)")
            depth = marks.pop() + _TO_MARK[code]
        else:
            depth += _DELTA[code]
    raise DataFormatError(path, _VALID, "truncated data (no STOP opcode)")


def _argument_end(data: bytes, code: int, start: int, path: Path) -> int:
    """Where the argument of the opcode at ``start`` ends; refuses an unknown opcode and an
    argument that runs past the end of ``data``."""
    arg, end = start + 1, len(data)
    kind = _ARG.get(code)
    if kind is None:
        raise DataFormatError(path, _VALID, f"unreadable data (opcode {code:#04x} at byte {start})")
    if kind >= 0:
        pos = arg + kind
    elif kind in (_LINE, _TWO_LINES):
        pos = data.find(b"\n", arg) + 1
        if kind == _TWO_LINES and pos:
            pos = data.find(b"\n", pos) + 1
        pos = pos or end + 1
    else:
        size, signed = _LENGTH_BYTES[kind]
        pos = arg + size + max(int.from_bytes(data[arg : arg + size], "little", signed=signed), 0)
    if pos > end:
        raise DataFormatError(path, _VALID, f"truncated data (opcode {code:#04x} at byte {start} runs past the end)")
    return pos


def _check_memo_slot(data: bytes, code: int, start: int, pos: int, stored: int, path: Path) -> None:
    """Refuse a memo store (PUT, LONG_BINPUT) to a slot past the ``stored`` objects before it."""
    arg = start + 1
    text = data[arg : pos - 1]
    slot = (int(text) if text.isdigit() else -1) if code == _PUT else int.from_bytes(data[arg:pos], "little")
    if not 0 <= slot <= stored:  # the unpickler sizes its memo to the slot, here or not
        raise DataFormatError(path, _PLAIN, f"memo slot {slot} at byte {start}, past the {stored} objects stored before it")


def _refuse_not_plain(data: bytes, code: int, start: int, pos: int, several_marked: bool, path: Path) -> None:
    """Refuse a set, an integer outside 64 bits, or a tuple of several items (``several_marked``:
    more than one item above the last mark, for a TUPLE)."""
    arg = start + 1
    if code in _SETS:
        raise DataFormatError(path, _PLAIN, f"a set at byte {start}")
    if code == _LONG4 and not _is_64_bit(data[arg + 4 : pos]):
        raise DataFormatError(path, _PLAIN, f"an integer outside the 64-bit range at byte {start}")
    if code in _TEXT_INTS:
        text = data[arg : pos - 1].rstrip(b"L")
        if len(text) > 21 or not text.lstrip(b"-").isdigit() or not -(2**63) <= int(text) < 2**64:
            raise DataFormatError(path, _PLAIN, f"an integer outside the 64-bit range at byte {start}")
    if code in _TUPLES and (code != _TUPLE or several_marked):
        raise DataFormatError(path, _PLAIN, f"a tuple of several items at byte {start}")


def _check_expansion(data: Any, path: Path, size: int) -> None:
    """Refuse ``data`` if its values, each counted as often as it is referenced (a shared list
    once per reference), exceed ``MAX_EXPANSION`` per byte of the file; stops at the limit."""
    limit = MAX_EXPANSION * size
    total, pending = 0, [data] if type(data) not in _SCALARS else []
    while pending:
        value = pending.pop()
        total += len(value)
        if total > limit:
            raise DataFormatError(
                path,
                f"at most {MAX_EXPANSION} values per byte of the file ({limit:,} for {size:,} bytes)",
                "more: shared references repeat the same containers or strings",
            )
        for group in (value.keys(), value.values()) if isinstance(value, dict) else (value,):
            if not isinstance(group, (str, bytes, bytearray)) and not set(map(type, group)) <= _SCALARS:
                pending.extend(v for v in group if type(v) not in _SCALARS)


_SCALARS = {int, float, bool, type(None), _Global}


def load_plain_pickle(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, _PLAIN, "no such file")
    data = path.read_bytes()
    if not data:
        raise DataFormatError(path, _PLAIN, "an empty file (0 bytes)")
    reuses = _check_opcodes(data, path)
    try:
        loaded = RestrictedUnpickler(io.BufferedReader(io.BytesIO(data)), path).load()
    except DataFormatError:
        raise
    except (pickle.UnpicklingError, EOFError) as exc:
        raise DataFormatError(path, _VALID, f"unreadable data ({exc})") from None
    except (AttributeError, TypeError) as exc:
        raise DataFormatError(
            path, _PLAIN, f"opcodes that build objects plain data does not have ({type(exc).__name__}: {exc})"
        ) from None
    except Exception as exc:  # anything an allowed constructor raises on crafted arguments
        raise DataFormatError(path, _VALID, f"unreadable data ({type(exc).__name__}: {exc})") from None
    if reuses:
        _check_expansion(loaded, path, len(data))
    return loaded


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
