"""The repository's DAG files parsed the way Airflow parses them (DagBag), with test sites files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
import pytest
from airflow.dag_processing.dagbag import DagBag

from tests.dags.support import (
    DAGS_FOLDER,
    REPO_ROOT,
    SITE_DAG_FILE,
    SITE_ERRORS_FILE,
    migrated_airflow_db,
    private_folder,
    site_entry,
    write_sites_file,
)

SITES_FILE_ENV = "DICOM_INGEST_SITES_FILE"


@pytest.fixture
def folder() -> Iterator[Path]:
    with private_folder() as path:
        yield path


@pytest.fixture
def entries(folder: Path) -> list[dict[str, Any]]:
    """Two enabled sites, one with every DAG-level setting changed, and a disabled one."""
    return [
        site_entry("lyon", folder / "lyon"),
        site_entry(
            "nantes",
            folder / "nantes",
            schedule="0 2 * * *",
            timezone="Europe/Paris",
            start_date="2025-02-01",
            catchup=True,
            retries=3,
            retry_delay_seconds=30,
            pool="vendor_eu",
            owner="imaging_team",
            tags=["hospital_b"],
            max_active_batches=4,
        ),
        site_entry("paris", folder / "paris", enabled=False),
    ]


def parse(monkeypatch: pytest.MonkeyPatch, sites_file: Path) -> DagBag:
    """Parse the repository's DAG folder with ``sites_file`` as the sites file."""
    monkeypatch.setenv(SITES_FILE_ENV, str(sites_file))
    return DagBag(dag_folder=DAGS_FOLDER, bundle_path=DAGS_FOLDER)


@pytest.fixture
def bag(monkeypatch: pytest.MonkeyPatch, folder: Path, entries: list[dict[str, Any]]) -> DagBag:
    return parse(monkeypatch, write_sites_file(folder / "sites.yaml", entries))


def test_every_enabled_site_gets_one_dag_and_no_file_fails(bag: DagBag) -> None:
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == {"dicom_ingest__lyon", "dicom_ingest__nantes"}


def test_a_dag_carries_its_site_schedule_and_limits(bag: DagBag) -> None:
    dag = bag.dags["dicom_ingest__nantes"]

    assert (dag.timetable.expression, str(dag.timetable.timezone)) == ("0 2 * * *", "Europe/Paris")
    assert dag.start_date == pendulum.datetime(2025, 2, 1, tz="Europe/Paris")
    assert dag.catchup is True
    assert dag.max_active_runs == 1
    assert set(dag.tags) == {"dicom_ingest", "site:nantes", "hospital_b"}
    assert "nantes" in (dag.doc_md or "")


def test_a_preset_schedule_becomes_its_cron_expression(bag: DagBag) -> None:
    dag = bag.dags["dicom_ingest__lyon"]

    assert (dag.timetable.expression, str(dag.timetable.timezone)) == ("0 0 * * *", "UTC")
    assert dag.catchup is False
    assert set(dag.tags) == {"dicom_ingest", "site:lyon"}


def test_tasks_take_the_site_owner_retries_and_pool(bag: DagBag) -> None:
    dag = bag.dags["dicom_ingest__nantes"]

    assert dag.default_args == {
        "owner": "imaging_team",
        "retries": 3,
        "retry_delay": timedelta(seconds=30),
        "pool": "vendor_eu",
    }
    for task_id in ("plan", "ingest_batch.upload", "ingest_batch.wait_for_orders"):
        task = dag.task_dict[task_id]
        assert (task.owner, task.retries, task.retry_delay, task.pool) == (
            "imaging_team",
            3,
            timedelta(seconds=30),
            "vendor_eu",
        )
    # Failing again cannot change a finished run's verdict.
    assert dag.task_dict["report"].retries == 0


def test_runs_take_a_dry_run_flag_and_an_optional_staging_location(bag: DagBag) -> None:
    params = bag.dags["dicom_ingest__lyon"].params

    assert params.dump() == {"dry_run": False, "staging_override": None}
    assert params.get_param("dry_run").schema["type"] == "boolean"
    assert params.get_param("staging_override").schema["type"] == ["null", "string"]


def test_the_tasks_form_plan_mapped_batches_then_report(bag: DagBag) -> None:
    dag = bag.dags["dicom_ingest__nantes"]
    tasks = dag.task_dict

    assert set(tasks) == {"plan", "batches", "ingest_batch.upload", "ingest_batch.wait_for_orders", "report"}
    assert tasks["plan"].downstream_task_ids == {"batches"}
    assert tasks["batches"].downstream_task_ids == {"ingest_batch.upload"}
    assert tasks["ingest_batch.upload"].downstream_task_ids == {"ingest_batch.wait_for_orders"}
    assert tasks["ingest_batch.wait_for_orders"].downstream_task_ids == {"report"}
    assert [task.task_id for task in dag.leaves] == ["report"]
    for task_id in ("ingest_batch.upload", "ingest_batch.wait_for_orders"):
        group = tasks[task_id].get_closest_mapped_task_group()
        assert group is not None
        assert group.group_id == "ingest_batch"


def test_batches_are_labelled_and_bounded_and_the_report_always_runs(bag: DagBag) -> None:
    tasks = bag.dags["dicom_ingest__nantes"].task_dict
    upload, wait = tasks["ingest_batch.upload"], tasks["ingest_batch.wait_for_orders"]

    assert upload.max_active_tis_per_dagrun == 4
    assert upload.map_index_template == "{{ batch_label }}"
    assert "batch_label" in (wait.map_index_template or "")
    assert tasks["report"].trigger_rule == "all_done"


