"""The deployment examples under deploy/ load, and do what docs/scaling.md says they do.

No cluster here: the Kubernetes API client is replaced by a recorder, and everything up to the
API call is dagster-k8s's own code (instance from deploy/dagster.yaml, K8sRunLauncher.launch_run,
the k8s_job_executor's step handler), so the Job bodies checked are the ones a cluster would get.
The Kubernetes parts need dagster-k8s (in the `[test]` extra, and `[k8s]`): without it they skip,
and under CI (``CI=true``) they fail (tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import yaml

from tests.conftest import skip_or_fail_in_ci

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY = REPO_ROOT / "deploy"
NO_K8S = "dagster-k8s is not installed (pip install -e '.[test]', or '.[k8s]')"
IMAGE = "registry.example.com/taac-dagster:0.1.0"


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load keeps the last of two equal keys silently; a deployment file must not."""


def _mapping_without_duplicates(loader, node, deep=False):
    keys = [loader.construct_object(key, deep=deep) for key, _ in node.value]
    duplicates = sorted({str(k) for k in keys if keys.count(k) > 1})
    if duplicates:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {duplicates}", node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _load(name: str):
    return yaml.load((DEPLOY / name).read_text(), Loader=_UniqueKeyLoader)


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def k8s():
    try:
        import dagster_k8s
    except ImportError:
        skip_or_fail_in_ci(NO_K8S)
    return dagster_k8s


@pytest.fixture(scope="module")
def taac_defs():
    from taac_dagster.definitions import defs

    return defs


@pytest.fixture(scope="module")
def k8s_defs(k8s):
    return _load_module(DEPLOY / "k8s_definitions.py", "taac_k8s_definitions").defs


@pytest.fixture(scope="module")
def kubeconfig(tmp_path_factory) -> Path:
    """A syntactically valid kubeconfig pointing nowhere: loading it contacts no server."""
    path = tmp_path_factory.mktemp("kube") / "config"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "nowhere",
        "clusters": [{"name": "nowhere", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "nowhere", "user": {"token": "unused"}}],
        "contexts": [{"name": "nowhere", "context": {"cluster": "nowhere", "user": "nowhere"}}],
    }))
    return path


@pytest.fixture
def k8s_instance(k8s, kubeconfig, tmp_path):
    """deploy/dagster.yaml as an instance, with sqlite for postgres and the kubeconfig above."""
    from dagster import DagsterInstance

    config = _load("dagster.yaml")
    config["storage"] = {"sqlite": {"base_dir": str(tmp_path / "storage")}}
    config["run_launcher"]["config"].update(load_incluster_config=False, kubeconfig_file=str(kubeconfig))
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    instance = DagsterInstance.from_config(str(home))
    yield instance
    instance.dispose()


class _NoCluster(Exception):
    pass


def _recording_client(k8s):
    """A DagsterKubernetesClient whose API records the Job it is asked to create, then fails."""
    from dagster_k8s.client import DagsterKubernetesClient

    created: list[tuple[str, object]] = []

    def create_namespaced_job(body, namespace, **_):
        created.append((namespace, body))
        raise _NoCluster("no cluster on this machine")

    batch = mock.MagicMock()
    batch.create_namespaced_job.side_effect = create_namespaced_job
    client = DagsterKubernetesClient(batch_api=batch, core_api=mock.MagicMock(), logger=mock.MagicMock(),
                                     sleeper=time.sleep, timer=time.time)
    return client, created


def _helm_container_context(deployment: dict, namespace: str = "taac") -> dict:
    """What the Helm chart passes to `dagster api grpc --container-context` for a user deployment
    with includeConfigInLaunchedRuns (chart helper dagsterUserDeployments.k8sContainerContext)."""
    k8s = {
        "image_pull_policy": deployment["image"]["pullPolicy"],
        "env_config_maps": [f"dagster-{deployment['name']}-user-env"]
        + [ref["name"] for ref in deployment.get("envConfigMaps", [])],
        "env_secrets": [ref["name"] for ref in deployment.get("envSecrets", [])],
        "volume_mounts": deployment.get("volumeMounts", []),
        "volumes": deployment.get("volumes", []),
        "namespace": namespace,
        "service_account_name": "dagster-dagster-user-deployments",
        "run_k8s_config": {"pod_spec_config": {"automount_service_account_token": True}},
    }
    if deployment.get("resources"):
        k8s["resources"] = deployment["resources"]
    return {"k8s": k8s}


def _container(job):
    return job.spec.template.spec.containers[0]


