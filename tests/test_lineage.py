"""An asset's deps follow what its step reads: every warehouse table named in the SQL of the
step modules an asset runs (the project modules its own module imports, through others
included) is written by one of its deps, and a step that declares ``TABLES_READ`` declares all
it reads. Read from the source, so a query of a new table without its dep fails here."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
from dagster import AssetsDefinition

from taac_dagster.code_versions import module_closure
from taac_dagster.lineage import TABLE_ASSETS, table_deps

SQL_TABLE = re.compile(r"\b(?:FROM|JOIN)\s+([A-Za-z_]\w*)", re.I)
PLACEHOLDER_AFTER_FROM = re.compile(r"\b(?:FROM|JOIN)\s+$", re.I)
ASSET_MODULES = ("assets.semantic_ids", "assets.training", "assets.retrieval", "assets.evaluation")


def tables_in_source(source: str, names: dict[str, object]) -> set[str]:
    """Warehouse tables a module's SQL names: ``FROM x`` / ``JOIN x`` in its strings, an
    f-string's ``FROM {NAME}`` when NAME is one of the module's string constants, and a string
    that is exactly a table's name (a table handed to a query helper)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            if text in TABLE_ASSETS:
                found.add(text)
            found.update(SQL_TABLE.findall(text))
        elif isinstance(node, ast.JoinedStr):
            before = ""
            for part in node.values:
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    before = part.value
                elif isinstance(part, ast.FormattedValue) and isinstance(part.value, ast.Name) \
                        and PLACEHOLDER_AFTER_FROM.search(before) and isinstance(names.get(part.value.id), str):
                    found.add(str(names[part.value.id]))
    return found & set(TABLE_ASSETS)


def step_tables(module_name: str) -> set[str]:
    module = importlib.import_module(module_name)
    return tables_in_source(Path(str(module.__file__)).read_text(), vars(module))


def steps_run_by(asset_module: str) -> list[str]:
    return sorted(name for name in module_closure([asset_module]) if name.startswith("taac_dagster.steps"))


@pytest.mark.parametrize("asset_module", ASSET_MODULES)
def test_every_table_a_step_reads_is_written_by_a_dep(asset_module):
    read = set().union(*(step_tables(name) for name in steps_run_by(asset_module)))
    needed = {key.to_user_string() for key in table_deps(sorted(read))}
    assets = [value for value in vars(importlib.import_module(asset_module)).values() if isinstance(value, AssetsDefinition)]
    assert assets and read
    for definition in assets:
        for key in definition.keys:
            deps = {dep.to_user_string() for dep in definition.asset_deps[key]}
            missing = needed - deps - {key.to_user_string()}  # a step reads back what it writes
            assert missing == set(), f"{key.to_user_string()} reads tables whose assets are not its deps"


@pytest.mark.parametrize("step", ["taac_dagster.steps.arrays", "taac_dagster.steps.semantic_ids"])
def test_a_step_declares_every_table_it_reads(step):
    # ... and no more: each declared table is read there, so a dep is never a blanket one.
    assert step_tables(step) == set(importlib.import_module(step).TABLES_READ)


def test_the_scan_finds_a_query_a_constant_and_a_helper_argument():
    source = '''
TABLE = "holdout"
a = "SELECT x FROM events JOIN users USING (user_id)"
b = f"SELECT * FROM {TABLE} WHERE true"
c = read(con, "candidates")
d = "SELECT 1 FROM duckdb_tables()"
'''
    assert tables_in_source(source, {"TABLE": "holdout"}) == {"events", "users", "holdout", "candidates"}


def test_an_unknown_table_has_no_dep():
    with pytest.raises(KeyError, match="no asset writes the table 'scratch'"):
        table_deps(["scratch"])