def test_the_sensor_reads_its_batch_from_its_own_group_instance(bag: DagBag) -> None:
    wait = bag.dags["dicom_ingest__lyon"].task_dict["ingest_batch.wait_for_orders"]

    # Without map_indexes, a run with a single batch would pull a dict and one with more a list.
    assert "task_ids='ingest_batch.upload'" in wait.batch_id
    assert "map_indexes=ti.map_index" in wait.batch_id


def test_a_bad_entry_is_an_import_error_naming_site_and_field_while_good_sites_keep_their_dag(
    monkeypatch: pytest.MonkeyPatch, folder: Path
) -> None:
    sites_file = write_sites_file(
        folder / "sites.yaml",
        [site_entry("lyon", folder / "lyon"), site_entry("brest", folder / "brest", schedule="every day")],
    )

    bag = parse(monkeypatch, sites_file)

    assert set(bag.dag_ids) == {"dicom_ingest__lyon"}
    assert set(bag.import_errors) == {SITE_ERRORS_FILE.name}
    message = bag.import_errors[SITE_ERRORS_FILE.name]
    assert "site 'brest'" in message
    assert ": schedule: " in message
    assert str(sites_file) in message
    assert "lyon" not in message


def test_a_bad_entry_leaves_the_good_sites_scheduled_after_the_parse_is_stored(
    monkeypatch: pytest.MonkeyPatch, folder: Path
) -> None:
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import sync_bag_to_db
    from airflow.models import DagModel
    from airflow.models.errors import ParseImportError
    from airflow.utils.session import create_session

    migrated_airflow_db()
    DagBundlesManager().sync_bundles_to_db()
    good, bad = site_entry("lyon", folder / "lyon"), site_entry("brest", folder / "brest", retries=-1)
    sites_file = write_sites_file(folder / "sites.yaml", [good, bad])

    sync_bag_to_db(parse(monkeypatch, sites_file), "dags-folder", None)

    with create_session() as session:
        lyon = session.get(DagModel, "dicom_ingest__lyon")
        assert lyon is not None
        assert (lyon.is_stale, lyon.has_import_errors) == (False, False)
        errors = {error.filename: error.stacktrace for error in session.query(ParseImportError)}
        assert set(errors) == {SITE_ERRORS_FILE.name}
        assert "site 'brest'" in errors[SITE_ERRORS_FILE.name]
        assert ": retries: " in errors[SITE_ERRORS_FILE.name]

    bad["retries"] = 1
    write_sites_file(sites_file, [good, bad])
    sync_bag_to_db(parse(monkeypatch, sites_file), "dags-folder", None)

    with create_session() as session:
        assert session.query(ParseImportError).count() == 0
        brest = session.get(DagModel, "dicom_ingest__brest")
        assert brest is not None
        assert brest.is_stale is False


def test_an_unusable_sites_file_is_one_import_error_of_the_site_dag_file(
    monkeypatch: pytest.MonkeyPatch, folder: Path
) -> None:
    bag = parse(monkeypatch, folder / "missing.yaml")

    assert bag.dag_ids == []
    assert set(bag.import_errors) == {SITE_DAG_FILE.name}
    assert "sites file not found" in bag.import_errors[SITE_DAG_FILE.name]


def test_without_the_variable_the_project_sites_file_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SITES_FILE_ENV, raising=False)

    bag = DagBag(dag_folder=DAGS_FOLDER, bundle_path=DAGS_FOLDER)

    assert bag.import_errors == {}
    assert "dicom_ingest__demo" in bag.dag_ids


PARSE_PROBE = """
import json, runpy, sys

from airflow.sdk import DAG

before = set(sys.modules)
events = []
WATCHED = {"socket.__new__", "socket.connect", "socket.getaddrinfo", "sqlite3.connect", "urllib.Request"}


def audit(event, arguments):
    if event in WATCHED:
        events.append(event)


sys.addaudithook(audit)
namespace = runpy.run_path(sys.argv[1])
print(json.dumps({
    "events": sorted(set(events)),
    "modules": sorted(set(sys.modules) - before),
    "dags": sorted(name for name, value in namespace.items() if isinstance(value, DAG)),
}))
"""

HEAVY_MODULES = (
    "dicom_ingest.hooks.dicom_ingest",
    "dicom_ingest.hooks.transport",
    "dicom_ingest.staging",
    "dicom_ingest.ledger",
    "dicom_ingest.upload",
    "dicom_ingest.report",
    "pydicom",
    "requests",
    "boto3",
)


def test_parsing_the_dag_file_opens_no_socket_or_database_and_imports_no_task_code(
    folder: Path, entries: list[dict[str, Any]]
) -> None:
    sites_file = write_sites_file(folder / "sites.yaml", entries)
    environment = {**os.environ, SITES_FILE_ENV: str(sites_file)}

    finished = subprocess.run(
        [sys.executable, "-c", PARSE_PROBE, str(SITE_DAG_FILE)],
        capture_output=True,
        text=True,
        env=environment,
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )

    assert finished.returncode == 0, finished.stderr[-3000:]
    probe = json.loads(finished.stdout.strip().splitlines()[-1])
    assert probe["dags"] == ["dicom_ingest__lyon", "dicom_ingest__nantes"]
    assert probe["events"] == []
    heavy = [name for name in probe["modules"] if name.startswith(HEAVY_MODULES)]
    assert heavy == []