def _env(container) -> dict[str, str | None]:
    return {var.name: var.value for var in container.env or []}


def _mounts(container) -> dict[str, str]:
    return {m.name: m.mount_path for m in container.volume_mounts or []}


# --- (a) every file parses ----------------------------------------------------------------------
def test_every_yaml_under_deploy_parses_without_duplicate_keys():
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert {p.relative_to(DEPLOY).as_posix() for p in files} >= {
        "dagster.yaml", "helm/values.yaml", "k8s/taac-data.yaml", "k8s_tags.example.yaml",
        "run_config.example.yaml", "run_config.k8s.yaml",
    }
    for path in files:
        documents = list(yaml.load_all(path.read_text(), Loader=_UniqueKeyLoader))
        assert documents and all(isinstance(doc, dict) and doc for doc in documents), path
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate keys"):
        yaml.load("a: 1\nb: 2\na: 3\n", Loader=_UniqueKeyLoader)


# --- (b) the instance config ----------------------------------------------------------------------
def test_dagster_yaml_is_a_valid_instance_config(tmp_path):
    from dagster._core.errors import DagsterInvalidConfigError
    from dagster._core.instance.config import dagster_instance_config

    (tmp_path / "dagster.yaml").write_text((DEPLOY / "dagster.yaml").read_text())
    config, custom_class = dagster_instance_config(str(tmp_path))
    assert custom_class is None
    assert config["run_launcher"]["class"] == "K8sRunLauncher"
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert config["storage"]["postgres"]["postgres_db"]["password"] == {"env": "DAGSTER_PG_PASSWORD"}

    broken = _load("dagster.yaml")
    broken["run_monitoring"]["start_timeout"] = 900  # not a field
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(broken))
    with pytest.raises(DagsterInvalidConfigError):
        dagster_instance_config(str(tmp_path))


def test_run_launcher_config_matches_the_k8s_run_launcher_schema(k8s):
    from dagster._config import process_config

    config = _load("dagster.yaml")["run_launcher"]["config"]
    result = process_config(k8s.K8sRunLauncher.config_type(), config)
    assert result.success, result.errors
    assert result.value["job_namespace"] == "taac"

    for wrong in ({**config, "volume_mount": config["volume_mounts"]},  # typo
                  {k: v for k, v in config.items() if k != "instance_config_map"}):  # required
        assert not process_config(k8s.K8sRunLauncher.config_type(), wrong).success


def test_instance_from_dagster_yaml_launches_a_run_pod(k8s, k8s_instance, taac_defs):
    """K8sRunLauncher.launch_run for a real taac_main run, with the Helm deployment's container
    context and the GPU run tag of k8s_tags.example.yaml: the Job it submits."""
    from dagster._core.code_pointer import ModuleCodePointer
    from dagster._core.launcher import LaunchRunContext
    from dagster._core.origin import RepositoryPythonOrigin

    launcher = k8s_instance.run_launcher
    assert isinstance(launcher, k8s.K8sRunLauncher)
    client, created = _recording_client(k8s)
    launcher._api_client = client  # the only stand-in: the HTTP client

    deployment = _load("helm/values.yaml")["dagster-user-deployments"]["deployments"][0]
    origin = RepositoryPythonOrigin(
        sys.executable, ModuleCodePointer("taac_dagster.definitions", "defs", str(REPO_ROOT)),
        container_image=IMAGE, container_context=_helm_container_context(deployment),
    )
    gpu_tag = _load("k8s_tags.example.yaml")["run_tags"]["dagster-k8s/config"]
    run = k8s_instance.create_run_for_job(
        taac_defs.resolve_job_def("taac_main"),
        tags={"dagster/partition": "10M", "dagster-k8s/config": json.dumps(gpu_tag)},
        job_code_origin=origin.get_job_origin("taac_main"),
    )
    with pytest.raises(_NoCluster):
        launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))

    [(namespace, job)] = created
    container = _container(job)
    assert namespace == "taac"
    assert container.image == IMAGE
    assert container.args[1:5] == ["-m", "dagster", "api", "execute_run"]
    # The run tag wins over the launcher's defaults (limit 32Gi, request 4 CPU).
    assert container.resources.limits == {"memory": "128Gi", "nvidia.com/gpu": "8"}
    assert container.resources.requests == {"cpu": "32", "memory": "128Gi"}
    assert _env(container)["TAAC_TRAINING__LAUNCHER"] == "torchrun"
    assert _env(container)["TAAC_TRAINING__NPROC_PER_NODE"] == "8"
    env_from = {(ref.config_map_ref or ref.secret_ref).name for ref in container.env_from}
    assert {"taac-env", "taac-hub-token"} <= env_from
    assert _mounts(container) == {"taac-data": "/data/taac"}
    [volume] = job.spec.template.spec.volumes  # launcher and code location name the same PVC once
    assert volume.persistent_volume_claim.claim_name == "taac-data"


