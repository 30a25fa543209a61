"""The structure of docker-compose.yaml and the Dockerfile (Docker itself cannot run here).

:func:`compose_problems` lists everything the distributed layout needs and is missing; the real
file must have none, and each removal test takes one part away to show the check notices.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from dicom_ingest.sites import load_sites
from dicom_ingest.sites.config import DEFAULT_POOL
from dicom_ingest_sandbox.cli import build_parser
from tests.conftest import REPO_ROOT

COMPOSE_PATH = REPO_ROOT / "docker-compose.yaml"
DOCKERFILE_PATH = REPO_ROOT / "Dockerfile"
AIRFLOW_BASE_IMAGE = "apache/airflow:3.3.2"

AIRFLOW_COMMANDS = {
    "airflow-apiserver": "api-server",
    "airflow-scheduler": "scheduler",
    "airflow-dag-processor": "dag-processor",
    "airflow-worker": "celery worker",
    "airflow-triggerer": "triggerer",
}
AIRFLOW_SERVICES = [*AIRFLOW_COMMANDS, "airflow-init"]
REQUIRED_SERVICES = ["postgres", "redis", "sandbox", *AIRFLOW_SERVICES]
PROJECT_MOUNTS = {folder: f"/opt/airflow/{folder}" for folder in ("dags", "plugins", "include")}
REQUIRED_ENV = [
    "AIRFLOW__CORE__EXECUTOR",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
    "AIRFLOW__CELERY__BROKER_URL",
    "AIRFLOW__CELERY__RESULT_BACKEND",
    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
    "AIRFLOW__API_AUTH__JWT_SECRET",
    "AIRFLOW__CORE__FERNET_KEY",
    "AIRFLOW_CONN_DICOM_INGEST_DEFAULT",
    "AIRFLOW_CONN_DICOM_INGEST_LEDGER",
    "DICOM_INGEST_LEDGER_CONN_ID",
    "DICOM_INGEST_SITES_FILE",
]
COMPOSE_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}")


def interpolate(value: str) -> str:
    """Resolve compose's ``${NAME:-default}`` to its default and ``$$`` to ``$``, as with no ``.env``."""
    return COMPOSE_VARIABLE.sub(
        lambda match: "$" if match.group(0) == "$$" else match.group("default") or "", value
    )


def load_compose() -> dict[str, Any]:
    """Parse docker-compose.yaml, anchors and merge keys resolved."""
    return yaml.safe_load(COMPOSE_PATH.read_text(encoding="utf-8"))


def command_words(service: dict[str, Any]) -> list[str]:
    """Return a service's command as a list of interpolated words."""
    command = service.get("command", [])
    words = shlex.split(command) if isinstance(command, str) else [str(word) for word in command]
    return [interpolate(word) for word in words]


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Return a service's volumes as ``{container path: host path or volume name}``."""
    pairs = (interpolate(volume).split(":")[:2] for volume in service.get("volumes", []))
    return {target: source for source, target in pairs}


def environment(service: dict[str, Any]) -> dict[str, str]:
    """Return a service's environment, interpolated."""
    return {key: interpolate(str(value)) for key, value in (service.get("environment") or {}).items()}


def sandbox_arguments(compose: dict[str, Any]) -> Any:
    """Parse the sandbox service's command with the sandbox's own command-line parser."""
    return build_parser().parse_args(command_words(compose["services"]["sandbox"]))


def airflow_service_problems(compose: dict[str, Any], name: str) -> list[str]:
    """Check one Airflow service: shared image and environment, mounts, command, health, start order."""
    service = compose["services"][name]
    common = compose["x-airflow-common"]
    problems = []
    if service.get("image") != common["image"] or service.get("build") != common["build"]:
        problems.append(f"{name}: does not run the project's image built from the Dockerfile")
    service_env, common_env = environment(service), environment(common)
    problems += [
        f"{name}: environment lacks {key} of x-airflow-common"
        for key, value in common_env.items()
        if service_env.get(key) != value
    ]
    problems += [
        f"{name}: ./{folder} is not mounted at {target}"
        for folder, target in PROJECT_MOUNTS.items()
        if PurePosixPath(mounts(service).get(target, "")) != PurePosixPath(folder)
    ]
    expected_command = AIRFLOW_COMMANDS.get(name)
    if expected_command and command_words(service) != expected_command.split():
        problems.append(f"{name}: command is not '{expected_command}'")
    if expected_command and not service.get("healthcheck", {}).get("test"):
        problems.append(f"{name}: no healthcheck")
    depends_on = service.get("depends_on", {})
    for dependency in ("postgres", "redis"):
        if depends_on.get(dependency, {}).get("condition") != "service_healthy":
            problems.append(f"{name}: does not wait for {dependency} to be healthy")
    if expected_command and depends_on.get("airflow-init", {}).get("condition") != (
        "service_completed_successfully"
    ):
        problems.append(f"{name}: does not wait for airflow-init")
    return problems


