"""Small crafted pickles that would cost far more than their size: refused, quickly, by name."""

from __future__ import annotations

import collections
import pickle
import struct

import pytest

from taac_dagster.errors import DataFormatError
from taac_dagster.safe_pickle import MAX_EXPANSION, load_indexer, load_plain_pickle


def test_shared_references_are_refused_before_they_are_converted(tmp_path):
    # One 10K-element list under 100K keys: ~0.66 MB of memo fetches, 1e9 values once numpy or
    # Arrow converts it (8 GB as float64).
    path = tmp_path / "emb_81_10000.pkl"
    shared = [0.5] * 10_000
    path.write_bytes(pickle.dumps({cid: shared for cid in range(100_000)}, protocol=4))
    with pytest.raises(DataFormatError) as err:
        load_plain_pickle(path)
    message = str(err.value)
    assert str(path) in message and f"at most {MAX_EXPANSION} values per byte" in message
    assert "shared references" in message


def test_legitimate_sharing_still_loads(tmp_path):
    # Repeated short strings come back as memo fetches from any pickler: that stays loadable.
    path = tmp_path / "indexer.pkl"
    vocab = {str(v): v + 1 for v in range(50)}
    path.write_bytes(pickle.dumps({"u": {"a": 1}, "i": {7: 1}, "f": {fid: dict(vocab) for fid in "abcd"}}))
    assert load_indexer(path)["f"]["d"]["49"] == 50


def test_colliding_integer_keys_are_refused_at_the_first_one(tmp_path):
    # Python hashes an int modulo 2**61 - 1: 16K multiples of it share one hash, and building the
    # dict compared each key with all before it (quadratic: seconds for this 220 KB file).
    modulus = 2**61 - 1
    path = tmp_path / "indexer.pkl"
    path.write_bytes(pickle.dumps({"u": {}, "i": {modulus * (k + 1): 1 for k in range(16_000)}, "f": {}}, protocol=4))
    with pytest.raises(DataFormatError, match="an integer outside the 64-bit range at byte") as err:
        load_indexer(path)
    assert str(path) in str(err.value)
    # Refused at the first integer past 2**64 (the 8th key), not after reading the dict.
    assert int(str(err.value).rsplit("at byte ", 1)[1]) < 200


def test_colliding_tuple_keys_and_calls_that_build_values_are_refused(tmp_path):
    # Tuples of integers that share hashes share the tuple's hash too; int(text, 16) makes the
    # wide integers back; str() of a shared structure builds its expansion inside the load.
    modulus = 2**61 - 1
    cases = {
        "tuple keys": pickle.dumps({(k % 4 * modulus, k // 4 % 4 * modulus, k // 16): 1 for k in range(64)}),
        "int(text, 16)": b"\x80\x04\x8c\x08builtins\x8c\x03int\x93\x8c\x04ffff\x8c\x0216\x86R.",
        "str(list)": b"\x80\x04\x8c\x08builtins\x8c\x03str\x93]\x85R.",
        "set": pickle.dumps({1, 2}),
    }
    for name, data in cases.items():
        path = tmp_path / "indexer.pkl"
        path.write_bytes(data)
        with pytest.raises(DataFormatError, match="expected a pickle of plain containers") as err:
            load_plain_pickle(path)
        assert str(path) in str(err.value), name


def test_a_memo_slot_far_past_the_data_is_refused(tmp_path):
    # LONG_BINPUT 2**24 in a 9-byte file: the unpickler sized its memo to it (128 MB; 2**27: 2 GB).
    path = tmp_path / "indexer.pkl"
    path.write_bytes(b"\x80\x04N" + b"r" + struct.pack("<I", 2**24) + b".")
    with pytest.raises(DataFormatError, match="memo slot 16777216 at byte 3, past the 0 objects"):
        load_plain_pickle(path)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_containers_load_at_every_protocol(tmp_path, protocol):
    path = tmp_path / "indexer.pkl"
    data = {
        "u": collections.OrderedDict({"user_1": 1}),
        "i": {2**63: 1, -(2**63): 2},  # 64-bit either way: the staging names a bad re-id itself
        "f": collections.defaultdict(dict, {"100": {"x": 1}}),
        "e": [[0.5, -1.0], [1e300, 0.0]],
        "n": collections.defaultdict(None),
    }
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    loaded = load_indexer(path)
    assert loaded == data
    assert isinstance(loaded["f"], collections.defaultdict) and loaded["f"].default_factory is dict
