"""Run Airflow's distributed topology (CeleryExecutor, PostgreSQL, Redis) as plain local processes.

::

    python -m scripts.stack up      # start everything, print where it is; Ctrl-C stops it all
    python -m scripts.stack down    # clean up after an ``up`` that was killed before it could

A stack is the layout of ``docker-compose.yaml`` without containers, on loopback only:

- a fresh metadata database ``dicom_ingest_airflow_<random>`` and a ledger database
  ``dicom_ingest_ledger_<random>`` on the PostgreSQL server at 127.0.0.1:5432 (user
  ``postgres``, trust authentication), both dropped on stop;
- the Celery broker on the Redis server at 127.0.0.1:6379, in a database index of its own
  (one of 1-15 that is empty and not claimed by another stack), flushed on stop;
- the vendor sandbox, unless one is passed in;
- a throw-away ``AIRFLOW_HOME`` whose whole configuration comes from environment variables, then
  ``airflow db migrate`` and one process each for the api-server, scheduler, dag-processor and
  triggerer, plus Celery workers, each writing its own log file.

Everything a stack starts it stops, by process id (the whole process tree, SIGKILL after a
grace period): on :meth:`Stack.stop`, on leaving its ``with`` block, at interpreter exit and on
SIGTERM (turned into ``SystemExit`` unless the program handles SIGTERM itself). ``up`` also
writes a state file so that ``down`` can finish the job if ``up`` itself was SIGKILLed.

Used from Python (tests, benchmarks)::

    with Stack(sites_file=Path("sites.yaml"), demo_root=Path("demo")) as stack:
        stack.wait_for_dag("dicom_ingest__demo")
        run_id = stack.trigger_dag("dicom_ingest__demo", logical_date="2025-01-02T00:00:00Z")
        run = stack.wait_for_run("dicom_ingest__demo", run_id, timeout=300)
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import psutil
import redis
import requests
from sqlalchemy import create_engine, make_url

from dicom_ingest_sandbox.testing import Sandbox, start_sandbox

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DAGS_FOLDER = REPO_ROOT / "dags"
DEFAULT_PLUGINS_FOLDER = REPO_ROOT / "plugins"

POSTGRES_ADMIN_URL = make_url("postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
REDIS_DATABASES = range(1, 16)
"""Redis database indexes a stack may claim; 0 is left to whoever else uses the server."""
REDIS_CLAIM_KEY = "dicom-ingest-stack:claimed-by"

ADMIN_USER = "admin"
VENDOR_CONN_ID = "dicom_ingest_default"
LEDGER_CONN_ID = "dicom_ingest_ledger"
DEFAULT_POOLS: Mapping[str, int] = {"dicom_ingest_vendor": 8}
"""The pool every site's vendor calls share (``SiteConfig.pool``'s default); smaller than the 20 slots
docker-compose's airflow-init gives it, to suit a 2-core machine."""

DEFAULT_STATE_FILE = Path(tempfile.gettempdir()) / "dicom-ingest-stack" / "stack.json"

FINISHED_RUN_STATES = frozenset({"success", "failed"})
SCHEDULER, DAG_PROCESSOR, TRIGGERER, API_SERVER = "scheduler", "dag-processor", "triggerer", "api-server"
HEALTH_COMPONENTS = ("metadatabase", SCHEDULER, TRIGGERER, "dag_processor")
WORKER_READY_MARK = " ready."
"""Celery logs ``celery@<hostname> ready.`` once its worker consumes from the broker."""

CELERY_EXECUTOR_CHECK = (
    "from importlib.metadata import version\n"
    "packages = ('celery', 'apache-airflow-providers-celery')\n"
    "print('installed:', ', '.join(f'{name} {version(name)}' for name in packages))\n"
    "import airflow.providers.celery.executors.celery_executor\n"
)
"""Imports the CeleryExecutor as the scheduler will, printing the versions that decide whether it can."""

_REQUEST_TIMEOUT_SECONDS = 30.0
_STOP_GRACE_SECONDS = 20.0
_POLL_SECONDS = 0.5
_PAGE_SIZE = 100

T = TypeVar("T")


class StackError(RuntimeError):
    """A stack component did not start, or an Airflow API call failed."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(
    condition: Callable[[], T | None], timeout: float, what: str, interval: float = _POLL_SECONDS
) -> T:
    """Call ``condition`` until it returns a truthy value, and return that value.

    :param condition: returns a falsy value while the wait goes on.
    :param timeout: seconds before giving up.
    :param what: what is awaited, for the error message.
    :param interval: seconds between two calls.
    :raises TimeoutError: ``condition`` stayed falsy for ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """Turn SIGTERM into ``SystemExit``, so that ``finally`` blocks and ``atexit`` stop the stack."""
    raise SystemExit(128 + signum)