# --- (c) run configs against the real jobs ----------------------------------------------------------
def test_run_config_example_validates_and_overrides_the_settings(taac_defs):
    from dagster import validate_run_config
    from dagster._core.errors import DagsterInvalidConfigError

    from taac_dagster.resources import TaacConfig

    run_config = _load("run_config.example.yaml")
    job = taac_defs.resolve_job_def("taac_main")
    resolved = validate_run_config(job, run_config)
    taac = resolved["resources"]["taac"]["config"]
    assert set(run_config["resources"]["taac"]["config"]) <= set(TaacConfig.model_fields)

    settings = TaacConfig(**{k: v for k, v in taac.items() if v is not None}).settings("1M")
    assert settings.data_root == Path("data/run-config-example")
    assert (settings.synthetic.num_users, settings.synthetic.num_items, settings.synthetic.seed) == (500, 1500, 7)
    assert (settings.training.preset, settings.training.epochs, settings.retrieval.index) == ("default", 2, "flat")

    for wrong in ({"synthetic_users": 500}, {"synthetic": {"num_users": "many"}}, {"training": {"device": "tpu"}},
                  {"synthetic_num_users": 500}):  # the flat names of earlier versions are refused too
        with pytest.raises(DagsterInvalidConfigError):
            validate_run_config(job, {"resources": {"taac": {"config": wrong}}})


