"""The structure of docker-compose.yaml and the Dockerfile (Docker itself cannot run here).

:func:`compose_problems` lists everything the distributed layout needs and is missing; the real
file must have none, and each removal test takes one part away to show the check notices.
Besides the services and their wiring, it checks that every Airflow setting the file makes is an
option Airflow knows (a misspelt one is silently ignored), and that a study interrupted by a lost
worker is re-sent within the vendor's timing rules.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from airflow import __version__ as AIRFLOW_VERSION
from airflow.configuration import retrieve_configuration_description

from dicom_ingest.sites import load_sites
from dicom_ingest.sites.config import DEFAULT_POOL
from dicom_ingest.sites.loader import SitesLoadResult
from dicom_ingest_sandbox.cli import build_parser
from dicom_ingest_sandbox.config import Clocks
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
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT",
    "AIRFLOW_CONN_DICOM_INGEST_DEFAULT",
    "AIRFLOW_CONN_DICOM_INGEST_LEDGER",
    "DICOM_INGEST_LEDGER_CONN_ID",
    "DICOM_INGEST_SITES_FILE",
]
SCALING_BLOCKERS = ("container_name", "hostname", "ports")
"""Service keys that two replicas cannot share: a worker with one of them cannot be scaled."""
VENDOR_CLOCKS = Clocks()
"""The vendor's timing rules, as the sandbox's defaults reproduce them (quiet period, overwrite window)."""
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


def mounted_sites(env: dict[str, str]) -> SitesLoadResult:
    """Load the sites file that ``DICOM_INGEST_SITES_FILE`` names, from the host folder mounted there."""
    in_container = PurePosixPath(env["DICOM_INGEST_SITES_FILE"])
    return load_sites(REPO_ROOT / "include" / in_container.relative_to(PROJECT_MOUNTS["include"]))


@functools.cache
def airflow_options() -> dict[str, dict[str, Any]]:
    """Return the options of this Airflow and its installed providers, per section, with their defaults."""
    description = retrieve_configuration_description(include_airflow=True, include_providers=True)
    return {section: body["options"] for section, body in description.items()}


def airflow_option(variable: str) -> tuple[str, str] | None:
    """Return the ``(section, option)`` an ``AIRFLOW__<SECTION>__<OPTION>`` variable sets, else None."""
    parts = variable.split("__")
    if len(parts) != 3 or parts[0] != "AIRFLOW":
        return None
    return parts[1].lower(), parts[2].lower()


def is_airflow_option(section: str, option: str) -> bool:
    """Tell whether Airflow reads ``option`` of ``section``, as itself or its ``_cmd``/``_secret`` form."""
    known = airflow_options().get(section, {})
    names = (option, option.removesuffix("_cmd"), option.removesuffix("_secret"))
    return any(name in known for name in names)


def airflow_setting(env: dict[str, str], section: str, option: str) -> float:
    """Return a numeric Airflow setting as ``env`` makes it: its own value, else Airflow's default."""
    value = env.get(f"AIRFLOW__{section.upper()}__{option.upper()}")
    return float(value if value is not None else airflow_options()[section][option]["default"])


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


def unknown_option_problems(compose: dict[str, Any]) -> list[str]:
    """List the ``AIRFLOW__<SECTION>__<OPTION>`` variables that name no option of this Airflow.

    Airflow ignores them without a word, e.g. an option under the name it had in Airflow 2.
    """
    places = {"x-airflow-common": compose["x-airflow-common"], **compose["services"]}
    return [
        f"{place}: {variable} is not an option of Airflow {AIRFLOW_VERSION}"
        for place, service in places.items()
        for variable in service.get("environment") or {}
        if (option := airflow_option(variable)) is not None and not is_airflow_option(*option)
    ]


