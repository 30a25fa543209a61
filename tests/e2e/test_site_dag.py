"""A site's DAG from the repository's DAG file, run with ``dag.test()`` against the sandbox.

Every test builds a sample staging area (generated multi-series studies, some of pydicom's
bundled real files, bad files), writes a sites file for it, parses ``dags/`` with Airflow's
DagBag and runs the site's DAG on a migrated SQLite metadata database. Outcomes are checked
through the sandbox's state (its orders, instances and calls) and the run's report.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pendulum
import pytest
from airflow.dag_processing.dagbag import DagBag
from airflow.utils.state import DagRunState

from dicom_ingest.sites.runtime import run_folder_name
from dicom_ingest_sandbox.samples import SampleManifest, build_sample_staging
from dicom_ingest_sandbox.testing import Sandbox
from tests.dags.support import (
    SITE_DAG_FILE,
    migrated_airflow_db,
    open_ledger,
    private_folder,
    site_entry,
    write_sites_file,
)

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]

SITE_ID = "e2e"
DAG_ID = f"dicom_ingest__{SITE_ID}"
DAY = "2025-03-01"
LOGICAL_DATE = pendulum.datetime(2025, 3, 1, tz="UTC")
CONN_ID = "dicom_ingest_default"
FAST_RETRIES = {"max_retries": 1, "backoff_base": 0.05, "backoff_max": 0.2}
"""Hook retries kept short, so that an injected fault exhausts them at once."""


@pytest.fixture(scope="module", autouse=True)
def airflow_db() -> None:
    migrated_airflow_db()


@pytest.fixture
def vendor(fresh_sandbox_state: Sandbox, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    """Point the site's vendor connection at the emptied session sandbox."""
    connection = {
        "conn_type": "dicom_ingest",
        "host": fresh_sandbox_state.base_url,
        "login": fresh_sandbox_state.client_id,
        "password": fresh_sandbox_state.client_secret,
        "extra": FAST_RETRIES,
    }
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps(connection))
    monkeypatch.delenv("DICOM_INGEST_LEDGER_CONN_ID", raising=False)
    return fresh_sandbox_state


@pytest.fixture
def folder() -> Iterator[Path]:
    with private_folder() as path:
        yield path


def e2e_site(folder: Path, **overrides: Any) -> dict[str, Any]:
    """Return the test site: staging per day (``{{ ds }}``), no task retries, a fast sensor."""
    settings: dict[str, Any] = {
        "staging": f"{folder / 'staging'}/{{{{ ds }}}}",
        "retries": 0,
        "retry_delay_seconds": 0,
        "upload_concurrency": 4,
        "batch": {"max_instances": 10},
        "sensor": {"poke_interval": 0.5, "timeout": 90},
        **overrides,
    }
    return site_entry(SITE_ID, folder, **settings)


def run_site_dag(
    monkeypatch: pytest.MonkeyPatch, folder: Path, entry: dict[str, Any], **conf: Any
) -> tuple[Any, dict[str, Any]]:
    """Parse the DAG file for ``entry``, run the site's DAG for :data:`DAY`; return the run and its report."""
    monkeypatch.setenv("DICOM_INGEST_SITES_FILE", str(write_sites_file(folder / "sites.yaml", [entry])))
    bag = DagBag(dag_folder=SITE_DAG_FILE, bundle_path=SITE_DAG_FILE.parent)
    assert bag.import_errors == {}
    run = bag.dags[DAG_ID].test(logical_date=LOGICAL_DATE, run_conf=conf or None)
    report_file = Path(entry["reports_location"]) / f"{run_folder_name(run.run_id)}.json"
    return run, json.loads(report_file.read_text())


def sample_staging(folder: Path, **options: Any) -> SampleManifest:
    """Write the day's sample staging area."""
    return build_sample_staging(folder / "staging" / DAY, day=DAY, **options)


def task_labels(run_id: str) -> dict[str, list[str]]:
    """Return the rendered labels of each mapped task of a run, by map index."""
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        instances = (
            session.query(TaskInstance)
            .filter(TaskInstance.dag_id == DAG_ID, TaskInstance.run_id == run_id, TaskInstance.map_index >= 0)
            .order_by(TaskInstance.map_index)
            .all()
        )
        labels: dict[str, list[str]] = {}
        for instance in instances:
            labels.setdefault(instance.task_id, []).append(instance.rendered_map_index)
    return labels