def _catch_sigterm() -> bool:
    """Install :func:`_exit_on_sigterm` if SIGTERM would otherwise end the interpreter outright.

    Return whether it was installed (only from the main thread, and only over the default action).
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return False
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return True


# --- processes ----------------------------------------------------------------------------------


def _process_tree(pid: int) -> list[psutil.Process]:
    """Return the process ``pid`` and all its descendants that are alive (empty when it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _signal_processes(processes: Sequence[psutil.Process], sig: signal.Signals) -> None:
    """Send ``sig`` to each process that is still the one recorded (psutil checks its start time)."""
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            process.send_signal(sig)


def _kill_tree(processes: Sequence[psutil.Process]) -> None:
    """SIGKILL the given processes and their process groups, and reap what can be reaped."""
    own_group = os.getpgid(0)
    groups = set()
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            groups.add(os.getpgid(process.pid))
    _signal_processes(processes, signal.SIGKILL)
    for group in groups - {own_group}:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    psutil.wait_procs(processes, timeout=5)


@dataclass
class ManagedProcess:
    """One long-running process of the stack, started in a session of its own.

    :param name: a short name, also the stem of its log file (``worker-2``).
    :param popen: the process.
    :param log_path: where its stdout and stderr go.
    """

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    _tree: list[psutil.Process] = field(default_factory=list, repr=False)

    @property
    def pid(self) -> int:
        """Return the process id."""
        return self.popen.pid

    def alive(self) -> bool:
        """Tell whether the process is still running."""
        return self.popen.poll() is None

    def log_text(self) -> str:
        """Return the log file's content so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        """Return the last ``lines`` lines of the log file.

        :param lines: how many lines.
        """
        return "\n".join(self.log_text().splitlines()[-lines:])

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send ``sig`` to the process and every descendant at once, as a crashed machine would.

        :param sig: the signal; SIGKILL also kills their process groups and waits for the process.
        """
        tree = _process_tree(self.pid)
        if sig != signal.SIGKILL:
            _signal_processes(tree, sig)
            return
        _kill_tree(tree)
        self.popen.wait()

    def terminate(self) -> None:
        """Ask the process to stop (SIGTERM), remembering its process tree for :meth:`stop`."""
        self._tree = _process_tree(self.pid)
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)

    def stop(self, grace: float = _STOP_GRACE_SECONDS) -> None:
        """Stop the process (SIGTERM unless :meth:`terminate` did), SIGKILL its tree's rest after ``grace``.

        :param grace: seconds the process gets to shut down cleanly.
        """
        if not self._tree:
            self.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=grace)
        leftovers = [process for process in {*self._tree, *_process_tree(self.pid)} if process.is_running()]
        if leftovers:
            _kill_tree(leftovers)
        if self.alive():
            self.popen.kill()
        self.popen.wait()

    def record(self) -> dict[str, Any]:
        """Return what ``down`` needs to find the process again: name, pid, start time."""
        try:
            created = psutil.Process(self.pid).create_time()
        except psutil.NoSuchProcess:
            created = None
        return {"name": self.name, "pid": self.pid, "create_time": created}


# --- the stack ----------------------------------------------------------------------------------


