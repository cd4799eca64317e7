"""Alternative training launcher (a sketch, not wired in): torchrun in its own GPU pod via Pipes.

What the project runs today (``TAAC_TRAINING__LAUNCHER=torchrun``): the ``encoder_checkpoint``
step starts ``torchrun -m taac_dagster.steps.train_cli`` with ``PipesSubprocessClient`` *inside its own pod*, so
that pod (the run pod, or the step pod with the k8s_job_executor) must hold the GPUs.

The alternative below keeps the Dagster step small (no GPU) and has ``PipesK8sClient`` create a
dedicated pod for torchrun: the step pod waits, reads the pod's logs and picks up the Pipes
messages of rank 0 (``taac_dagster.steps.train_cli.pipes_session`` is unchanged: ``open_dagster_pipes()``
reads the context from the environment PipesK8sClient injects and writes its messages to
stderr, which PipesK8sClient reads from the pod logs). The training pod needs the same image and
the shared data volume.

To use it, the training asset would call ``train_in_k8s_pod(context, taac, track)`` instead of
``_train_with_torchrun``. Checked by tests/test_deploy_configs.py: the pod body it asks for
(GPUs, data volume, /dev/shm, TAAC_* env) is built with dagster-k8s's own ``build_pod_body``.
Needs ``pip install 'taac-dagster[k8s]'``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

from dagster import AssetExecutionContext, MaterializeResult
from dagster_k8s import PipesK8sClient

from assets.training import torchrun_command as asset_torchrun_command
from taac_dagster.resources import TaacConfig
from taac_dagster.settings import TaacSettings

DATA_VOLUME = "taac-data"  # the PVC of deploy/k8s/taac-data.yaml
DATA_MOUNT = "/data/taac"  # TAAC_DATA_ROOT in the taac-env ConfigMap


def torchrun_command(settings: TaacSettings, track: str, python: str = "python", *, arrays_dir: str | None = None) -> list[str]:
    """The command assets/training.py runs, for a container (single node, N ranks). Without
    ``arrays_dir`` rank 0 prepares the arrays from the settings in the pod."""
    return asset_torchrun_command(settings, track, python, arrays_dir=arrays_dir)


def torchrun_pod_spec(gpus: int, *, claim_name: str = DATA_VOLUME, memory: str = "128Gi") -> dict[str, Any]:
    """``base_pod_spec`` for PipesK8sClient: GPUs, the shared data volume and a real /dev/shm."""
    return {
        "containers": [
            {
                "resources": {"limits": {"nvidia.com/gpu": gpus, "memory": memory}, "requests": {"memory": memory}},
                "volumeMounts": [
                    {"name": "taac-data", "mountPath": DATA_MOUNT},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                ],
            }
        ],
        "volumes": [
            {"name": "taac-data", "persistentVolumeClaim": {"claimName": claim_name}},
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    }


def taac_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The TAAC_* settings of this process, passed on to the training pod."""
    environ = os.environ if environ is None else environ
    return {key: value for key, value in environ.items() if key.startswith("TAAC_")}


def train_in_k8s_pod(
    context: AssetExecutionContext, taac: TaacConfig, track: str, *, namespace: str = "taac", image: str | None = None
) -> MaterializeResult:
    settings = taac.settings(track)
    # The image this run uses (the code location's), unless told otherwise.
    image = image or context.run.job_code_origin.repository_origin.container_image
    context.log.info(f"launching torchrun ({settings.training.nproc_per_node} GPUs) in a pod of {image}")
    return (
        PipesK8sClient(load_incluster_config=True)
        .run(
            context=context,
            image=image,
            command=torchrun_command(settings, track),
            namespace=namespace,
            env=taac_env(),
            base_pod_spec=torchrun_pod_spec(settings.training.nproc_per_node),
        )
        .get_materialize_result()
    )


if __name__ == "__main__":  # print the pod body for a track, e.g. `python deploy/pipes_k8s_training.py 10M`
    import json

    from dagster_k8s.pipes import build_pod_body

    from taac_dagster.settings import load_settings

    track = sys.argv[1] if len(sys.argv) > 1 else "1M"
    settings = load_settings(track)
    pod = build_pod_body(
        "taac-torchrun", "registry.example.com/taac-dagster:0.1.0", torchrun_command(settings, track),
        taac_env(), None, torchrun_pod_spec(settings.training.nproc_per_node),
    )
    print(json.dumps(pod.to_dict(), default=str, indent=1))