def test_k8s_run_config_needs_the_k8s_executor_and_names_real_steps(k8s_defs, taac_defs):
    from dagster import validate_run_config
    from dagster._core.errors import DagsterInvalidConfigError

    run_config = _load("run_config.k8s.yaml")
    job = k8s_defs.resolve_job_def("taac_main")
    assert job.executor_def.name == "k8s"
    resolved = validate_run_config(job, run_config)
    per_step = resolved["execution"]["k8s"]["per_step_k8s_config"]
    # Keys are op names; an unknown name would be ignored silently at run time.
    assert set(per_step) <= set(job.graph.node_dict), set(per_step) - set(job.graph.node_dict)
    assert per_step["encoder_checkpoint"]["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == 8

    # The default executor (taac_dagster.definitions) has no such config.
    with pytest.raises(DagsterInvalidConfigError):
        validate_run_config(taac_defs.resolve_job_def("taac_main"), run_config)


def test_step_pods_get_the_per_step_config(k8s, k8s_instance, kubeconfig):
    """The k8s_job_executor's own step handler builds the encoder_checkpoint and warehouse pods
    from deploy/dagster.yaml + deploy/run_config.k8s.yaml (+ the Helm container context)."""
    from dagster import AssetKey, execute_job
    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster_k8s.client import DagsterKubernetesClient

    deployment = _load("helm/values.yaml")["dagster-user-deployments"]["deployments"][0]
    repository = ReconstructableRepository.for_file(
        str(DEPLOY / "k8s_definitions.py"), "defs", working_directory=str(REPO_ROOT),
        container_image=IMAGE, container_context=_helm_container_context(deployment),
    )
    job = repository.get_reconstructable_job("taac_main")
    warehouse_keys = [
        key for key in job.get_definition().asset_layer.executable_asset_keys
        if job.get_definition().asset_layer.get(key).assets_def.op.name == "warehouse_tables"
    ]
    run_config = _load("run_config.k8s.yaml")
    run_config["execution"]["config"].update(load_incluster_config=False, kubeconfig_file=str(kubeconfig))

    pods = {}
    for selection in ([AssetKey("encoder_checkpoint")], warehouse_keys):
        client, created = _recording_client(k8s)
        with mock.patch.object(DagsterKubernetesClient, "production_client", return_value=client):
            result = execute_job(job, k8s_instance, run_config=run_config, tags={"dagster/partition": "10M"},
                                 asset_selection=selection, raise_on_error=False)
        assert not result.success  # the launch itself fails: no cluster
        [(namespace, pod_job)] = created
        assert namespace == "taac"
        pods[_env(_container(pod_job))["DAGSTER_RUN_STEP_KEY"]] = pod_job

    training = _container(pods["encoder_checkpoint"])
    assert training.image == IMAGE
    assert training.args[-3:-1] == ["api", "execute_step"] or training.args[:3] == ["dagster", "api", "execute_step"]
    assert training.resources.limits == {"memory": "128Gi", "nvidia.com/gpu": "8"}
    env = _env(training)
    assert (env["TAAC_TRAINING__LAUNCHER"], env["TAAC_TRAINING__NPROC_PER_NODE"]) == ("torchrun", "8")
    assert _mounts(training) == {"taac-data": "/data/taac", "dshm": "/dev/shm"}
    spec = pods["encoder_checkpoint"].spec.template.spec
    assert {v.name: (v.persistent_volume_claim or v.empty_dir) is not None for v in spec.volumes} == {
        "taac-data": True, "dshm": True}
    assert spec.volumes[[v.name for v in spec.volumes].index("dshm")].empty_dir.medium == "Memory"
    assert [t.key for t in spec.tolerations] == ["nvidia.com/gpu"]

    warehouse = _container(pods["warehouse_tables"])
    assert warehouse.resources.limits == {"memory": "64Gi"} and "nvidia.com/gpu" not in warehouse.resources.requests
    assert _env(warehouse)["TAAC_DUCKDB_MEMORY_LIMIT"] == "48GB"
    assert _mounts(warehouse) == {"taac-data": "/data/taac"}


# --- (d) dagster-k8s/config tags ------------------------------------------------------------------
def test_k8s_config_tags_parse(k8s):
    from dagster import asset
    from dagster._core.errors import DagsterInvalidConfigError
    from dagster_k8s.job import get_user_defined_k8s_config

    tags = _load("k8s_tags.example.yaml")
    examples = [tags["run_tags"]["dagster-k8s/config"]]
    examples += [op["dagster-k8s/config"] for op in tags["op_tags"].values()]
    for example in examples:
        parsed = get_user_defined_k8s_config({"dagster-k8s/config": json.dumps(example)})
        assert parsed.container_config["resources"] == example["container_config"]["resources"]

    # The op-tag form shown in the docs: a dict value becomes the JSON string dagster-k8s reads.
    gpu = tags["op_tags"]["encoder_checkpoint"]["dagster-k8s/config"]

    @asset(op_tags={"dagster-k8s/config": gpu})
    def tagged():
        return None

    assert get_user_defined_k8s_config(tagged.op.tags).container_config["resources"]["limits"]["nvidia.com/gpu"] == 8

    with pytest.raises(DagsterInvalidConfigError):
        get_user_defined_k8s_config({"dagster-k8s/config": json.dumps({"container": {"resources": {}}})})


# --- Helm values, k8s manifests, image --------------------------------------------------------------
# Field names of the chart's schema (dagster-io/dagster helm/dagster/schema: UserDeployment,
# K8sRunLauncherConfig, RunK8sConfig), so a misspelt key fails here instead of being ignored.
USER_DEPLOYMENT_FIELDS = {
    "name", "image", "dagsterApiGrpcArgs", "codeServerArgs", "includeConfigInLaunchedRuns", "port", "env",
    "envConfigMaps", "envSecrets", "annotations", "nodeSelector", "affinity", "tolerations", "podSecurityContext",
    "securityContext", "resources", "livenessProbe", "readinessProbe", "startupProbe", "labels", "volumeMounts",
    "volumes", "schedulerName", "initContainers", "sidecarContainers", "service", "deploymentStrategy",
}
K8S_RUN_LAUNCHER_FIELDS = {
    "image", "imagePullPolicy", "jobNamespace", "loadInclusterConfig", "kubeconfigFile", "envConfigMaps",
    "envSecrets", "envVars", "volumeMounts", "volumes", "labels", "failPodOnRunFailure", "resources",
    "schedulerName", "securityContext", "runK8sConfig",
}
RUN_K8S_CONFIG_FIELDS = {"containerConfig", "podSpecConfig", "podTemplateSpecMetadata", "jobSpecConfig", "jobMetadata"}


def test_helm_values_serve_the_definitions_from_the_shared_volume(taac_defs):
    values = _load("helm/values.yaml")
    [deployment] = values["dagster-user-deployments"]["deployments"]
    assert set(deployment) <= USER_DEPLOYMENT_FIELDS, set(deployment) - USER_DEPLOYMENT_FIELDS
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert set(launcher) <= K8S_RUN_LAUNCHER_FIELDS, set(launcher) - K8S_RUN_LAUNCHER_FIELDS
    assert set(launcher["runK8sConfig"]) <= RUN_K8S_CONFIG_FIELDS

    # `dagster api grpc -m taac_dagster.definitions`: the module the tests load.
    args = deployment["dagsterApiGrpcArgs"]
    module = importlib.import_module(args[args.index("-m") + 1])
    assert module.defs is taac_defs  # the module the tests load, and it serves the pipeline's jobs
    assert {"taac_main", "taac_data", "taac_retrain"} <= {job.name for job in taac_defs.resolve_all_job_defs()}
    # Resources on the deployment would be copied into every run pod (includeConfigInLaunchedRuns).
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] and "resources" not in deployment

    pvc, env = yaml.load_all((DEPLOY / "k8s" / "taac-data.yaml").read_text(), Loader=_UniqueKeyLoader)
    assert (pvc["kind"], env["kind"]) == ("PersistentVolumeClaim", "ConfigMap")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # pods of one run land on several nodes
    [volume] = deployment["volumes"]
    [mount] = deployment["volumeMounts"]
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert mount["name"] == volume["name"] and mount["mountPath"] == env["data"]["TAAC_DATA_ROOT"]
    assert {ref["name"] for ref in deployment["envConfigMaps"]} == {env["metadata"]["name"]}
    # The ConfigMap's keys are settings the project reads.
    from taac_dagster.settings import TaacSettings

    with mock.patch.dict(os.environ, env["data"]):
        settings = TaacSettings()
    assert settings.data_root == Path("/data/taac") and settings.embedding_families == [81]
    assert settings.duckdb_memory_limit == env["data"]["TAAC_DUCKDB_MEMORY_LIMIT"]


