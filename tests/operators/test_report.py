"""DicomIngestReportOperator on a real plan and a real SQLite ledger driven into each outcome."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

from dicom_ingest.ledger import Ledger
from dicom_ingest.operators.plan import DicomPlanOperator
from dicom_ingest.operators.report import DicomIngestReportOperator
from dicom_ingest.staging import Plan
from dicom_ingest.staging import PlannedStudy as StagedStudy
from dicom_ingest_sandbox.samples import SampleManifest
from tests.dags.support import (
    RUN_ID,
    batch_studies,
    deliver_study,
    order_id_of,
    site_args,
    site_entry,
    upload_study,
)

SITE_ID = "nantes"


@pytest.fixture
def entry(folder: Path, sample: SampleManifest) -> dict[str, Any]:
    return site_entry(SITE_ID, folder, batch={"max_instances": 6})


def run_plan(entry: dict[str, Any], run_id: str = RUN_ID, **arguments: Any) -> Plan:
    """Plan the run with the real plan operator and return the written plan."""
    operator = DicomPlanOperator(task_id="plan", site=site_args(entry), **arguments)
    return Plan.load(operator.execute({"run_id": run_id})["work_uri"])  # type: ignore[arg-type]


def run_report(entry: dict[str, Any], run_id: str = RUN_ID, **arguments: Any) -> dict[str, Any]:
    """Run the report operator for a run."""
    operator = DicomIngestReportOperator(task_id="report", site=site_args(entry), **arguments)
    return operator.execute({"run_id": run_id})  # type: ignore[arg-type]


def report_files(entry: dict[str, Any], run_id: str = RUN_ID) -> tuple[dict[str, Any], str]:
    """Read the JSON report and the text summary written for a run."""
    name = run_id.replace(":", "_").replace("+", "_")
    folder = Path(entry["reports_location"])
    return json.loads((folder / f"{name}.json").read_text()), (folder / f"{name}.txt").read_text()


def planned_studies(plan: Plan) -> list[tuple[str, StagedStudy]]:
    """Return the plan's studies with their batch ids, in plan order."""
    return list(batch_studies(plan).values())


def test_a_delivered_run_succeeds_and_lists_every_file_not_uploaded(
    entry: dict[str, Any], sample: SampleManifest, ledger: Ledger
) -> None:
    plan = run_plan(entry)
    for batch_id, study in planned_studies(plan):
        deliver_study(ledger, SITE_ID, RUN_ID, batch_id, study)

    result = run_report(entry)

    report, text = report_files(entry)
    assert result["status"] == report["status"] == "succeeded"
    assert result["report_json"].endswith(".json")
    assert report["problems"] == []
    delivered_instances = sample.instances_to_deliver
    assert report["planned"]["studies"] == len(sample.delivered_studies)
    assert report["planned"]["instances"] == delivered_instances
    assert report["planned"]["batches"] == len(plan.batches)
    assert report["delivered"]["studies"] == len(sample.delivered_studies)
    assert report["uploaded"]["instances"] == delivered_instances
    assert report["uploaded"]["bytes"] == report["planned"]["bytes"]
    assert report["orders"] == {"delivered": len(sample.delivered_studies), "failed": 0, "abandoned": 0}
    assert report["unaccounted"]["instances"] == 0
    files = {item["path"]: item for item in report["not_uploaded"]["files"]}
    assert {path: item["reason"] for path, item in files.items()} == {
        bad.relative_path: bad.reason for bad in sample.bad_files
    }
    assert all(bad.relative_path in files[bad.relative_path]["message"] for bad in sample.bad_files)
    for bad in sample.bad_files:
        assert f"{bad.relative_path} [{bad.reason}]" in text
    assert "Status: SUCCEEDED" in text


def test_held_back_studies_are_reported_with_their_reason(
    entry: dict[str, Any], sample: SampleManifest, ledger: Ledger
) -> None:
    for batch_id, study in planned_studies(run_plan(entry)):
        deliver_study(ledger, SITE_ID, RUN_ID, batch_id, study)

    run_report(entry)

    report, text = report_files(entry)
    (held,) = sample.held_studies
    assert report["held"]["per_reason"] == {"metadata_missing": {"studies": 1, "instances": held.instances}}
    (reported,) = report["held"]["studies"]
    assert (reported["study_uid"], reported["reason"]) == (held.study_uid, "metadata_missing")
    assert "patient_age" in reported["message"]
    assert held.study_uid in text


def test_a_failed_upload_fails_the_run_after_writing_the_report(
    entry: dict[str, Any], ledger: Ledger
) -> None:
    (first_batch, first), (second_batch, second) = planned_studies(run_plan(entry))
    deliver_study(ledger, SITE_ID, RUN_ID, first_batch, first)
    claim = ledger.claim_study(SITE_ID, second.study_uid, RUN_ID, second_batch)
    ledger.mark_study_failed(SITE_ID, second.study_uid, "upload_failed", token=claim.token)

    with pytest.raises(AirflowFailException, match="upload_failed"):
        run_report(entry)

    report, text = report_files(entry)
    assert report["status"] == "failed"
    (failed,) = report["failed"]
    assert (failed["study_uid"], failed["reason"], failed["order_id"]) == (
        second.study_uid,
        "upload_failed",
        None,
    )
    assert report["orders"]["failed"] == 0
    assert "Status: FAILED" in text


