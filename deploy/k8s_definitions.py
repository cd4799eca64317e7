"""The same definitions with one Kubernetes pod per step (dagster-k8s ``k8s_job_executor``).

``taac_dagster.definitions`` runs a whole run in one process tree (the default multiprocess
executor): with the ``K8sRunLauncher`` that is one pod per run. Loading this file instead
makes every asset job (taac_main, taac_data, taac_retrain and ad-hoc asset selections) launch
each step as its own Kubernetes Job, so the warehouse step can ask for memory, the training
step for GPUs, and the rest stay small. Per-step resources come from the run config
(``deploy/run_config.k8s.yaml``, ``execution.config.per_step_k8s_config``).

Load it as the code location (Helm user deployment or workspace.yaml)::

    dagster api grpc -f deploy/k8s_definitions.py -d /opt/taac

Needs ``pip install 'taac-dagster[k8s]'``. Importing it contacts no cluster: the executor
loads the kube config only when a run starts.
"""

from dagster import Definitions
from dagster_k8s import k8s_job_executor

import taac_dagster.definitions as taac_definitions

# Import the module, not its ``defs``: Dagster refuses a file with two Definitions at module scope.
defs = Definitions.merge(taac_definitions.defs, Definitions(executor=k8s_job_executor))