def lost_worker_problems(compose: dict[str, Any], env: dict[str, str]) -> list[str]:
    """Check that a study interrupted by a lost worker is re-sent soon enough for the vendor.

    The scheduler fails, and so retries, a task instance whose heartbeats stopped
    ``task_instance_heartbeat_timeout`` seconds ago (looking every ``..._detection_interval``);
    the site's retry then waits ``retry_delay_seconds`` and re-sends the interrupted study. The
    vendor starts processing a study whose instances stopped arriving for its quiet period, and
    joins a re-send to the same order only within its overwrite window.
    """
    timeout = airflow_setting(env, "scheduler", "task_instance_heartbeat_timeout")
    problems = []
    if timeout <= airflow_setting(env, "workers", "min_heartbeat_interval"):
        problems.append("x-airflow-common: the heartbeat timeout fails tasks that are still running")
    if timeout > VENDOR_CLOCKS.quiet_period:
        problems.append("x-airflow-common: a lost worker is noticed after the vendor's quiet period")
    noticed_after = timeout + airflow_setting(
        env, "scheduler", "task_instance_heartbeat_timeout_detection_interval"
    )
    problems += [
        f"site {site.id}: a lost worker's study is re-sent after the vendor's overwrite window"
        for site in mounted_sites(env).enabled_sites
        if noticed_after + site.retry_delay_seconds >= VENDOR_CLOCKS.overwrite_window
    ]
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
    return problems + project_environment_problems(compose, env) + lost_worker_problems(compose, env)


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
    """Check the sandbox service: project image, the console script on all interfaces, health.

    Its API and its store must both be reachable by name over the compose network: the store's
    presigned URLs name the service (``--public-host``) and a fixed port the service exposes.
    """
    sandbox = compose["services"]["sandbox"]
    arguments = sandbox_arguments(compose)
    problems = []
    if sandbox.get("image") != compose["x-airflow-common"]["image"]:
        problems.append("sandbox: does not run the project's image")
    if sandbox.get("entrypoint") != ["dicom-ingest-sandbox"]:
        problems.append("sandbox: does not run dicom-ingest-sandbox")
    if arguments.host != "0.0.0.0":
        problems.append("sandbox: does not listen on all interfaces")
    if arguments.public_host != "sandbox":
        problems.append("sandbox: presigned URLs do not name the sandbox service")
    exposed = {str(port) for port in sandbox.get("expose", [])}
    if not arguments.store_port or str(arguments.store_port) not in exposed:
        problems.append("sandbox: the object store is not on a fixed, exposed port")
    if not sandbox.get("healthcheck", {}).get("test"):
        problems.append("sandbox: no healthcheck")
    return problems


def worker_problems(compose: dict[str, Any]) -> list[str]:
    """Check what only the worker needs: the API server and the sandbox first, and room to scale."""
    worker = compose["services"]["airflow-worker"]
    problems = []
    if worker.get("depends_on", {}).get("airflow-apiserver", {}).get("condition") != "service_healthy":
        problems.append("airflow-worker: does not wait for airflow-apiserver to be healthy")
    if worker.get("depends_on", {}).get("sandbox", {}).get("condition") != "service_healthy":
        problems.append("airflow-worker: does not wait for the sandbox to be healthy")
    problems += [f"airflow-worker: cannot be scaled ({key})" for key in SCALING_BLOCKERS if key in worker]
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
        if "network_mode" in service:
            problems.append(f"{name}: not on the compose network (network_mode)")
    problems += unknown_option_problems(compose)
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


@pytest.mark.parametrize(
    ("name", "network_mode"),
    [("airflow-worker", "service:sandbox"), ("airflow-triggerer", "host"), ("sandbox", "host")],
)
def test_a_service_off_the_compose_network_is_noticed(
    compose: dict[str, Any], name: str, network_mode: str
) -> None:
    compose["services"][name]["network_mode"] = network_mode
    assert f"{name}: not on the compose network (network_mode)" in compose_problems(compose)


@pytest.mark.parametrize(
    ("key", "value"), [("container_name", "airflow-worker"), ("hostname", "worker"), ("ports", ["8793:8793"])]
)
def test_a_worker_that_cannot_be_scaled_is_noticed(compose: dict[str, Any], key: str, value: Any) -> None:
    compose["services"]["airflow-worker"][key] = value
    assert f"airflow-worker: cannot be scaled ({key})" in compose_problems(compose)


def test_worker_starting_before_the_sandbox_is_healthy_is_noticed(compose: dict[str, Any]) -> None:
    del compose["services"]["airflow-worker"]["depends_on"]["sandbox"]
    assert "airflow-worker: does not wait for the sandbox to be healthy" in compose_problems(compose)


