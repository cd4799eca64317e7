"""Code versions follow the code (taac_dagster/code_versions.py): a change to a module changes
the version of exactly the assets whose step imports it, directly or not; comments, docstrings
and formatting change none."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from taac_dagster.code_versions import PACKAGES, code_version

REPO = Path(__file__).resolve().parents[1]
ASSETS = {  # asset module -> the data files its step reads, as the asset modules declare them
    "assets.raw": ["configs/tracks/*.yaml"],
    "assets.warehouse": ["configs/tracks/*.yaml", "sql/*.sql"],
    "assets.semantic_ids": ["configs/tracks/*.yaml"],
    "assets.training": ["configs/tracks/*.yaml", "configs/models/*.yaml"],
    "assets.retrieval": ["configs/tracks/*.yaml", "configs/models/*.yaml"],
    "assets.evaluation": ["configs/tracks/*.yaml", "configs/models/*.yaml"],
}


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    for folder in (*PACKAGES, "sql", "configs"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def versions(root: Path) -> dict[str, str]:
    return {name: code_version("v", name, data_files=files, root=root) for name, files in ASSETS.items()}


def test_the_definitions_use_these_versions():
    from taac_dagster.definitions import defs

    graph = defs.resolve_asset_graph()
    by_key = {key.to_user_string(): graph.get(key).code_version for key in graph.get_all_asset_keys()}
    assert by_key["encoder_checkpoint"].startswith("training-")
    assert by_key["encoder_checkpoint"].split("-")[-1] == versions(REPO)["assets.training"].split("-")[-1]
    assert by_key["events"] == by_key["sequences"]  # one multi-asset, one step, one version


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def test_a_change_to_the_encoder_marks_exactly_the_steps_that_run_it(repo_copy):
    before = versions(repo_copy)
    encoder = repo_copy / "models" / "encoder.py"
    encoder.write_text(encoder.read_text() + "\n# a comment only\n")  # a comment: nothing changes
    assert versions(repo_copy) == before
    encoder.write_text(encoder.read_text() + "\nUNUSED_CONSTANT = 1\n")  # code: the steps that import it change
    after = versions(repo_copy)
    changed = {name for name in ASSETS if after[name] != before[name]}
    assert changed == {"assets.training", "assets.retrieval", "assets.evaluation"}


def test_sql_and_preset_files_count_for_the_steps_that_read_them(repo_copy):
    before = versions(repo_copy)
    edit(repo_copy / "sql" / "events.sql", "SELECT", "SELECT /* changed */")
    assert {n for n, v in versions(repo_copy).items() if v != before[n]} == {"assets.warehouse"}
    before = versions(repo_copy)
    preset = repo_copy / "configs" / "models" / "default.yaml"
    preset.write_text(preset.read_text() + "\n# tuned\n")
    assert {n for n, v in versions(repo_copy).items() if v != before[n]} == {
        "assets.training", "assets.retrieval", "assets.evaluation"
    }
