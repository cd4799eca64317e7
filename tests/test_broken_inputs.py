"""The data stage on a corpus of broken copies of the real demo sample (tests/broken_inputs.py):
every defect gets a clear error naming where it is, never a raw exception, and nothing is
published; the valid controls build and pass every blocking check."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from taac_dagster.errors import DataFormatError
from taac_dagster.paths import TrackPaths
from taac_dagster.settings import load_settings
from taac_dagster.warehouse import BlockingChecksFailed, build_checked_warehouse

from .broken_inputs import CORPUS, HUB, VALID_CONTROLS, Defect
from .conftest import DEMO_FIXTURE


def _copy(kind: str, tmp_path: Path, demo_hub_dir: Path) -> Path:
    target = tmp_path / "dataset"
    shutil.copytree(DEMO_FIXTURE if kind != HUB else demo_hub_dir, target)
    for path in target.rglob("*"):
        path.chmod(0o644 if path.is_file() else 0o755)
    return target


def _run(source: Path, tmp_path: Path, track: str):
    settings = load_settings(track, {"data_root": str(tmp_path / "data")})
    paths = TrackPaths(settings.data_root, track)
    return paths, build_checked_warehouse(source, paths, settings)


@pytest.mark.parametrize("defect", CORPUS, ids=str)
def test_broken_input_gets_a_clear_error(defect: Defect, tmp_path, demo_hub_dir):
    source = _copy(defect.format, tmp_path, demo_hub_dir)
    defect.damage(source)
    paths = TrackPaths(tmp_path / "data", defect.track)
    if defect.stage == "reader":
        with pytest.raises(DataFormatError) as err:
            _run(source, tmp_path, defect.track)
        error = err.value
        message = str(error)
        if defect.file:
            assert error.path == source / defect.file or str(source / defect.file) in message, message
        assert error.line == defect.line, message
        assert error.row == defect.row, message
        if defect.field:
            assert error.field == defect.field, message
        assert "expected" in message and "found" in message, message
    else:
        with pytest.raises(BlockingChecksFailed) as err:
            _run(source, tmp_path, defect.track)
        message = str(err.value)
        failed = {o.name for o in err.value.failed}
        assert set(defect.checks) <= failed, message
        assert err.value.rejected.is_file() and err.value.rejected.parent == paths.root / "rejected"
        assert str(err.value.rejected) in message
    for phrase in defect.phrases:
        assert phrase in message, (phrase, message)
    assert not paths.warehouse.exists(), "a failed build must publish nothing"


@pytest.mark.slow  # each a full checked warehouse build (~3 s here, 6 of them)
@pytest.mark.parametrize(("name", "kind", "prepare"), VALID_CONTROLS, ids=[f"{k}:{n}" for n, k, _ in VALID_CONTROLS])
def test_valid_controls_pass(name, kind, prepare, tmp_path, demo_hub_dir):
    source = _copy(kind, tmp_path, demo_hub_dir)
    prepare(source)
    paths, (summary, outcomes) = _run(source, tmp_path, "1M")
    assert summary.path == paths.warehouse and paths.warehouse.is_file()
    assert summary.row_counts["events"] == 7956 and summary.row_counts["users"] == 88
    assert {o.name for o in outcomes if not o.passed} == {"events_missing_action_types"}