def orders_by_study(state: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Group the sandbox's orders by study."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for order in state["orders"]:
        grouped.setdefault(order["study_uid"], []).append(order)
    return grouped


def test_a_run_delivers_every_valid_study_once_and_reports_every_file_it_did_not_send(
    vendor: Sandbox, monkeypatch: pytest.MonkeyPatch, folder: Path
) -> None:
    sample = sample_staging(folder)

    run, report = run_site_dag(monkeypatch, folder, e2e_site(folder))

    assert run.state == DagRunState.SUCCESS
    state = vendor.state()
    # Exactly one DELIVERED order per valid study, with all its instances and its metadata;
    # none for the held-back study, none for a bad file.
    assert sample.delivery_problems(state) == []
    assert report["status"] == "succeeded"
    assert report["planned"]["batches"] > 1
    assert report["delivered"]["studies"] == len(sample.delivered_studies)
    assert report["delivered"]["instances"] == sample.instances_to_deliver
    reported = {item["path"]: item["reason"] for item in report["not_uploaded"]["files"]}
    assert reported == {bad.relative_path: bad.reason for bad in sample.bad_files}
    labels = task_labels(run.run_id)
    assert labels["ingest_batch.upload"][0].startswith("batch 1: ")
    assert labels["ingest_batch.wait_for_orders"] == [
        f"batch-{index:05d}" for index in range(1, report["planned"]["batches"] + 1)
    ]


def test_a_study_missing_metadata_is_held_back_and_never_opens_an_order(
    vendor: Sandbox, monkeypatch: pytest.MonkeyPatch, folder: Path
) -> None:
    sample = sample_staging(folder, studies=3, include_bundled=False, include_bad=False)

    run, report = run_site_dag(monkeypatch, folder, e2e_site(folder))

    assert run.state == DagRunState.SUCCESS
    (held,) = sample.held_studies
    assert held.study_uid not in orders_by_study(vendor.state())
    (reported,) = report["held"]["studies"]
    assert (reported["study_uid"], reported["reason"]) == (held.study_uid, "metadata_missing")
    assert report["held"]["per_reason"]["metadata_missing"]["instances"] == held.instances


def test_a_second_run_of_the_same_interval_uploads_nothing(
    vendor: Sandbox, monkeypatch: pytest.MonkeyPatch, folder: Path
) -> None:
    sample = sample_staging(folder, include_bad=False)
    entry = e2e_site(folder)
    first, _ = run_site_dag(monkeypatch, folder, entry)
    assert first.state == DagRunState.SUCCESS
    before = vendor.state()

    second, report = run_site_dag(monkeypatch, folder, entry)

    assert second.state == DagRunState.SUCCESS
    after = vendor.state()
    assert after["calls"].get("upload", 0) == before["calls"].get("upload", 0)
    assert len(after["objects"]) == len(before["objects"])
    assert [order["order_id"] for order in after["orders"]] == [
        order["order_id"] for order in before["orders"]
    ]
    assert sample.delivery_problems(after) == []
    assert report["status"] == "succeeded"
    assert report["planned"]["studies"] == 0
    assert report["uploaded"]["instances"] == 0
    assert report["skipped_done"]["studies"] == len(sample.delivered_studies)


def test_a_run_whose_uploads_start_failing_fails_and_its_rerun_completes_without_loss_or_duplicate(
    vendor: Sandbox, monkeypatch: pytest.MonkeyPatch, folder: Path
) -> None:
    # study-01 (metadata in its tags), study-02 (metadata in a sidecar), study-03 (held back).
    sample = sample_staging(folder, studies=3, include_bundled=False, include_bad=False)
    tagged, sidecar = sample.delivered_studies
    # One instance at a time: the first 8 presigned URLs are study-01's 6 and study-02's first 2.
    entry = e2e_site(folder, upload_concurrency=1, batch={"max_instances": 100})
    uploaded_first = tagged.instances + 2
    # The vendor keeps study-02's partial order open (no metadata yet) for the re-send to join.
    with vendor.clocks(metadata_deadline=180, overwrite_window=180):
        vendor.faults({"endpoint": "upload", "status": 503, "after": uploaded_first, "count": 1000})

        failed_run, failed_report = run_site_dag(monkeypatch, folder, entry)

        assert failed_run.state == DagRunState.FAILED
        assert failed_report["status"] == "failed"
        assert {study["study_uid"] for study in failed_report["failed"]} == {sidecar.study_uid}
        (partial,) = orders_by_study(vendor.state())[sidecar.study_uid]
        assert (partial["status"], partial["instances_received"]) == ("UPLOADING", 2)
        vendor.clear_faults()

        rerun, report = run_site_dag(monkeypatch, folder, entry)

        assert rerun.state == DagRunState.SUCCESS
        state = vendor.state()
    assert sample.delivery_problems(state) == []
    (order,) = orders_by_study(state)[sidecar.study_uid]
    assert order["order_id"] == partial["order_id"]
    assert report["status"] == "succeeded"
    assert report["unaccounted"]["instances"] == 0
    with open_ledger(entry) as ledger:
        detail = ledger.study_detail(SITE_ID, sidecar.study_uid)
    assert detail is not None
    assert (detail.state, detail.resend_count) == ("verified", 1)


def test_a_dry_run_uploads_nothing_and_reports_the_plan(
    vendor: Sandbox, monkeypatch: pytest.MonkeyPatch, folder: Path
) -> None:
    sample = sample_staging(folder)

    run, report = run_site_dag(monkeypatch, folder, e2e_site(folder), dry_run=True)

    assert run.state == DagRunState.SUCCESS
    state = vendor.state()
    assert state["calls"].get("upload", 0) == 0
    assert state["orders"] == []
    assert report["status"] == "dry_run"
    assert report["planned"]["studies"] == len(sample.delivered_studies)
    assert report["planned"]["instances"] == sample.instances_to_deliver
    assert len(report["not_uploaded"]["files"]) == len(sample.bad_files)


def test_too_many_invalid_files_fail_the_run_before_any_upload_and_the_report_lists_them(
    vendor: Sandbox, monkeypatch: pytest.MonkeyPatch, folder: Path
) -> None:
    sample = sample_staging(folder, studies=3, include_bundled=False)

    run, report = run_site_dag(monkeypatch, folder, e2e_site(folder, invalid_threshold={"max_count": 1}))

    assert run.state == DagRunState.FAILED
    assert vendor.state()["calls"].get("upload", 0) == 0
    assert report["status"] == "failed"
    assert report["planned"]["studies"] == 0
    reported = {item["path"]: item["reason"] for item in report["not_uploaded"]["files"]}
    assert reported == {bad.relative_path: bad.reason for bad in sample.bad_files}