@dataclass
class Stack:
    """Airflow on CeleryExecutor with PostgreSQL, Redis and the vendor sandbox, as local processes.

    Nothing runs until :meth:`start` (or entering a ``with`` block). The sandbox is started
    with ``sandbox_clocks`` unless ``sandbox`` is given, in which case the caller owns it.

    :param dags_folder: the DAGs folder (this repository's ``dags/`` by default).
    :param plugins_folder: the plugins folder (this repository's ``plugins/`` by default).
    :param sites_file: the sites file (``$DICOM_INGEST_SITES_FILE``); the loader's default when None.
    :param demo_root: ``$DICOM_INGEST_DEMO_ROOT``, the demo site's staging root; unset when None.
    :param sandbox: a running sandbox to point ``dicom_ingest_default`` at.
    :param sandbox_clocks: clocks of the sandbox the stack starts, e.g. ``{"quiet_period": 2}``.
    :param workers: Celery workers started with the stack.
    :param worker_concurrency: task slots per worker.
    :param parallelism: ``[core] parallelism``: task instances running at once, all workers together.
    :param heartbeat_timeout: seconds without a heartbeat after which the scheduler fails a running
        task instance (its worker is gone); Airflow's default is 300.
    :param scheduled_runs: let the scheduler create runs from DAG schedules; when False (``[scheduler]
        use_job_schedule``), only runs asked for (REST API, CLI, backfills) exist.
    :param pools: Airflow pools to create, name to slots.
    :param extra_env: more environment variables for every Airflow process.
    :param base_dir: where ``AIRFLOW_HOME``, logs and the sandbox's data go; a new temporary
        folder (removed on stop) when None.
    :param startup_timeout: seconds each start-up step may take.
    :param state_file: where to record pids, databases and the Redis index for ``down``; none
        when None.
    """

    dags_folder: Path = DEFAULT_DAGS_FOLDER
    plugins_folder: Path = DEFAULT_PLUGINS_FOLDER
    sites_file: Path | None = None
    demo_root: Path | None = None
    sandbox: Sandbox | None = None
    sandbox_clocks: Mapping[str, Any] = field(default_factory=dict)
    workers: int = 1
    worker_concurrency: int = 2
    parallelism: int = 4
    heartbeat_timeout: float = 20.0
    scheduled_runs: bool = False
    pools: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_POOLS))
    extra_env: Mapping[str, str] = field(default_factory=dict)
    base_dir: Path | None = None
    startup_timeout: float = 180.0
    state_file: Path | None = None

    def __post_init__(self) -> None:
        self.stack_id = secrets.token_hex(4)
        self.metadata_db = f"dicom_ingest_airflow_{self.stack_id}"
        self.ledger_db = f"dicom_ingest_ledger_{self.stack_id}"
        self.redis_db: int | None = None
        self.api_port = 0
        self.env: dict[str, str] = {}
        self.processes: dict[str, ManagedProcess] = {}
        self._created_databases: list[str] = []
        self._owns_base_dir = self.base_dir is None
        self._owns_sandbox = self.sandbox is None
        self._admin_password = secrets.token_urlsafe(16)
        self._token: str | None = None
        self._session = requests.Session()
        self._worker_count = 0
        self._started = False
        self._caught_sigterm = False
        self._stopped = False
        self._stop_lock = threading.Lock()
        self.observed_states: dict[tuple[str, str], dict[tuple[str, int], list[str]]] = {}
        """Task instance states seen while :meth:`wait_for_run` polled, per run and TI, in order."""

    # -- context manager -------------------------------------------------------------------------

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- locations -------------------------------------------------------------------------------

    @property
    def home(self) -> Path:
        """Return the stack's ``AIRFLOW_HOME``."""
        return self._base / "airflow-home"

    @property
    def logs_dir(self) -> Path:
        """Return the folder holding one log file per process."""
        return self._base / "logs"

    @property
    def task_logs_dir(self) -> Path:
        """Return Airflow's ``[logging] base_log_folder`` (task and trigger logs)."""
        return self.home / "logs"

    @property
    def api_url(self) -> str:
        """Return the api-server's base URL."""
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def ledger_url(self) -> str:
        """Return the SQLAlchemy URL of the ledger database."""
        return POSTGRES_ADMIN_URL.set(database=self.ledger_db).render_as_string(hide_password=False)

    @property
    def metadata_url(self) -> str:
        """Return the SQLAlchemy URL of the metadata database."""
        return POSTGRES_ADMIN_URL.set(database=self.metadata_db).render_as_string(hide_password=False)

    @property
    def password_file(self) -> Path:
        """Return the simple auth manager's password file (user ``admin``)."""
        return self.home / "simple_auth_manager_passwords.json"

    @property
    def _base(self) -> Path:
        if self.base_dir is None:
            raise StackError("the stack has not been started")
        return self.base_dir

    # -- start and stop --------------------------------------------------------------------------

    def start(self) -> None:
        """Create the databases, claim a Redis index, start the sandbox and every Airflow process.

        On any failure, whatever was started is stopped again before the error propagates.

        :raises StackError: a step failed.
        """
        if self._started:
            raise StackError("a stack starts once")
        self._started = True
        atexit.register(self.stop)
        self._caught_sigterm = _catch_sigterm()
        try:
            if self.base_dir is None:
                self.base_dir = Path(tempfile.mkdtemp(prefix="dicom-ingest-stack-"))
            for folder in (self.home, self.logs_dir, self.home / "dags-bundles"):
                folder.mkdir(parents=True, exist_ok=True)
            self._create_databases()
            self._claim_redis_database()
            if self.sandbox is None:
                self.sandbox = start_sandbox(self._base / "sandbox", **self.sandbox_clocks)
            self.api_port = free_port()
            self.password_file.write_text(json.dumps({ADMIN_USER: self._admin_password}))
            self.env = self._environment()
            self._write_state()
            celery_check = self._start_celery_executor_check()
            self.airflow("db", "migrate", timeout=self.startup_timeout)
            self._finish_celery_executor_check(celery_check)
            self._start_process(API_SERVER, "api-server", "--host", "127.0.0.1", "--port", str(self.api_port))
            wait_until(self._api_answers, self.startup_timeout, "the api-server")
            for name, slots in self.pools.items():
                self._create_pool(name, slots)
            self._start_process(SCHEDULER, "scheduler", "--skip-serve-logs")
            self._start_process(DAG_PROCESSOR, "dag-processor")
            self._start_process(TRIGGERER, "triggerer", "--skip-serve-logs")
            for _ in range(self.workers):
                self.start_worker(wait=False)
            self.wait_healthy()
            for worker in self.worker_names():
                self._wait_worker_ready(worker)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every process, drop the databases, flush the Redis index, remove temporary files.

        Safe to call more than once and from ``atexit``; each step runs even if another failed.
        """
        with self._stop_lock:
            if self._stopped or not self._started:
                return
            self._stopped = True
        steps: list[Callable[[], None]] = [
            self._terminate_processes,
            *(self._stopper(name) for name in self._stop_order()),
            self._stop_sandbox,
            self._drop_databases,
            self._flush_redis_database,
            self._remove_files,
        ]
        for step in steps:
            try:
                step()
            except Exception as exc:  # one failed step must not leave the others undone
                print(f"stack: a stop step failed: {exc!r}", file=sys.stderr)
        self._session.close()
        atexit.unregister(self.stop)
        if self._caught_sigterm and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def _stop_order(self) -> list[str]:
        """Return process names in stop order: workers first (no new work), the api-server last."""
        order = [*self.worker_names(), SCHEDULER, TRIGGERER, DAG_PROCESSOR, API_SERVER]
        return [name for name in order if name in self.processes] + [
            name for name in self.processes if name not in order
        ]

    def _terminate_processes(self) -> None:
        """Send SIGTERM to every process at once, so that they shut down in parallel."""
        for name in self._stop_order():
            self.processes[name].terminate()

    def _stopper(self, name: str) -> Callable[[], None]:
        return lambda: self.processes[name].stop()

    def _stop_sandbox(self) -> None:
        if self._owns_sandbox and self.sandbox is not None:
            self.sandbox.stop()

    def _remove_files(self) -> None:
        if self._owns_base_dir and self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        if self.state_file is not None:
            self.state_file.unlink(missing_ok=True)

    # -- databases and broker --------------------------------------------------------------------

    def _create_databases(self) -> None:
        """Create the metadata and ledger databases."""
        engine = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                for name in (self.metadata_db, self.ledger_db):
                    connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
                    self._created_databases.append(name)
        finally:
            engine.dispose()

    def _drop_databases(self) -> None:
        """Drop the databases this stack created, even while something is still connected."""
        drop_databases(self._created_databases)
        self._created_databases.clear()

    def _redis(self, database: int) -> redis.Redis:
        return redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=database, socket_timeout=10)

    def _claim_redis_database(self) -> None:
        """Claim an empty Redis database index for the broker by writing a marker key into it."""
        for database in REDIS_DATABASES:
            client = self._redis(database)
            try:
                if client.dbsize() == 0 and client.set(REDIS_CLAIM_KEY, self.stack_id, nx=True):
                    self.redis_db = database
                    return
            finally:
                client.close()
        raise StackError(f"no empty Redis database among {REDIS_DATABASES.start}-{REDIS_DATABASES.stop - 1}")

    def _flush_redis_database(self) -> None:
        """Empty the claimed Redis database (only that index)."""
        if self.redis_db is not None:
            flush_redis_database(self.redis_db)
            self.redis_db = None

    # -- configuration ---------------------------------------------------------------------------

    def _environment(self) -> dict[str, str]:
        """Return the environment of every Airflow process: the whole configuration, nothing inherited.

        Airflow settings and connections of the calling process (a test session's, say) are
        dropped, so the stack's processes read only what is set here.
        """
        assert self.sandbox is not None and self.redis_db is not None
        inherited = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("AIRFLOW", "DICOM_INGEST_", "_AIRFLOW"))
        }
        venv_bin = str(Path(sys.executable).parent)
        vendor_connection = {
            "conn_type": "dicom_ingest",
            "host": self.sandbox.base_url,
            "login": self.sandbox.client_id,
            "password": self.sandbox.client_secret,
        }
        env = {
            **inherited,
            "PATH": os.pathsep.join([venv_bin, inherited.get("PATH", "")]),
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(self.plugins_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
            "AIRFLOW__CORE__FERNET_KEY": _fernet_key(),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            "AIRFLOW__CORE__AUTH_MANAGER": (
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.password_file),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.metadata_url,
            "AIRFLOW__CELERY__BROKER_URL": f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.redis_db}",
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{self.metadata_url}",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(self.worker_concurrency),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__BASE_URL": self.api_url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            # One secret for every component: a fresh airflow.cfg would get a random one each.
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__API_AUTH__JWT_ISSUER": "dicom-ingest-stack",
            "AIRFLOW__LOGGING__COLORED_CONSOLE_LOG": "False",
            # Free ports even though every component runs with --skip-serve-logs where it can.
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_STORAGE_PATH": str(self.home / "dags-bundles"),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "15",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": str(self.scheduled_runs),
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(int(self.heartbeat_timeout)),
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
            "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "10",
            "AIRFLOW__SCHEDULER__TRIGGER_TIMEOUT_CHECK_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "120",
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT_CHECK_INTERVAL": "10",
            # The vendor sandbox and the ledger, as docker-compose.yaml wires them.
            f"AIRFLOW_CONN_{VENDOR_CONN_ID.upper()}": json.dumps(vendor_connection),
            f"AIRFLOW_CONN_{LEDGER_CONN_ID.upper()}": _postgres_conn_uri(self.ledger_db),
            "DICOM_INGEST_LEDGER_CONN_ID": LEDGER_CONN_ID,
        }
        if self.sites_file is not None:
            env["DICOM_INGEST_SITES_FILE"] = str(self.sites_file)
        if self.demo_root is not None:
            env["DICOM_INGEST_DEMO_ROOT"] = str(self.demo_root)
        env.update(self.extra_env)
        return env

    def _write_state(self) -> None:
        """Record what ``down`` needs to clean up if this process dies without stopping the stack."""
        if self.state_file is None:
            return
        sandbox_process = (
            [{"name": "sandbox", "pid": self.sandbox.pid, "create_time": _create_time(self.sandbox.pid)}]
            if self._owns_sandbox and self.sandbox is not None
            else []
        )
        state = {
            "stack_id": self.stack_id,
            "base_dir": str(self.base_dir) if self._owns_base_dir else None,
            "databases": list(self._created_databases),
            "redis_db": self.redis_db,
            "processes": [process.record() for process in self.processes.values()] + sandbox_process,
        }
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(state, indent=2))

    # -- processes -------------------------------------------------------------------------------

    def airflow(
        self, *args: str, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run an ``airflow`` CLI command with the stack's environment and return its result.

        :param args: the command's arguments, e.g. ``("dags", "list")``.
        :param check: raise when the command exits non-zero.
        :param timeout: seconds the command may take.
        :raises StackError: the command failed and ``check`` is set.
        """
        result = subprocess.run(
            ["airflow", *args],
            env=self.env,
            cwd=self._base,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise StackError(
                f"airflow {' '.join(args)} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                f"{result.stderr[-3000:]}"
            )
        return result

    def _start_celery_executor_check(self) -> subprocess.Popen[str]:
        """Start importing the CeleryExecutor in a process with the stack's environment."""
        return subprocess.Popen(
            [sys.executable, "-c", CELERY_EXECUTOR_CHECK],
            env=self.env,
            cwd=self._base,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def _finish_celery_executor_check(self, check: subprocess.Popen[str]) -> None:
        """Wait for :meth:`_start_celery_executor_check`; fail with its reason if the import failed.

        :raises StackError: the installed packages cannot run the CeleryExecutor at all.
        """
        output, _ = check.communicate(timeout=self.startup_timeout)
        if check.returncode != 0:
            lines = output.strip().splitlines()
            raise StackError(
                "the CeleryExecutor cannot be imported with the installed packages "
                f"({lines[0] if lines else 'versions unknown'}): {lines[-1] if lines else ''}"
            )

    def _start_process(self, name: str, *args: str) -> ManagedProcess:
        """Start ``airflow <args>`` in a session of its own, its output going to ``logs/<name>.log``."""
        log_path = self.logs_dir / f"{name}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                ["airflow", *args],
                env=self.env,
                cwd=self._base,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = ManagedProcess(name=name, popen=popen, log_path=log_path)
        self.processes[name] = process
        self._write_state()
        return process

    def worker_names(self) -> list[str]:
        """Return the names of the Celery worker processes started so far (dead ones included)."""
        return [name for name in self.processes if name.startswith("worker-")]

    def live_workers(self) -> list[str]:
        """Return the names of the Celery workers still running."""
        return [name for name in self.worker_names() if self.processes[name].alive()]

    def start_worker(self, wait: bool = True) -> str:
        """Start one more Celery worker and return its name (``worker-<n>``).

        :param wait: wait until it consumes from the broker.
        """
        self._worker_count += 1
        name = f"worker-{self._worker_count}"
        self._start_process(
            name,
            "celery",
            "worker",
            "--celery-hostname",
            f"{name}-{self.stack_id}@%h",
            "--concurrency",
            str(self.worker_concurrency),
            "--skip-serve-logs",
            "--without-gossip",
            "--without-mingle",
        )
        if wait:
            self._wait_worker_ready(name)
        return name

    def _wait_worker_ready(self, name: str) -> None:
        process = self.processes[name]

        def ready() -> bool:
            if not process.alive():
                raise StackError(f"{name} exited {process.popen.returncode}:\n{process.log_tail()}")
            return WORKER_READY_MARK in process.log_text()

        wait_until(ready, self.startup_timeout, f"{name} to consume from the broker")

    def kill_worker(self, sig: signal.Signals = signal.SIGKILL, name: str | None = None) -> str:
        """Kill a Celery worker with every process it started (its task processes too).

        :param sig: the signal; SIGKILL by default, as a lost machine.
        :param name: the worker; the most recently started live one when None.
        :raises StackError: no live worker.
        """
        live = self.live_workers()
        target = name or (live[-1] if live else None)
        if target is None:
            raise StackError("no live Celery worker to kill")
        self.processes[target].kill(sig)
        return target

    def restart_scheduler(self) -> None:
        """Stop the scheduler (SIGTERM, as a deployment would), start a new one, wait until it heartbeats."""
        restarted_at = time.time()
        old = self.processes.pop(SCHEDULER)
        old.stop()
        old.log_path.rename(old.log_path.with_name(f"{SCHEDULER}-{int(restarted_at)}.log"))
        self._start_process(SCHEDULER, "scheduler", "--skip-serve-logs")
        wait_until(
            lambda: self._scheduler_heartbeat_after(restarted_at),
            self.startup_timeout,
            "the new scheduler's first heartbeat",
        )

    def log_tails(self, lines: int = 40) -> str:
        """Return the last lines of every process's log, for a failure report.

        :param lines: lines per process.
        """
        parts = [
            f"--- {name} ({process.log_path})\n{process.log_tail(lines)}"
            for name, process in self.processes.items()
        ]
        if self.sandbox is not None:
            parts.append(f"--- sandbox\n{os.linesep.join(self.sandbox.output().splitlines()[-lines:])}")
        return "\n".join(parts)

    # -- health ----------------------------------------------------------------------------------

    def _check_processes(self) -> None:
        """Raise when a core process (not a worker, which tests kill on purpose) has exited."""
        for name in (API_SERVER, SCHEDULER, DAG_PROCESSOR, TRIGGERER):
            process = self.processes.get(name)
            if process is not None and not process.alive():
                raise StackError(f"{name} exited {process.popen.returncode}:\n{process.log_tail()}")

    def _api_answers(self) -> bool:
        self._check_processes()
        try:
            return self._session.get(f"{self.api_url}/api/v2/monitor/health", timeout=5).ok
        except requests.RequestException:
            return False

    def health(self) -> dict[str, Any]:
        """Return ``GET /api/v2/monitor/health``."""
        response = self._session.get(
            f"{self.api_url}/api/v2/monitor/health", timeout=_REQUEST_TIMEOUT_SECONDS
        )
        response.raise_for_status()
        return response.json()

    def wait_healthy(self, timeout: float | None = None) -> None:
        """Wait until the metadata database, scheduler, triggerer and dag-processor report healthy.

        :param timeout: seconds; the stack's ``startup_timeout`` when None.
        """

        def healthy() -> bool:
            self._check_processes()
            report = self.health()
            return all(report.get(part, {}).get("status") == "healthy" for part in HEALTH_COMPONENTS)

        wait_until(healthy, timeout or self.startup_timeout, "every component to report healthy")

    def _scheduler_heartbeat_after(self, moment: float) -> bool:
        self._check_processes()
        heartbeat = self.health().get(SCHEDULER, {}).get("latest_scheduler_heartbeat")
        return bool(heartbeat) and datetime.fromisoformat(heartbeat).timestamp() > moment

    # -- REST API --------------------------------------------------------------------------------

    def token(self) -> str:
        """Return an API token of the admin user (``POST /auth/token``), fetched once and cached."""
        if self._token is None:
            response = self._session.post(
                f"{self.api_url}/auth/token",
                json={"username": ADMIN_USER, "password": self._admin_password},
                timeout=_REQUEST_TIMEOUT_SECONDS,
            )
            if not response.ok:
                raise StackError(f"POST /auth/token answered {response.status_code}: {response.text[:300]}")
            self._token = response.json()["access_token"]
        return self._token

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call the REST API as the admin user and return the decoded JSON answer (None when empty).

        :param method: HTTP method.
        :param path: path below the api-server, e.g. ``/api/v2/dags``.
        :param kwargs: passed to :meth:`requests.Session.request` (``json``, ``params``, ...).
        :raises StackError: the answer is not 2xx (after fetching a new token once on 401).
        """
        for attempt in range(2):
            response = self._session.request(
                method,
                f"{self.api_url}{path}",
                headers={"Authorization": f"Bearer {self.token()}"},
                timeout=_REQUEST_TIMEOUT_SECONDS,
                **kwargs,
            )
            if response.status_code == requests.codes.unauthorized and attempt == 0:
                self._token = None
                continue
            break
        if not response.ok:
            raise StackError(f"{method} {path} answered {response.status_code}: {response.text[:1000]}")
        return response.json() if response.content else None

    def _paged(self, path: str, key: str, **params: Any) -> list[dict[str, Any]]:
        """Return every item of a paginated list endpoint."""
        items: list[dict[str, Any]] = []
        while True:
            page = self.api("GET", path, params={**params, "limit": _PAGE_SIZE, "offset": len(items)})
            items += page[key]
            if not page[key] or len(items) >= page["total_entries"]:
                return items

    def _create_pool(self, name: str, slots: int) -> None:
        self.api("POST", "/api/v2/pools", json={"name": name, "slots": slots, "include_deferred": False})

    def import_errors(self) -> list[dict[str, Any]]:
        """Return the DAG import errors the dag-processor recorded."""
        return self._paged("/api/v2/importErrors", "import_errors")

    def wait_for_dag(self, dag_id: str, timeout: float = 120.0) -> dict[str, Any]:
        """Wait until the dag-processor has parsed ``dag_id`` and return the DAG as the API shows it.

        :param dag_id: the DAG.
        :param timeout: seconds.
        :raises StackError: the DAG's file has an import error.
        """

        def parsed() -> dict[str, Any] | None:
            self._check_processes()
            errors = self.import_errors()
            if errors:
                raise StackError(f"DAG import errors: {json.dumps(errors, indent=2)[:3000]}")
            try:
                return self.api("GET", f"/api/v2/dags/{quote(dag_id)}")
            except StackError:
                return None

        return wait_until(parsed, timeout, f"the DAG {dag_id} to be parsed", interval=1.0)

    def trigger_dag(
        self, dag_id: str, conf: Mapping[str, Any] | None = None, logical_date: str | None = None
    ) -> str:
        """Create a DAG run through the REST API and return its run id.

        :param dag_id: the DAG.
        :param conf: the run's conf (the DAG's params).
        :param logical_date: ISO 8601 logical date, e.g. ``2025-01-02T00:00:00Z``; None for a run
            without one.
        """
        run = self.api(
            "POST",
            f"/api/v2/dags/{quote(dag_id)}/dagRuns",
            json={"logical_date": logical_date, "conf": dict(conf or {})},
        )
        return run["dag_run_id"]

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        """Return one DAG run.

        :param dag_id: the DAG.
        :param run_id: the run.
        """
        return self.api("GET", f"/api/v2/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}")

    def dag_runs(self, dag_id: str) -> list[dict[str, Any]]:
        """Return every run of a DAG.

        :param dag_id: the DAG.
        """
        return self._paged(f"/api/v2/dags/{quote(dag_id)}/dagRuns", "dag_runs")

    def wait_for_run(
        self, dag_id: str, run_id: str, timeout: float = 600.0, interval: float = 1.0
    ) -> dict[str, Any]:
        """Wait until a DAG run succeeds or fails and return it; note the TI states seen meanwhile.

        :param dag_id: the DAG.
        :param run_id: the run.
        :param timeout: seconds.
        :param interval: seconds between two polls.
        :raises TimeoutError: the run did not finish; the message lists its task instances.
        """

        def finished() -> dict[str, Any] | None:
            self._check_processes()
            self._observe(dag_id, run_id)
            run = self.dag_run(dag_id, run_id)
            return run if run["state"] in FINISHED_RUN_STATES else None

        try:
            return wait_until(finished, timeout, f"run {run_id} of {dag_id}", interval=interval)
        except TimeoutError as exc:
            states = {
                f"{task_id}[{map_index}]": seen
                for (task_id, map_index), seen in self.observed_states.get((dag_id, run_id), {}).items()
            }
            raise TimeoutError(f"{exc}; task instance states seen: {json.dumps(states)}") from exc

    def _observe(self, dag_id: str, run_id: str) -> None:
        """Append each task instance's current state to its history in :attr:`observed_states`."""
        seen = self.observed_states.setdefault((dag_id, run_id), {})
        for ti in self._task_instance_list(dag_id, run_id):
            history = seen.setdefault((ti["task_id"], ti["map_index"]), [])
            state = ti["state"] or "none"
            if not history or history[-1] != state:
                history.append(state)

    def _task_instance_list(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return self._paged(
            f"/api/v2/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances", "task_instances"
        )

    def task_instances(self, dag_id: str, run_id: str, *, with_tries: bool = True) -> list[dict[str, Any]]:
        """Return a run's task instances, each with its ``observed_states`` and, optionally, ``tries``.

        ``tries`` is the API's try history (one entry per attempt, with its final state);
        ``observed_states`` the states :meth:`wait_for_run` saw, in order (a state between two
        polls can be missed; see :meth:`trigger_log_files` for proof of a deferral).

        :param dag_id: the DAG.
        :param run_id: the run.
        :param with_tries: also fetch each task instance's try history (one call per instance).
        """
        seen = self.observed_states.get((dag_id, run_id), {})
        instances = self._task_instance_list(dag_id, run_id)
        for ti in instances:
            ti["observed_states"] = list(seen.get((ti["task_id"], ti["map_index"]), []))
            if not with_tries:
                continue
            base = (
                f"/api/v2/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}/taskInstances/{quote(ti['task_id'])}"
            )
            tries_path = f"{base}/{ti['map_index']}/tries" if ti["map_index"] >= 0 else f"{base}/tries"
            ti["tries"] = self._paged(tries_path, "task_instances")
        return instances

    def task_log_dir(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> Path:
        """Return the folder of a task instance's log files (Airflow's default file name template).

        :param dag_id: the DAG.
        :param run_id: the run.
        :param task_id: the task.
        :param map_index: the map index; -1 for an unmapped task.
        """
        folder = self.task_logs_dir / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        return folder / f"map_index={map_index}" if map_index >= 0 else folder

    def trigger_log_files(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> list[Path]:
        """Return the log files the triggerer wrote while it ran a task instance's triggers.

        The triggerer writes ``attempt=<n>.log.trigger.<triggerer job id>.log`` beside the task's
        own log for every trigger it runs for that task instance: one exists only if the task
        deferred and a triggerer picked its trigger up.

        :param dag_id: the DAG.
        :param run_id: the run.
        :param task_id: the task.
        :param map_index: the map index; -1 for an unmapped task.
        """
        folder = self.task_log_dir(dag_id, run_id, task_id, map_index)
        return sorted(folder.glob("attempt=*.log.trigger.*.log")) if folder.exists() else []


# --- helpers shared with ``down`` ---------------------------------------------------------------


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def _postgres_conn_uri(database: str) -> str:
    """Return an Airflow connection URI for a database on the local PostgreSQL server."""
    url = POSTGRES_ADMIN_URL
    return f"postgresql://{url.username}@{url.host}:{url.port}/{database}"


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None


def drop_databases(names: Sequence[str]) -> None:
    """Drop the named databases of the local PostgreSQL server, disconnecting their clients.

    :param names: database names.
    """
    if not names:
        return
    engine = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            for name in names:
                connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        engine.dispose()


def flush_redis_database(database: int) -> None:
    """Empty one database index of the local Redis server.

    :param database: the index.
    """
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=database, socket_timeout=10)
    try:
        client.flushdb()
    finally:
        client.close()


def clean_up_state(state_file: Path) -> list[str]:
    """Undo a stack recorded in a state file whose owner died: processes, databases, Redis, files.

    A recorded process is killed only if a process with its pid still exists and started at the
    recorded time, so a reused pid is left alone. Return what was done, one line per step.

    :param state_file: the file ``up`` wrote.
    """
    state = json.loads(state_file.read_text())
    done = []
    for record in state["processes"]:
        try:
            process = psutil.Process(record["pid"])
        except psutil.NoSuchProcess:
            continue
        if record["create_time"] is None or abs(process.create_time() - record["create_time"]) > 1:
            continue
        _kill_tree(_process_tree(process.pid))
        done.append(f"killed {record['name']} (pid {record['pid']}) and its descendants")
    drop_databases(state["databases"])
    done += [f"dropped database {name}" for name in state["databases"]]
    if state["redis_db"] is not None:
        flush_redis_database(state["redis_db"])
        done.append(f"flushed Redis database {state['redis_db']}")
    if state["base_dir"]:
        shutil.rmtree(state["base_dir"], ignore_errors=True)
        done.append(f"removed {state['base_dir']}")
    state_file.unlink()
    return done


# --- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Return the command line parser of ``python -m scripts.stack``."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.stack",
        description="Run Airflow on CeleryExecutor with PostgreSQL, Redis and the vendor sandbox, locally.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start a stack in the foreground; Ctrl-C or SIGTERM stops it")
    up.add_argument("--dags-folder", type=Path, default=DEFAULT_DAGS_FOLDER)
    up.add_argument("--sites-file", type=Path, default=None, help="$DICOM_INGEST_SITES_FILE")
    up.add_argument("--demo-root", type=Path, default=None, help="$DICOM_INGEST_DEMO_ROOT")
    up.add_argument("--workers", type=int, default=1, help="Celery workers")
    up.add_argument("--worker-concurrency", type=int, default=2, help="task slots per worker")
    up.add_argument("--quiet-period", type=float, default=5, help="the sandbox's quiet period, seconds")
    up.add_argument("--processing-time", type=float, default=2, help="the sandbox's processing time, seconds")
    down = commands.add_parser("down", help="clean up a stack whose `up` process was killed")
    for sub in (up, down):
        sub.add_argument("--state-file", type=Path, default=DEFAULT_STATE_FILE)
    return parser


def _run_up(arguments: argparse.Namespace) -> int:
    if arguments.state_file.exists():
        print(
            f"{arguments.state_file} exists: another stack is up, or one was killed; "
            "run `python -m scripts.stack down` first",
            file=sys.stderr,
        )
        return 1
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    stack = Stack(
        dags_folder=arguments.dags_folder.resolve(),
        sites_file=arguments.sites_file.resolve() if arguments.sites_file else None,
        demo_root=arguments.demo_root.resolve() if arguments.demo_root else None,
        workers=arguments.workers,
        worker_concurrency=arguments.worker_concurrency,
        sandbox_clocks={"quiet_period": arguments.quiet_period, "processing_time": arguments.processing_time},
        state_file=arguments.state_file,
    )
    print("starting PostgreSQL databases, Redis index, sandbox and Airflow (about a minute)...", flush=True)
    with stack:
        assert stack.sandbox is not None
        print(
            f"stack ready\n"
            f"  Airflow UI and REST API  {stack.api_url}  (user {ADMIN_USER}, password in "
            f"{stack.password_file})\n"
            f"  vendor sandbox           {stack.sandbox.base_url}\n"
            f"  metadata database        {stack.metadata_db}\n"
            f"  ledger database          {stack.ledger_db}\n"
            f"  Celery broker            redis://{REDIS_HOST}:{REDIS_PORT}/{stack.redis_db}\n"
            f"  process logs             {stack.logs_dir}\n"
            f"  task logs                {stack.task_logs_dir}\n"
            "Ctrl-C stops everything and deletes it.",
            flush=True,
        )
        while not stopping.wait(1.0):
            if any(not stack.processes[name].alive() for name in (API_SERVER, SCHEDULER, TRIGGERER)):
                print(f"a core process exited:\n{stack.log_tails()}", file=sys.stderr)
                return 1
        print("stopping...", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``up`` or ``down``; return the exit status.

    :param argv: the arguments; ``sys.argv[1:]`` when None.
    """
    arguments = build_parser().parse_args(argv)
    if arguments.command == "up":
        return _run_up(arguments)
    if not arguments.state_file.exists():
        print(f"no stack recorded in {arguments.state_file}; nothing to do")
        return 0
    for line in clean_up_state(arguments.state_file):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