def test_helm_container_context_is_accepted_by_dagster_k8s(k8s):
    deployment = _load("helm/values.yaml")["dagster-user-deployments"]["deployments"][0]
    context = k8s.container_context.K8sContainerContext.create_from_config(_helm_container_context(deployment))
    # Normalized into the raw pod config every run pod gets (snake_case, env_from, volumes).
    config = context.run_k8s_config
    assert context.namespace == "taac"
    assert {"config_map_ref": {"name": "taac-env"}} in config.container_config["env_from"]
    assert {"secret_ref": {"name": "taac-hub-token"}} in config.container_config["env_from"]
    assert config.container_config["volume_mounts"] == [{"name": "taac-data", "mount_path": "/data/taac"}]
    assert config.pod_spec_config["volumes"] == [
        {"name": "taac-data", "persistent_volume_claim": {"claim_name": "taac-data"}}]
    with pytest.raises(Exception, match="k8s container context"):
        k8s.container_context.K8sContainerContext.create_from_config({"k8s": {"volume": []}})


def test_pipes_k8s_sketch_builds_a_gpu_pod(k8s, monkeypatch):
    """deploy/pipes_k8s_training.py: the pod it would ask PipesK8sClient for, and the same
    torchrun command assets/training.py launches."""
    from dagster_k8s.pipes import build_pod_body

    import assets.training as training_asset
    from taac_dagster.resources import TaacConfig
    from taac_dagster.settings import load_settings

    sketch = _load_module(DEPLOY / "pipes_k8s_training.py", "taac_pipes_k8s_training")
    assert callable(sketch.train_in_k8s_pod) and sketch.PipesK8sClient is k8s.PipesK8sClient

    monkeypatch.setenv("TAAC_TRAINING__LAUNCHER", "torchrun")
    monkeypatch.setenv("TAAC_TRAINING__NPROC_PER_NODE", "8")
    monkeypatch.setenv("TAAC_DATA_ROOT", "/data/taac")
    settings = load_settings("10M")
    command = sketch.torchrun_command(settings, "10M")
    prepared = "/data/taac/10M/checkpoints/arrays"

    launched = {}

    class _Recorder:
        def __init__(self, **_):
            pass

        def run(self, *, command, context, **_):
            launched["command"] = command
            return mock.MagicMock()

    monkeypatch.setattr(training_asset, "PipesSubprocessClient", _Recorder)
    # No track folder to lock here: /data/taac is the cluster's volume.
    monkeypatch.setattr(training_asset, "hold_track", lambda *args, **kwargs: contextlib.nullcontext())
    # The asset prepares the arrays before launching torchrun; there is no warehouse here.
    def prepare(paths, settings, logger=None):
        launched["prepared"] = paths.track
        return mock.MagicMock(folder=prepared)

    monkeypatch.setattr(training_asset, "prepare_track_arrays", prepare)
    training_asset._train_with_torchrun(mock.MagicMock(), TaacConfig(), "10M")
    expected = sketch.torchrun_command(settings, "10M", arrays_dir=prepared)
    assert launched["command"][1:] == expected[1:], "the sketch's torchrun command drifted from assets/training.py"
    assert launched["prepared"] == "10M" and "--arrays" not in command  # the pod prepares its own

    pod = build_pod_body("taac-torchrun", IMAGE, command, sketch.taac_env(), None,
                         sketch.torchrun_pod_spec(settings.training.nproc_per_node))
    container = pod.spec.containers[0]
    assert container.image == IMAGE and container.command == command
    assert container.resources.limits["nvidia.com/gpu"] == "8"
    assert _mounts(container) == {"taac-data": "/data/taac", "dshm": "/dev/shm"}
    assert _env(container)["TAAC_DATA_ROOT"] == "/data/taac"
    assert pod.spec.restart_policy == "Never"


