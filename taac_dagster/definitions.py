"""The code location: every asset, check, job and resource of the project, assembled here.

Load it with ``dagster dev`` (workspace.yaml) or ``dagster job execute -m taac_dagster.definitions``.
"""

from dagster import Definitions

from assets.raw import raw_dataset
from assets.semantic_ids import semantic_id_codebooks
from assets.training import encoder_checkpoint
from assets.warehouse import warehouse_tables
from taac_dagster.jobs import data_job, main_job
from taac_dagster.resources import TaacConfig

defs = Definitions(
    assets=[raw_dataset, warehouse_tables, semantic_id_codebooks, encoder_checkpoint],
    jobs=[main_job, data_job],
    resources={"taac": TaacConfig()},
)