def without_flag(command: list[str], flag: str) -> list[str]:
    """Return ``command`` without ``flag`` and its value."""
    position = command.index(flag)
    return command[:position] + command[position + 2 :]


def test_presigned_urls_naming_the_sandbox_s_loopback_address_are_noticed(compose: dict[str, Any]) -> None:
    sandbox = compose["services"]["sandbox"]
    sandbox["command"] = without_flag(sandbox["command"], "--public-host")
    assert "sandbox: presigned URLs do not name the sandbox service" in compose_problems(compose)


def test_presigned_urls_naming_another_host_are_noticed(compose: dict[str, Any]) -> None:
    command = compose["services"]["sandbox"]["command"]
    command[command.index("--public-host") + 1] = "localhost"
    assert "sandbox: presigned URLs do not name the sandbox service" in compose_problems(compose)


def test_object_store_on_a_random_port_is_noticed(compose: dict[str, Any]) -> None:
    sandbox = compose["services"]["sandbox"]
    sandbox["command"] = without_flag(sandbox["command"], "--store-port")
    assert "sandbox: the object store is not on a fixed, exposed port" in compose_problems(compose)


def test_object_store_port_not_exposed_is_noticed(compose: dict[str, Any]) -> None:
    del compose["services"]["sandbox"]["expose"]
    assert "sandbox: the object store is not on a fixed, exposed port" in compose_problems(compose)


def test_an_airflow_setting_under_a_name_airflow_does_not_read_is_noticed(compose: dict[str, Any]) -> None:
    env = compose["x-airflow-common"]["environment"]
    # Airflow 2's name of the heartbeat timeout, which Airflow 3 ignores.
    env["AIRFLOW__SCHEDULER__SCHEDULER_ZOMBIE_TASK_THRESHOLD"] = "60"
    assert (
        f"x-airflow-common: AIRFLOW__SCHEDULER__SCHEDULER_ZOMBIE_TASK_THRESHOLD is not an option of "
        f"Airflow {AIRFLOW_VERSION}"
    ) in compose_problems(compose)


@pytest.mark.parametrize(
    ("variable", "known"),
    [
        ("AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT", True),
        ("AIRFLOW__CELERY__BROKER_URL", True),  # an option of the Celery provider
        ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD", True),  # read from a command's output
        ("AIRFLOW__SCHEDULER__SCHEDULER_ZOMBIE_TASK_THRESHOLD", False),  # Airflow 2's name
        ("AIRFLOW__NO_SUCH_SECTION__TASK_INSTANCE_HEARTBEAT_TIMEOUT", False),
    ],
)
def test_the_option_check_knows_airflow_s_and_its_providers_options(variable: str, known: bool) -> None:
    option = airflow_option(variable)

    assert option is not None
    assert is_airflow_option(*option) is known


def test_heartbeat_timeout_is_shorter_than_airflow_s_default(compose: dict[str, Any]) -> None:
    env = environment(compose["x-airflow-common"])
    timeout = airflow_setting(env, "scheduler", "task_instance_heartbeat_timeout")

    assert timeout < float(airflow_options()["scheduler"]["task_instance_heartbeat_timeout"]["default"])


def test_heartbeat_timeout_left_at_airflow_s_default_is_noticed(compose: dict[str, Any]) -> None:
    del compose["x-airflow-common"]["environment"]["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"]
    problems = lost_worker_problems(compose, environment(compose["x-airflow-common"]))

    assert "x-airflow-common: a lost worker is noticed after the vendor's quiet period" in problems
    assert "site demo: a lost worker's study is re-sent after the vendor's overwrite window" in problems


def test_heartbeat_timeout_past_the_vendor_s_quiet_period_is_noticed(compose: dict[str, Any]) -> None:
    compose["x-airflow-common"]["environment"]["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"] = "90"
    assert "x-airflow-common: a lost worker is noticed after the vendor's quiet period" in compose_problems(
        compose
    )


def test_heartbeat_timeout_shorter_than_the_heartbeat_interval_is_noticed(compose: dict[str, Any]) -> None:
    compose["x-airflow-common"]["environment"]["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"] = "3"
    assert "x-airflow-common: the heartbeat timeout fails tasks that are still running" in compose_problems(
        compose
    )


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

    result = mounted_sites(env)

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