def common_environment_problems(compose: dict[str, Any]) -> list[str]:
    """Check the shared environment: executor, database, broker, execution API, secrets, project keys."""
    env = environment(compose["x-airflow-common"])
    problems = [f"x-airflow-common: {key} is missing" for key in REQUIRED_ENV if key not in env]
    if problems:
        return problems
    if not env["AIRFLOW__API_AUTH__JWT_SECRET"]:
        problems.append("x-airflow-common: no JWT secret shared by the components")
    services = compose["services"]
    if env["AIRFLOW__CORE__EXECUTOR"] != "CeleryExecutor":
        problems.append("x-airflow-common: executor is not CeleryExecutor")
    if urlsplit(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]).hostname != "postgres":
        problems.append("x-airflow-common: metadata database is not the postgres service")
    if urlsplit(env["AIRFLOW__CELERY__BROKER_URL"]).hostname != "redis":
        problems.append("x-airflow-common: Celery broker is not the redis service")
    execution_api = urlsplit(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
    apiserver_ports = {
        str(port).split(":")[-1] for port in services.get("airflow-apiserver", {}).get("ports", [])
    }
    if (
        execution_api.hostname != "airflow-apiserver"
        or str(execution_api.port) not in apiserver_ports
        or execution_api.path != "/execution/"
    ):
        problems.append("x-airflow-common: execution API URL does not point at airflow-apiserver")
    return problems + project_environment_problems(compose, env)


def project_environment_problems(compose: dict[str, Any], env: dict[str, str]) -> list[str]:
    """Check the vendor connection (the sandbox, by name), the ledger connection and the sites file."""
    problems = []
    connection = json.loads(env["AIRFLOW_CONN_DICOM_INGEST_DEFAULT"])
    vendor_url = urlsplit(connection.get("host", ""))
    if "sandbox" in compose["services"]:
        sandbox = sandbox_arguments(compose)
        if (vendor_url.hostname, vendor_url.port) != ("sandbox", sandbox.port):
            problems.append("dicom_ingest_default: does not reach the sandbox service by name and port")
        if (connection.get("login"), connection.get("password")) != (
            sandbox.client_id,
            sandbox.client_secret,
        ):
            problems.append("dicom_ingest_default: credentials differ from the sandbox's")
    if connection.get("conn_type") != "dicom_ingest":
        problems.append("dicom_ingest_default: connection type is not dicom_ingest")
    ledger_conn_env = f"AIRFLOW_CONN_{env['DICOM_INGEST_LEDGER_CONN_ID'].upper()}"
    ledger = urlsplit(env.get(ledger_conn_env, ""))
    init_sql = compose.get("configs", {}).get("ledger-database", {}).get("content", "")
    if ledger.scheme != "postgresql" or ledger.hostname != "postgres":
        problems.append("ledger: DICOM_INGEST_LEDGER_CONN_ID does not name a postgres connection")
    elif f"CREATE DATABASE {ledger.path.lstrip('/')}" not in init_sql:
        problems.append("ledger: its database is not created when postgres initialises")
    sites_file = PurePosixPath(env["DICOM_INGEST_SITES_FILE"])
    if not sites_file.is_relative_to(PROJECT_MOUNTS["include"]):
        problems.append("DICOM_INGEST_SITES_FILE: not inside the mounted include folder")
    return problems


def sandbox_problems(compose: dict[str, Any]) -> list[str]:
    """Check the sandbox service: project image, the console script on all interfaces, health."""
    sandbox = compose["services"]["sandbox"]
    problems = []
    if sandbox.get("image") != compose["x-airflow-common"]["image"]:
        problems.append("sandbox: does not run the project's image")
    if sandbox.get("entrypoint") != ["dicom-ingest-sandbox"]:
        problems.append("sandbox: does not run dicom-ingest-sandbox")
    if sandbox_arguments(compose).host != "0.0.0.0":
        problems.append("sandbox: does not listen on all interfaces")
    if not sandbox.get("healthcheck", {}).get("test"):
        problems.append("sandbox: no healthcheck")
    return problems


def worker_problems(compose: dict[str, Any]) -> list[str]:
    """Check what only the worker needs: the API server first, and a route to the sandbox's store."""
    worker = compose["services"]["airflow-worker"]
    problems = []
    if worker.get("depends_on", {}).get("airflow-apiserver", {}).get("condition") != "service_healthy":
        problems.append("airflow-worker: does not wait for airflow-apiserver to be healthy")
    # The sandbox presigns URLs for its store's loopback address: only a worker in its network
    # namespace can send the PUTs.
    if worker.get("network_mode") != "service:sandbox":
        problems.append("airflow-worker: not in the sandbox's network namespace")
    if worker.get("depends_on", {}).get("sandbox", {}).get("condition") != "service_healthy":
        problems.append("airflow-worker: does not wait for the sandbox to be healthy")
    return problems


def compose_problems(compose: dict[str, Any]) -> list[str]:
    """Return every way ``compose`` falls short of the distributed layout, or an empty list."""
    services = compose.get("services", {})
    missing = [f"service {name} missing" for name in REQUIRED_SERVICES if name not in services]
    if missing:
        return missing
    problems = common_environment_problems(compose) + sandbox_problems(compose) + worker_problems(compose)
    for name in AIRFLOW_SERVICES:
        problems += airflow_service_problems(compose, name)
    for name, service in services.items():
        if "_PIP_ADDITIONAL_REQUIREMENTS" in (service.get("environment") or {}):
            problems.append(f"{name}: installs packages at start-up (_PIP_ADDITIONAL_REQUIREMENTS)")
    init_command = " ".join(command_words(services["airflow-init"]))
    if f"airflow pools set {DEFAULT_POOL} " not in init_command:
        problems.append(f"airflow-init: does not create the pool {DEFAULT_POOL}")
    return problems


@pytest.fixture
def compose() -> dict[str, Any]:
    """Return a fresh parse of docker-compose.yaml that a test may alter."""
    return load_compose()


def test_compose_file_has_everything_the_distributed_layout_needs(compose: dict[str, Any]) -> None:
    assert compose_problems(compose) == []


@pytest.mark.parametrize("name", REQUIRED_SERVICES)
def test_removing_a_service_is_noticed(compose: dict[str, Any], name: str) -> None:
    del compose["services"][name]
    assert f"service {name} missing" in compose_problems(compose)


@pytest.mark.parametrize("key", REQUIRED_ENV)
def test_removing_a_shared_environment_key_is_noticed(compose: dict[str, Any], key: str) -> None:
    del compose["x-airflow-common"]["environment"][key]
    assert f"x-airflow-common: {key} is missing" in compose_problems(compose)


@pytest.mark.parametrize("key", REQUIRED_ENV)
def test_a_service_without_the_shared_environment_is_noticed(compose: dict[str, Any], key: str) -> None:
    worker = compose["services"]["airflow-worker"]
    worker["environment"] = {name: value for name, value in worker["environment"].items() if name != key}
    assert f"airflow-worker: environment lacks {key} of x-airflow-common" in compose_problems(compose)


@pytest.mark.parametrize("folder", PROJECT_MOUNTS)
def test_removing_a_project_mount_is_noticed(compose: dict[str, Any], folder: str) -> None:
    triggerer = compose["services"]["airflow-triggerer"]
    triggerer["volumes"] = [
        volume for volume in triggerer["volumes"] if not volume.endswith(f":/opt/airflow/{folder}")
    ]
    assert f"airflow-triggerer: ./{folder} is not mounted at /opt/airflow/{folder}" in compose_problems(
        compose
    )


@pytest.mark.parametrize("name", AIRFLOW_SERVICES)
def test_a_service_on_another_image_is_noticed(compose: dict[str, Any], name: str) -> None:
    compose["services"][name] = {**compose["services"][name], "image": AIRFLOW_BASE_IMAGE}
    assert f"{name}: does not run the project's image built from the Dockerfile" in compose_problems(compose)


@pytest.mark.parametrize(("name", "command"), AIRFLOW_COMMANDS.items())
def test_a_wrong_command_is_noticed(compose: dict[str, Any], name: str, command: str) -> None:
    compose["services"][name]["command"] = "standalone"
    assert f"{name}: command is not '{command}'" in compose_problems(compose)


def test_components_without_a_shared_jwt_secret_are_noticed(compose: dict[str, Any]) -> None:
    compose["x-airflow-common"]["environment"]["AIRFLOW__API_AUTH__JWT_SECRET"] = "${JWT_SECRET:-}"
    assert "x-airflow-common: no JWT secret shared by the components" in compose_problems(compose)


def test_worker_starting_before_a_healthy_api_server_is_noticed(compose: dict[str, Any]) -> None:
    compose["services"]["airflow-worker"]["depends_on"]["airflow-apiserver"] = {
        "condition": "service_started"
    }
    assert "airflow-worker: does not wait for airflow-apiserver to be healthy" in compose_problems(compose)


def test_worker_outside_the_sandbox_network_namespace_is_noticed(compose: dict[str, Any]) -> None:
    del compose["services"]["airflow-worker"]["network_mode"]
    assert "airflow-worker: not in the sandbox's network namespace" in compose_problems(compose)


def test_connection_to_another_host_is_noticed(compose: dict[str, Any]) -> None:
    env = compose["x-airflow-common"]["environment"]
    env["AIRFLOW_CONN_DICOM_INGEST_DEFAULT"] = env["AIRFLOW_CONN_DICOM_INGEST_DEFAULT"].replace(
        "http://sandbox:", "http://localhost:"
    )
    assert "dicom_ingest_default: does not reach the sandbox service by name and port" in compose_problems(
        compose
    )


def test_sandbox_on_another_port_than_the_connection_is_noticed(compose: dict[str, Any]) -> None:
    command = compose["services"]["sandbox"]["command"]
    command[command.index("--port") + 1] = "9000"
    assert "dicom_ingest_default: does not reach the sandbox service by name and port" in compose_problems(
        compose
    )


def test_sandbox_with_other_credentials_than_the_connection_is_noticed(compose: dict[str, Any]) -> None:
    command = compose["services"]["sandbox"]["command"]
    command[command.index("--client-secret") + 1] = "another-secret"
    assert "dicom_ingest_default: credentials differ from the sandbox's" in compose_problems(compose)


def test_sandbox_listening_on_loopback_only_is_noticed(compose: dict[str, Any]) -> None:
    command = compose["services"]["sandbox"]["command"]
    command[command.index("--host") + 1] = "127.0.0.1"
    assert "sandbox: does not listen on all interfaces" in compose_problems(compose)


def test_ledger_without_its_database_is_noticed(compose: dict[str, Any]) -> None:
    del compose["configs"]
    assert "ledger: its database is not created when postgres initialises" in compose_problems(compose)


def test_packages_installed_at_start_up_are_noticed(compose: dict[str, Any]) -> None:
    worker = compose["services"]["airflow-worker"]
    worker["environment"] = {**worker["environment"], "_PIP_ADDITIONAL_REQUIREMENTS": "airflow-dicom-ingest"}
    assert "airflow-worker: installs packages at start-up (_PIP_ADDITIONAL_REQUIREMENTS)" in compose_problems(
        compose
    )


def test_init_without_the_vendor_pool_is_noticed(compose: dict[str, Any]) -> None:
    init = compose["services"]["airflow-init"]
    init["command"] = [re.sub(r"airflow pools set \S+", "true", word) for word in init["command"]]
    assert f"airflow-init: does not create the pool {DEFAULT_POOL}" in compose_problems(compose)


def test_sites_file_named_in_compose_is_the_mounted_one_and_is_valid(compose: dict[str, Any]) -> None:
    env = environment(compose["x-airflow-common"])
    in_container = PurePosixPath(env["DICOM_INGEST_SITES_FILE"])
    on_host = REPO_ROOT / "include" / in_container.relative_to(PROJECT_MOUNTS["include"])

    result = load_sites(on_host)

    assert result.errors == ()
    demo = next(site for site in result.enabled_sites if site.id == "demo")
    assert f"AIRFLOW_CONN_{demo.conn_id.upper()}" in env
    assert "DICOM_INGEST_DEMO_ROOT" in demo.staging
    assert env["DICOM_INGEST_DEMO_ROOT"] in mounts(compose["services"]["airflow-worker"])


def dockerfile_instructions() -> list[tuple[str, str]]:
    """Return the Dockerfile's instructions as ``(INSTRUCTION, arguments)``, continuations joined."""
    text = DOCKERFILE_PATH.read_text(encoding="utf-8").replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_extends_the_official_image_and_installs_the_project() -> None:
    instructions = dockerfile_instructions()
    compose = load_compose()

    assert compose["x-airflow-common"]["build"]["dockerfile"] == DOCKERFILE_PATH.name
    assert instructions[0] == ("FROM", AIRFLOW_BASE_IMAGE)
    runs = " ".join(arguments for instruction, arguments in instructions if instruction == "RUN")
    assert re.search(r'pip install .*"apache-airflow==\$\{AIRFLOW_VERSION\}"', runs)
    assert '"/opt/airflow-dicom-ingest[sandbox]"' in runs
    assert "_PIP_ADDITIONAL_REQUIREMENTS" not in DOCKERFILE_PATH.read_text(encoding="utf-8")


def test_dockerfile_copies_what_the_package_build_needs() -> None:
    copied = [
        arguments.split() for instruction, arguments in dockerfile_instructions() if instruction == "COPY"
    ]
    sources = {source for words in copied for source in words[:-1] if not source.startswith("--")}

    assert {"pyproject.toml", "README.md", "plugins/dicom_ingest", "sandbox/dicom_ingest_sandbox"} <= sources
    assert all((REPO_ROOT / source).exists() for source in sources)