def test_a_failed_order_is_reported_with_the_vendor_reason(entry: dict[str, Any], ledger: Ledger) -> None:
    (first_batch, first), (second_batch, second) = planned_studies(run_plan(entry))
    deliver_study(ledger, SITE_ID, RUN_ID, first_batch, first)
    upload_study(ledger, SITE_ID, RUN_ID, second_batch, second)
    ledger.mark_study_failed(SITE_ID, second.study_uid, "metadata_timeout", order_id_of(second.study_uid))

    with pytest.raises(AirflowFailException, match="metadata_timeout"):
        run_report(entry)

    report, _ = report_files(entry)
    (failed,) = report["failed"]
    assert failed["order_id"] == order_id_of(second.study_uid)
    assert report["orders"] == {"delivered": 1, "failed": 1, "abandoned": 0}


def test_a_study_left_waiting_for_its_order_is_unaccounted_for_and_fails_the_run(
    entry: dict[str, Any], ledger: Ledger
) -> None:
    (first_batch, first), (second_batch, second) = planned_studies(run_plan(entry))
    deliver_study(ledger, SITE_ID, RUN_ID, first_batch, first)
    upload_study(ledger, SITE_ID, RUN_ID, second_batch, second)

    with pytest.raises(AirflowFailException, match="unaccounted for"):
        run_report(entry)

    report, _ = report_files(entry)
    assert report["unaccounted"]["instances"] == len(second.instances)
    (unaccounted,) = report["unaccounted"]["studies"]
    assert (unaccounted["study_uid"], unaccounted["state"]) == (second.study_uid, "metadata_sent")


def test_a_study_never_uploaded_is_unaccounted_for(entry: dict[str, Any], ledger: Ledger) -> None:
    run_plan(entry)

    with pytest.raises(AirflowFailException, match="unaccounted for"):
        run_report(entry)

    report, _ = report_files(entry)
    assert {study["state"] for study in report["unaccounted"]["studies"]} == {"planned"}


def test_a_dry_run_reports_the_plan_and_succeeds(
    entry: dict[str, Any], sample: SampleManifest, ledger: Ledger
) -> None:
    run_plan(entry, dry_run=True)

    result = run_report(entry, dry_run="True")

    report, text = report_files(entry)
    assert result["status"] == report["status"] == "dry_run"
    assert report["planned"]["studies"] == len(sample.delivered_studies)
    assert report["uploaded"]["instances"] == 0
    assert len(report["not_uploaded"]["files"]) == len(sample.bad_files)
    assert "DRY RUN" in text
    assert report["unaccounted"]["studies"] == []


def test_a_run_whose_planning_failed_lists_the_invalid_files_and_fails(
    entry: dict[str, Any], sample: SampleManifest
) -> None:
    entry["invalid_threshold"] = {"max_fraction": 0.05}
    with pytest.raises(AirflowFailException):
        run_plan(entry)

    with pytest.raises(AirflowFailException, match="no plan"):
        run_report(entry)

    report, _ = report_files(entry)
    reported = {item["path"]: item["reason"] for item in report["not_uploaded"]["files"]}
    assert reported == {bad.relative_path: bad.reason for bad in sample.bad_files}


def test_studies_done_in_an_earlier_run_are_reported_as_skipped(
    entry: dict[str, Any], sample: SampleManifest, ledger: Ledger
) -> None:
    for batch_id, study in planned_studies(run_plan(entry)):
        deliver_study(ledger, SITE_ID, RUN_ID, batch_id, study)
    next_run = "scheduled__2025-03-02T00:00:00+00:00"
    run_plan(entry, run_id=next_run)

    result = run_report(entry, run_id=next_run)

    report, _ = report_files(entry, next_run)
    assert result["status"] == "succeeded"
    assert report["skipped_done"]["studies"] == len(sample.delivered_studies)
    assert report["skipped_done"]["instances"] == sample.instances_to_deliver
    assert report["planned"]["studies"] == 0
    assert report["uploaded"]["instances"] == 0


def test_abandoned_orders_are_listed(entry: dict[str, Any], ledger: Ledger) -> None:
    studies = planned_studies(run_plan(entry))
    for batch_id, study in studies:
        deliver_study(ledger, SITE_ID, RUN_ID, batch_id, study)
    abandoned_uid = studies[0][1].study_uid
    ledger.record_abandoned_order(SITE_ID, abandoned_uid, "order-left-behind")

    run_report(entry)

    report, text = report_files(entry)
    assert report["abandoned_orders"] == {abandoned_uid: ["order-left-behind"]}
    assert report["orders"]["abandoned"] == 1
    assert "order-left-behind" in text


def test_the_report_and_its_log_carry_no_patient_data_and_the_log_no_paths(
    entry: dict[str, Any], sample: SampleManifest, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    for batch_id, study in planned_studies(run_plan(entry)):
        deliver_study(ledger, SITE_ID, RUN_ID, batch_id, study)

    with caplog.at_level(logging.INFO):
        run_report(entry)

    report, text = report_files(entry)
    logged = caplog.text
    assert "Delivered:" in logged
    for written in (json.dumps(report), text, logged):
        assert "DEMO^" not in written
        assert "DEMO-" not in written
    for bad in sample.bad_files:
        assert bad.relative_path not in logged


def test_an_explicit_work_location_is_read(entry: dict[str, Any], folder: Path, ledger: Ledger) -> None:
    plan = run_plan(entry)
    for batch_id, study in planned_studies(plan):
        deliver_study(ledger, SITE_ID, RUN_ID, batch_id, study)
    moved = folder / "elsewhere"
    Path(plan.work.path).rename(moved)

    result = run_report(entry, work_uri=str(moved))

    assert result["status"] == "succeeded"
    assert result["studies_delivered"] == 2
