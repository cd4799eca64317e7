from __future__ import annotations

import collections
import os
import pickle

import pytest

from taac_dagster.errors import DataFormatError
from taac_dagster.safe_pickle import load_indexer, load_plain_pickle


def test_real_indexer_loads(demo_dir):
    indexer = load_indexer(demo_dir / "indexer.pkl")
    assert len(indexer["i"]) == 58734 and len(indexer["u"]) == 865
    assert isinstance(indexer["f"], collections.defaultdict)
    assert indexer["i"][20002650278] == 1


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_code_execution_is_refused(tmp_path):
    path = tmp_path / "indexer.pkl"
    path.write_bytes(pickle.dumps({"u": {}, "i": _Exploit(), "f": {}}))
    with pytest.raises(DataFormatError) as err:
        load_plain_pickle(path)
    assert "system" in str(err.value) and "refused" in str(err.value) and str(path) in str(err.value)


def test_numpy_objects_are_refused(tmp_path):
    np = pytest.importorskip("numpy")
    path = tmp_path / "emb.pkl"
    path.write_bytes(pickle.dumps({1: np.zeros(3)}))
    with pytest.raises(DataFormatError, match="refused"):
        load_plain_pickle(path)


def test_wrong_shape_and_garbage(tmp_path):
    path = tmp_path / "indexer.pkl"
    path.write_bytes(pickle.dumps({"u": {}, "i": {}}))
    with pytest.raises(DataFormatError, match="missing \\['f'\\]"):
        load_indexer(path)
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DataFormatError, match="a dict with keys"):
        load_indexer(path)
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataFormatError, match="valid pickle"):
        load_indexer(path)
