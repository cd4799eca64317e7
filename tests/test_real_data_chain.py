"""Real data runs the whole chain: the demo sample (competition format, family 81 on 66 of
7,500 items) and the same sample without any embedding folder, each from raw_dataset to a
report and a submission on a real temporary Dagster instance."""

from __future__ import annotations

import json
import os
import shutil

import duckdb
import pytest
from dagster import AssetCheckSeverity, AssetKey, DagsterInstance, materialize

from assets.evaluation import evaluation_report, submission, user_vectors
from assets.raw import raw_dataset
from assets.retrieval import faiss_index
from assets.semantic_ids import COVERAGE_CHECK, semantic_id_codebooks
from assets.training import encoder_checkpoint
from assets.warehouse import warehouse_tables
from models.submission import read_submission
from taac_dagster.paths import TrackPaths
from taac_dagster.resources import TaacConfig

pytestmark = pytest.mark.slow

CHAIN = [raw_dataset, warehouse_tables, semantic_id_codebooks, encoder_checkpoint, faiss_index, user_vectors,
         evaluation_report, submission]
ENV = {"TAAC_TRAINING__THREADS": "1", "TAAC_TRAINING__VAL_USERS": "0"}
ALL_ASSETS = {"raw_dataset", "semantic_id_codebooks", "encoder_checkpoint", "faiss_index", "user_vectors",
            "evaluation_report", "submission"}


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """The demo sample as it is, and a copy without creative_emb/, each through the chain once."""
    from tests.conftest import DEMO_FIXTURE

    root = tmp_path_factory.mktemp("real_chain")
    without = root / "demo_without_embeddings"
    shutil.copytree(DEMO_FIXTURE, without, ignore=shutil.ignore_patterns("creative_emb"))
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("TAAC_")]:
            mp.delenv(key)
        for key, value in ENV.items():
            mp.setenv(key, value)
        with DagsterInstance.ephemeral(tempdir=str(root / "home")) as instance:
            for name, dataset in (("demo", DEMO_FIXTURE), ("no_embeddings", without)):
                # A few steps: what is checked is that real data reaches the end, not the model's
                # quality (a step of the full softmax over the sample's 7,500 items takes seconds).
                config = TaacConfig(
                    data_root=str(root / name), source="local", local_path=str(dataset), training={"max_steps": 4}
                )
                result = materialize(CHAIN, partition_key="1M", resources={"taac": config}, instance=instance)
                runs[name] = (result, TrackPaths(root / name, "1M"))
    return runs


def _metadata(result, name: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key == AssetKey(name)]
    return {key: value.value for key, value in event.materialization.metadata.items()}


def _reached_the_end(result, paths: TrackPaths) -> None:
    assert result.success
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert ALL_ASSETS <= materialized and "sequences" in materialized
    figures = json.loads((paths.reports / "evaluation.json").read_text())
    con = duckdb.connect(str(paths.warehouse), read_only=True)
    holdout_users = con.execute("SELECT count(*) FROM holdout").fetchall()[0][0]
    con.close()
    assert holdout_users > 0 and figures["provenance"]["users"] == holdout_users
    model = figures["methods"]["model"]
    assert model["score"] == pytest.approx(0.31 * model["hr@10"] + 0.69 * model["ndcg@10"])
    # No predict_set.jsonl: every item is a candidate and released, no target is outside the pool.
    assert figures["provenance"]["figures"]["targets_outside_pool_share"] == 0 and "model_extended" not in figures["methods"]
    assert figures["provenance"]["released_candidates"] == figures["provenance"]["candidates"]
    top = read_submission(paths.reports / "submission.json")
    assert len(top["user"]) == holdout_users and all(len(set(t)) == 10 for t in top["top10s"])


def test_demo_sample_runs_the_chain_on_collaborative_codes(chains):
    result, paths = chains["demo"]
    _reached_the_end(result, paths)
    # Family 81 is selected (auto) but covers 66 of 7,500 items: the codes come from the
    # sequences, and the coverage check warns without blocking anything.
    assert _metadata(result, "raw_dataset")["families"] == [81]
    assert _metadata(result, "item_embeddings")["families_selected"] == [81]
    codebooks = _metadata(result, "semantic_id_codebooks")
    assert codebooks["source"] == "collaborative" and codebooks["content_coverage"] == pytest.approx(66 / 7500, abs=1e-4)
    assert json.loads((paths.codebooks / "codebooks.json").read_text())["source"] == "collaborative"
    [check] = [e for e in result.get_asset_check_evaluations() if e.check_name == COVERAGE_CHECK]
    assert not check.passed and check.severity == AssetCheckSeverity.WARN
    assert check.metadata["family"].value == 81 and check.metadata["source"].value == "collaborative"
    assert check.metadata["items_with_content"].value == 66 and check.metadata["items"].value == 7500
    # The encoder still gets the family's vectors where they exist.
    con = duckdb.connect(str(paths.warehouse), read_only=True)
    sids = con.execute("SELECT count(*), count(DISTINCT codes), count(*) FILTER (WHERE has_embedding) FROM item_semantic_ids").fetchall()[0]
    con.close()
    # Unique codes; most items have a sequence vector (co-occurrence stops before each holdout
    # user's own last target, which training may validate on).
    assert sids[0] == sids[1] == 7500 and sids[2] > 5500


def test_sample_without_embeddings_runs_the_chain_with_no_family(chains):
    result, paths = chains["no_embeddings"]
    _reached_the_end(result, paths)
    assert _metadata(result, "raw_dataset")["families"] == [] and _metadata(result, "raw_dataset")["families_requested"] == "auto"
    assert json.loads(paths.raw_manifest.read_text())["families"] == []
    embeddings = _metadata(result, "item_embeddings")
    assert embeddings["families_selected"] == [] and embeddings["families_requested"] == "auto"
    con = duckdb.connect(str(paths.warehouse), read_only=True)
    info = dict(con.execute("SELECT key, value FROM warehouse_info").fetchall())
    families = con.execute("SELECT count(*) FROM embedding_families").fetchall()[0][0]
    con.close()
    assert info["embedding_families"] == "none" and families == 0
    assert _metadata(result, "semantic_id_codebooks")["source"] == "collaborative"
    [check] = [e for e in result.get_asset_check_evaluations() if e.check_name == COVERAGE_CHECK]
    assert not check.passed and check.metadata["family"].value == "none"
    assert _metadata(result, "encoder_checkpoint")  # trained on ids, features, actions and time