def test_dockerfile_copies_what_the_code_reads_at_run_time():
    text = (DEPLOY / "Dockerfile").read_text()
    sources = [src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1]]
    missing = [src for src in sources if not (REPO_ROOT / src).exists()]
    assert not missing, missing
    # settings and SQL are read from the source tree (taac_dagster.settings.PROJECT_ROOT): the
    # install must be editable and configs/ + sql/ must be in the image.
    assert {"configs", "sql", "taac_dagster", "assets", "models"} <= set(sources)
    assert re.search(r"pip install -e \"\.\[k8s\]\"", text)
    workdir = re.search(r"^WORKDIR (\S+)$", text, re.M).group(1)
    values = (DEPLOY / "helm" / "values.yaml").read_text()
    assert f'"-d", "{workdir}"' in values  # the k8s_definitions.py variant runs from the workdir


def _doc_blocks(kind: str) -> list[str]:
    text = (REPO_ROOT / "docs" / "scaling.md").read_text()
    return [body for k, body in re.findall(r"```(yaml|toml|python|bash)\n(.*?)```", text, re.S) if k == kind]


def test_configs_shown_in_docs_scaling_load(taac_defs):
    """Every YAML/TOML block of docs/scaling.md parses; the local run config shown validates."""
    import tomllib

    from dagster import validate_run_config

    yamls = [yaml.load(body, Loader=_UniqueKeyLoader) for body in _doc_blocks("yaml")]
    [toml] = [tomllib.loads(body) for body in _doc_blocks("toml")]
    assert toml["tool"]["dg"]["directory_type"] == "project"
    assert toml["tool"]["dg"]["project"]["code_location_target_module"] == "taac_dagster.definitions"
    [local_config] = [doc for doc in yamls if "resources" in doc]
    validate_run_config(taac_defs.resolve_job_def("taac_main"), local_config)
    assert local_config == _load("run_config.example.yaml")


def test_k8s_run_config_shown_in_docs_scaling_validates(k8s_defs):
    from dagster import validate_run_config

    yamls = [yaml.load(body, Loader=_UniqueKeyLoader) for body in _doc_blocks("yaml")]
    [shown] = [doc for doc in yamls if "per_step_k8s_config" in doc.get("execution", {}).get("config", {})]
    validate_run_config(k8s_defs.resolve_job_def("taac_main"), shown)
    # An excerpt of the file: same steps, same resources.
    full = _load("run_config.k8s.yaml")["execution"]["config"]["per_step_k8s_config"]
    for step, config in shown["execution"]["config"]["per_step_k8s_config"].items():
        assert config["container_config"]["resources"] == full[step]["container_config"]["resources"], step


def test_run_config_shown_in_the_readme_validates(taac_defs):
    """The README's `-c run.yaml` example names real resource fields and sets what it says."""
    from dagster import validate_run_config

    from taac_dagster.resources import TaacConfig

    readme = (DEPLOY.parent / "README.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", readme, flags=re.S)]
    configs = [b for b in blocks if isinstance(b, dict) and "resources" in b]
    assert configs, "the README shows no run config"
    for run_config in configs:
        resolved = validate_run_config(taac_defs.resolve_job_def("taac_retrain"), run_config)
        taac = {k: v for k, v in resolved["resources"]["taac"]["config"].items() if v is not None}
        settings = TaacConfig(**taac).settings("1M")
        assert settings.training.preset == "baseline" and settings.retrieval.index == "ivf"
