"""user_vectors, evaluation_report and submission: what the trained model and its index are worth.

Thin: the work is ``taac_dagster.steps.user_vectors.encode_track_users``,
``taac_dagster.steps.report.evaluate_track`` and ``taac_dagster.steps.submission.submission_for_track``.
``user_vectors`` runs the encoder over every evaluated user's history once per checkpoint; the
report and the submission read those vectors. The report (Markdown + HTML + JSON + plots under
``<root>/<track>/reports/``) scores every holdout user for the model, the popularity baseline,
the official-baseline preset when its checkpoint exists and, on synthetic data, the oracle
ceiling; its headline table is also this materialization's Markdown metadata, so it shows in the Dagster UI.
"""

import time

from dagster import AssetExecutionContext, AssetKey, MaterializeResult, MetadataValue, asset

from assets.metadata import data_version_of, image_files_markdown
from assets.track_lock import hold_track
from assets.training import ARRAY_INPUTS
from taac_dagster.automation import downstream_condition
from taac_dagster.code_versions import code_version
from taac_dagster.partitions import track_partitions
from taac_dagster.resources import TaacConfig
from taac_dagster.steps.report import evaluate_track
from taac_dagster.steps.submission import submission_for_track
from taac_dagster.steps.user_vectors import encode_track_users

# Bump when the same checkpoint, index and settings would give other figures or files.
USER_VECTORS_CODE_VERSION = code_version("user-vectors", __name__, data_files=["configs/tracks/*.yaml", "configs/models/*.yaml"])
EVALUATION_CODE_VERSION = code_version("evaluation", __name__, data_files=["configs/tracks/*.yaml", "configs/models/*.yaml"])
SUBMISSION_CODE_VERSION = code_version("submission", __name__, data_files=["configs/tracks/*.yaml", "configs/models/*.yaml"])
PLOT_TITLES = {"slices": "score by slice", "training_curve": "training loss"}


def _figure_metadata(headline: dict, share: dict) -> dict:
    out = {}
    for method, figures in headline.items():
        for key, value in figures.items():
            if key != "users":
                out[key if method == "model" else f"{method}_{key}"] = round(float(value), 5)
    out.update({f"oracle_share_{key}": round(value, 4) for key, value in share.items()})
    return out


@asset(
    partitions_def=track_partitions,
    automation_condition=downstream_condition(),
    code_version=USER_VECTORS_CODE_VERSION,
    group_name="evaluation",
    # encoder_checkpoint: the configured preset's checkpoint, and the baseline preset's when it exists.
    deps=[AssetKey("encoder_checkpoint"), *ARRAY_INPUTS],
    kinds={"numpy"},
    description="Every holdout user's retrieval query (and every predict_seq.jsonl user's, where the local source "
    "has one), encoded once per checkpoint for the configured and the baseline preset; the report and the "
    "submission read them.",
)
def user_vectors(context: AssetExecutionContext, taac: TaacConfig) -> MaterializeResult:
    track = context.partition_key
    with hold_track(context, taac, track):
        build = encode_track_users(taac.paths(track), taac.settings(track), logger=context.log)
    main = next(iter(build.presets.values()))
    return MaterializeResult(
        # Same checkpoints over the same arrays and predict file: same vectors.
        data_version=data_version_of(build.presets),
        metadata={
            "path": MetadataValue.path(main["path"]),
            "presets": MetadataValue.json(build.presets),
            "holdout_users": main["holdout"],
            "predict_users": main["predict"],
            "checkpoint_version": main["checkpoint_version"],
            "seconds": round(build.seconds, 2),
            "users_per_second": round(build.users_per_second),
            **({"notes": MetadataValue.md("\n".join(f"- {note}" for note in build.notes))} if build.notes else {}),
        },
    )


@asset(
    partitions_def=track_partitions,
    automation_condition=downstream_condition(),
    code_version=EVALUATION_CODE_VERSION,
    group_name="evaluation",
    # encoder_checkpoint: the configured preset's checkpoint, and the baseline preset's when it exists.
    deps=[AssetKey("user_vectors"), AssetKey("faiss_index"), AssetKey("encoder_checkpoint"), *ARRAY_INPUTS],
    kinds={"python"},
    description="Scored evaluation of every holdout user: HR@10, NDCG@10, Score (weighted on 10M) for the "
    "model, popularity, the baseline preset and the oracle; slices, plots and a comparison with the last run.",
)
def evaluation_report(context: AssetExecutionContext, taac: TaacConfig) -> MaterializeResult:
    track = context.partition_key
    with hold_track(context, taac, track):
        result = evaluate_track(
            taac.paths(track), taac.settings(track), code_version=EVALUATION_CODE_VERSION, logger=context.log
        )
    comparison = result.files.comparison
    return MaterializeResult(
        metadata={
            "headline": MetadataValue.md(result.files.headline_markdown),
            **_figure_metadata(result.headline, result.oracle_share),
            "users": result.users,
            # The kept checkpoint's validation (targets before the test targets), beside test.
            **{f"validation_{key}": round(float(result.validation[key]), 5)
               for key in ("hr@10", "ndcg@10", "score") if result.validation and key in result.validation},
            "report": MetadataValue.path(str(result.files.markdown)),
            "report_html": MetadataValue.path(str(result.files.html)),
            "figures_json": MetadataValue.path(str(result.files.json)),
            "notes": MetadataValue.md("\n".join(f"- {note}" for note in result.notes)),
            **({"plots": image_files_markdown({PLOT_TITLES.get(k, k): p for k, p in result.files.plots.items()})}
               if result.files.plots else {}),
            "exclude_history": result.provenance["exclude_history"],
            "index": result.provenance["index"],
            "search_backend": result.search_backend,
            # Targets outside the released pool: misses in every row but model_extended.
            "targets_outside_pool_share": round(result.targets_outside_pool_share, 5),
            "released_candidates": result.provenance["released_candidates"],
            "checkpoint_version": result.provenance["checkpoint_version"],
            "seconds": MetadataValue.json(result.seconds),
            "figures_moved_since_last_run": len(comparison["moved"]) if comparison else 0,
        }
    )


@asset(
    partitions_def=track_partitions,
    automation_condition=downstream_condition(),
    code_version=SUBMISSION_CODE_VERSION,
    group_name="evaluation",
    deps=[AssetKey("user_vectors"), AssetKey("faiss_index"), AssetKey("encoder_checkpoint"), *ARRAY_INPUTS],
    kinds={"json"},
    description='Top-10 raw creative ids per user in the official format {"top10s": [[...]], "user": [...]}, '
    "validated (10 distinct ids of the released pool per user), for the holdout users or the local source's "
    "predict_seq.jsonl.",
)
def submission(context: AssetExecutionContext, taac: TaacConfig) -> MaterializeResult:
    track = context.partition_key
    started = time.perf_counter()
    with hold_track(context, taac, track):
        summary = submission_for_track(taac.paths(track), taac.settings(track), logger=context.log)
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(summary["path"]),
            "users": summary["users"],
            "bytes": summary["bytes"],
            "source": summary["source"],
            "index": summary["index"],
            "search_backend": summary["search_backend"],
            "released_candidates": summary["released_candidates"],
            "exclude_history": summary["exclude_history"],
            "checkpoint_version": summary["checkpoint_version"],
            "seconds": round(time.perf_counter() - started, 2),
        }
    )
