"""Whole-DAG runs: ``airflow dags test dicom_ingest__bench`` on SQLite against the sandbox.

One Airflow home is migrated once; each run gets a new logical date, a fresh ledger and the
staging area it is pointed at through the environment, so every run plans and uploads
everything again. The run's wall time and the CPU time of the ``airflow`` process (tasks run
in it) are measured; its output is kept in a log file beside the home.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import yaml

from bench.clients import VendorApi
from bench.harness import DAG_FILE, REPO_ROOT, children_cpu_seconds
from bench.product import CONNECTION_ENV, SITE_ID, connection_json, site_entry

DAG_ID = f"dicom_ingest__{SITE_ID}"
STAGING_ENV = "DICOM_INGEST_BENCH_STAGING"
LEDGER_ENV = "DICOM_INGEST_BENCH_LEDGER"
SITES_FILE_ENV = "DICOM_INGEST_SITES_FILE"
INHERITED_PREFIXES_DROPPED = ("AIRFLOW_", "DICOM_INGEST_")
"""Variables of the caller's environment that would point Airflow or the project elsewhere."""
FIRST_LOGICAL_DATE = date(2025, 1, 1)
LOG_TAIL_LINES = 40
COMMAND_TIMEOUT_SECONDS = 3600.0


class DagRunFailed(RuntimeError):
    """An ``airflow`` command of the benchmark failed; the message ends with its output's last lines."""


@dataclass(frozen=True)
class DagRun:
    """One finished ``airflow dags test``.

    :param seconds: its wall time, start-up included.
    :param cpu_seconds: CPU seconds of the ``airflow`` process and its children.
    :param log_path: where its output is.
    """

    seconds: float
    cpu_seconds: float
    log_path: Path


class AirflowBench:
    """An Airflow home whose only DAG is the benchmark site's, pointed at the sandbox.

    :param home: the folder to use as ``AIRFLOW_HOME`` (created).
    :param api: the sandbox's API and credentials.
    :param upload_concurrency: the site's parallel uploads within a batch.
    :param poke_interval: seconds between two checks of a batch's orders.
    """

    def __init__(self, home: Path, api: VendorApi, *, upload_concurrency: int, poke_interval: float) -> None:
        self.home = home
        self.api = api
        self.sites_file = home / "sites.yaml"
        self._runs = 0
        home.mkdir(parents=True, exist_ok=True)
        entry = site_entry(
            f"${{{STAGING_ENV}}}",
            upload_concurrency=upload_concurrency,
            ledger_path=f"${{{LEDGER_ENV}}}",
            work_location=str(home / "work"),
            reports_location=str(home / "reports"),
            poke_interval=poke_interval,
        )
        self.sites_file.write_text(yaml.safe_dump({"sites": [entry]}, sort_keys=False))

    def environment(self, staging: Path, ledger: Path) -> dict[str, str]:
        """Return the ``airflow`` command's environment: the caller's, pointed at this home.

        :param staging: the staging area of the run.
        :param ledger: the run's SQLite ledger file.
        """
        environment = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(INHERITED_PREFIXES_DROPPED)
        }
        environment.update(
            {
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__CORE__DAGS_FOLDER": str(DAG_FILE.parent),
                "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.home / 'airflow.db'}",
                SITES_FILE_ENV: str(self.sites_file),
                CONNECTION_ENV: connection_json(self.api),
                STAGING_ENV: str(staging),
                LEDGER_ENV: str(ledger),
            }
        )
        return environment

    def _airflow(self, arguments: list[str], environment: dict[str, str], log_path: Path) -> float:
        """Run one ``airflow`` command, its output into ``log_path``; return its wall time.

        :raises DagRunFailed: it exited with an error.
        """
        started = time.perf_counter()
        with log_path.open("w") as log:
            try:
                status = subprocess.run(
                    [sys.executable, "-m", "airflow", *arguments],
                    env=environment,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=REPO_ROOT,
                    check=False,
                    timeout=COMMAND_TIMEOUT_SECONDS,
                ).returncode
            except subprocess.TimeoutExpired:
                status = -1
        seconds = time.perf_counter() - started
        if status != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
            raise DagRunFailed(f"airflow {arguments[0]} {arguments[1]} exited with {status}:\n{tail}")
        return seconds

    def migrate(self, staging: Path) -> None:
        """Create the metadata database (``airflow db migrate``); not timed.

        :param staging: any staging area (the environment must be complete).
        """
        self._airflow(
            ["db", "migrate"],
            self.environment(staging, self.home / "unused.sqlite"),
            self.home / "migrate.log",
        )

    def run(self, staging: Path) -> DagRun:
        """Run the site's DAG once over ``staging`` with a fresh ledger and a new logical date.

        :param staging: the staging area to ingest.
        :raises DagRunFailed: the run failed.
        """
        self._runs += 1
        logical_date = (FIRST_LOGICAL_DATE + timedelta(days=self._runs)).isoformat()
        ledger = self.home / f"ledger-{self._runs:03d}.sqlite"
        log_path = self.home / f"dags-test-{self._runs:03d}.log"
        cpu_before = children_cpu_seconds()
        seconds = self._airflow(
            ["dags", "test", DAG_ID, logical_date], self.environment(staging, ledger), log_path
        )
        return DagRun(seconds=seconds, cpu_seconds=children_cpu_seconds() - cpu_before, log_path=log_path)
