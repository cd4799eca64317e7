"""The code location: every asset, check, job, schedule, sensor and resource, assembled here.

Load it with ``dagster dev`` (workspace.yaml) or ``dagster job execute -m taac_dagster.definitions``.
"""

from dagster import Definitions

from assets.evaluation import evaluation_report, submission, user_vectors
from assets.raw import raw_dataset
from assets.retrieval import faiss_index
from assets.semantic_ids import semantic_id_codebooks
from assets.training import encoder_checkpoint
from assets.warehouse import warehouse_tables
from taac_dagster.automation import automation_sensor
from taac_dagster.jobs import data_job, main_job, retrain_job
from taac_dagster.resources import TaacConfig
from taac_dagster.schedules import build_retraining_schedule
from taac_dagster.settings import TaacSettings

_settings = TaacSettings()


defs = Definitions(
    assets=[
        raw_dataset, warehouse_tables, semantic_id_codebooks, encoder_checkpoint, faiss_index, user_vectors, evaluation_report,
        submission,
    ],
    jobs=[main_job, data_job, retrain_job],
    schedules=[
        build_retraining_schedule(retrain_job, _settings.retrain_cron, enabled=_settings.retrain_schedule_enabled)
    ],
    sensors=[automation_sensor],
    resources={"taac": TaacConfig()},
)
