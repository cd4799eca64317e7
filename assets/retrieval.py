"""faiss_index: the trained encoder's item vectors for the whole candidate pool, in Faiss.

Thin: the work is ``taac_dagster.steps.index.build_track_index``. The index type comes from
``TAAC_RETRIEVAL__INDEX`` (auto: exact up to 20K items, IVF above; or flat / ivf / hnsw). User
vectors are out of the item distribution, so the asset measures recall@10 of the index against
exact search on a sample of real holdout queries (tuning nprobe / efSearch up to
``recall_target``) and a blocking check fails below ``recall_floor``: an index that misses
neighbours never reaches the report or the submission. The recall is measured before the
index is published: one below the floor is kept under ``indexes/rejected/`` and the step
fails, so the published index stays the last one that passed.
"""

from collections.abc import Iterator

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from assets.metadata import data_version_of, image_markdown
from assets.track_lock import hold_track
from assets.training import ARRAY_INPUTS
from models.index_files import read_index_metadata
from models.report_plots import figure_png, recall_tuning_figure
from taac_dagster.automation import downstream_condition
from taac_dagster.code_versions import code_version
from taac_dagster.partitions import track_partitions
from taac_dagster.resources import TaacConfig
from taac_dagster.steps.index import IndexBuild, IndexRecallBelowFloor, build_track_index

# Bump when the same checkpoint and settings would give a different index or layout.
RETRIEVAL_CODE_VERSION = code_version("retrieval", __name__, data_files=["configs/tracks/*.yaml", "configs/models/*.yaml"])
RECALL_CHECK = "index_recall_at_10"


@asset(
    partitions_def=track_partitions,
    automation_condition=downstream_condition(),
    code_version=RETRIEVAL_CODE_VERSION,
    group_name="retrieval",
    deps=[AssetKey("encoder_checkpoint"), *ARRAY_INPUTS],
    kinds={"faiss"},
    check_specs=[
        AssetCheckSpec(
            RECALL_CHECK, asset="faiss_index", blocking=True,
            description="recall@10 of the index against exact search on a sample of real holdout user "
            "queries is at least TAAC_RETRIEVAL__RECALL_FLOOR (default 0.95)",
        )
    ],
    description="Faiss index (flat, IVF or HNSW) of every candidate's vector from the trained item tower, "
    "cold items included, with its id map (creative ids) and the checkpoint's version in its metadata.",
)
def faiss_index(context: AssetExecutionContext, taac: TaacConfig) -> Iterator[MaterializeResult | AssetCheckResult]:
    track = context.partition_key
    settings = taac.settings(track)
    floor = settings.retrieval.recall_floor
    with hold_track(context, taac, track):
        try:
            build = build_track_index(taac.paths(track), settings, logger=context.log)
        except IndexRecallBelowFloor as low:
            yield _recall_check(low.build, floor)
            raise Failure(
                description=str(low),
                metadata={"rejected_index": MetadataValue.path(str(low.build.path)), **_recall_tuning_plot(low.build, floor)},
            ) from None
    meta = build.to_metadata()
    yield MaterializeResult(
        data_version=data_version_of([build.checkpoint_version, meta["spec"], meta["pool_size"]]),
        metadata={
            "index_path": MetadataValue.path(meta["index_path"]),
            "index": meta["index"],
            "spec": MetadataValue.json(meta["spec"]),
            "recall@10": meta["recall@10"],
            "recall_queries": meta["recall_queries"],
            "nprobe_or_ef_tuned": meta["tuned"],
            "pool_size": meta["pool_size"],
            "cold_items": meta["cold_items"],
            "dim": meta["dim"],
            "checkpoint_version": meta["checkpoint_version"],
            "seconds": MetadataValue.json(meta["seconds"]),
            **({"warnings": MetadataValue.json(meta["warnings"])} if meta["warnings"] else {}),
            **_recall_tuning_plot(build, floor),
        },
        check_results=[_recall_check(build, floor)],
    )


def _recall_tuning_plot(build: IndexBuild, floor: float) -> dict[str, MetadataValue]:
    """recall@10 at each nprobe / efSearch the tuning tried (an exact index has nothing to tune)."""
    tuning = read_index_metadata(build.path).get("recall_tuning")
    if not tuning:
        return {}
    return {"recall_tuning": image_markdown({"recall tuning": figure_png(recall_tuning_figure(tuning, floor=floor))})}


def _recall_check(build: IndexBuild, floor: float) -> AssetCheckResult:
    passed = build.recall >= floor
    return AssetCheckResult(
        check_name=RECALL_CHECK,
        passed=passed,
        severity=AssetCheckSeverity.ERROR,
        description=(f"recall@10 {build.recall:.4f} vs floor {floor} on {build.recall_queries} queries "
                     f"({build.spec.describe()})" + ("" if passed else f"; not published, kept at {build.path}")),
        metadata={"recall@10": round(build.recall, 5), "floor": floor, "queries": build.recall_queries,
                  "index": build.spec.describe(), **({} if passed else {"rejected_index": MetadataValue.path(str(build.path))})},
    )
