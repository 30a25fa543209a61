"""DicomPlanOperator on a real sample staging area and a real SQLite ledger (no Airflow database)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

from dicom_ingest.ledger import Ledger, StudyState
from dicom_ingest.operators.plan import DicomPlanOperator, DoneStudies, templated_flag
from dicom_ingest.staging import Plan, StagingSourceError
from dicom_ingest_sandbox.samples import SampleManifest, build_sample_staging
from tests.dags.support import (
    RUN_ID,
    batch_studies,
    deliver_study,
    site_args,
    site_entry,
)
from tests.operators.support import BAD_REASONS

SITE_ID = "lyon"


@pytest.fixture
def entry(folder: Path, sample: SampleManifest) -> dict[str, Any]:
    return site_entry(SITE_ID, folder, batch={"max_instances": 6})


def run_plan(entry: dict[str, Any], **arguments: Any) -> dict[str, Any]:
    """Run the operator once, as the plan task of run :data:`RUN_ID`."""
    operator = DicomPlanOperator(task_id="plan", site=site_args(entry), **arguments)
    return operator.execute({"run_id": RUN_ID})  # type: ignore[arg-type]


def test_the_xcom_value_holds_the_plan_location_batches_and_counts(
    entry: dict[str, Any], sample: SampleManifest
) -> None:
    result = run_plan(entry)

    assert set(result) == {"work_uri", "batches", "counts", "dry_run"}
    assert result["dry_run"] is False
    # One batch per study: a batch holds at most 6 instances, and each study has 6.
    delivered = sample.delivered_studies
    assert [batch["index"] for batch in result["batches"]] == list(range(1, len(delivered) + 1))
    assert {batch["studies"] for batch in result["batches"]} == {1}
    assert sum(batch["instances"] for batch in result["batches"]) == sample.instances_to_deliver
    assert sum(batch["bytes"] for batch in result["batches"]) == sum(study.bytes for study in delivered)
    plan = Plan.load(result["work_uri"])
    assert [batch["batch_id"] for batch in result["batches"]] == plan.batch_ids
    assert set(batch_studies(plan)) == {study.study_uid for study in delivered}
    counts = result["counts"]
    assert counts["studies_planned"] == len(delivered)
    assert counts["instances_planned"] == sample.instances_to_deliver
    assert counts["studies_held"] == {"metadata_missing": 1}
    assert counts["files_quarantined"] == {reason: 1 for reason in BAD_REASONS}
    assert counts["files_per_reason"]["valid"] == sample.instances_to_deliver


def test_the_xcom_value_names_no_study_file_or_patient(entry: dict[str, Any], sample: SampleManifest) -> None:
    text = json.dumps(run_plan(entry))

    for study in sample.studies:
        assert study.study_uid not in text
        assert study.folder not in text
    for bad in sample.bad_files:
        assert bad.relative_path not in text
    assert "DEMO" not in text


def test_the_plan_is_recorded_in_the_ledger(
    entry: dict[str, Any], sample: SampleManifest, ledger: Ledger
) -> None:
    result = run_plan(entry)

    planned = {
        study.study_uid: study
        for batch in result["batches"]
        for study in ledger.studies_in_batch(SITE_ID, RUN_ID, batch["batch_id"])
    }
    assert set(planned) == {study.study_uid for study in sample.delivered_studies}
    assert {study.state for study in planned.values()} == {StudyState.PLANNED}
    (held,) = sample.held_studies
    detail = ledger.study_detail(SITE_ID, held.study_uid)
    assert detail is not None
    assert (detail.state, detail.reason) == (StudyState.HELD, "metadata_missing")
    quarantined = {
        reason.reason: reason.count
        for reason in ledger.reasons(SITE_ID, RUN_ID)
        if (reason.level, reason.state) == ("instance", "quarantined")
    }
    assert quarantined == {reason: 1 for reason in BAD_REASONS}


def test_bad_files_of_another_day_with_the_same_names_keep_each_run_s_record(
    folder: Path, entry: dict[str, Any], ledger: Ledger
) -> None:
    other_day = build_sample_staging(
        folder / "staging-next", studies=3, include_bundled=False, day="2025-03-02"
    )
    next_run = "manual__2025-03-02T00:00:00+00:00"
    run_plan(entry)

    operator = DicomPlanOperator(task_id="plan", site=site_args(entry), staging_override=str(other_day.root))
    operator.execute({"run_id": next_run})  # type: ignore[arg-type]

    for run_id in (RUN_ID, next_run):
        assert ledger.run_summary(SITE_ID, run_id).instances_by_state["quarantined"] == len(BAD_REASONS)


def test_studies_the_vendor_already_confirmed_are_left_out(
    entry: dict[str, Any], sample: SampleManifest, ledger: Ledger
) -> None:
    first = run_plan(entry)
    plan = Plan.load(first["work_uri"])
    done_uid, (batch_id, done_study) = next(iter(batch_studies(plan).items()))
    deliver_study(ledger, SITE_ID, RUN_ID, batch_id, done_study)

    second = run_plan(entry)

    assert done_uid not in batch_studies(Plan.load(second["work_uri"]))
    assert second["counts"]["studies_skipped_done"] == 1
    assert second["counts"]["studies_planned"] == len(sample.delivered_studies) - 1


def test_done_studies_asks_the_ledger_once_per_study() -> None:
    asked: list[list[str]] = []

    class RecordingLedger:
        def done_studies(self, site_id: str, study_uids: list[str]) -> set[str]:
            asked.append(list(study_uids))
            return {"1.2.3"} & set(study_uids)

    done = DoneStudies(RecordingLedger(), SITE_ID)  # type: ignore[arg-type]

    answers = [done(uid) for uid in ("1.2.3", "1.2.4", "1.2.3", "1.2.4")]

    assert answers == [True, False, True, False]
    assert asked == [["1.2.3"], ["1.2.4"]]


def test_a_dry_run_records_the_plan_but_hands_out_no_batch(
    entry: dict[str, Any], sample: SampleManifest, ledger: Ledger
) -> None:
    result = run_plan(entry, dry_run="True")

    assert result["dry_run"] is True
    assert result["batches"] == []
    assert result["counts"]["studies_planned"] == len(sample.delivered_studies)
    plan = Plan.load(result["work_uri"])
    recorded = {
        study.study_uid
        for batch_id in plan.batch_ids
        for study in ledger.studies_in_batch(SITE_ID, RUN_ID, batch_id)
    }
    assert recorded == {study.study_uid for study in sample.delivered_studies}


def test_too_many_invalid_files_fail_the_task_without_retry_and_plan_nothing(
    entry: dict[str, Any], ledger: Ledger
) -> None:
    entry["invalid_threshold"] = {"max_fraction": 0.05}

    with pytest.raises(AirflowFailException) as failure:
        run_plan(entry)

    message = str(failure.value)
    assert "3 of 22 staged files are invalid" in message
    assert "not_dicom=1" in message
    assert "unreadable=1" in message
    assert ledger.run_summary(SITE_ID, RUN_ID).studies == 0


def test_the_staging_override_replaces_the_site_staging_area(folder: Path, sample: SampleManifest) -> None:
    entry = site_entry(SITE_ID, folder, staging=str(folder / "does-not-exist"))

    result = run_plan(entry, staging_override=str(sample.root))

    assert result["counts"]["studies_planned"] == len(sample.delivered_studies)


def test_an_empty_staging_override_keeps_the_site_staging_area(
    entry: dict[str, Any], sample: SampleManifest
) -> None:
    result = run_plan(entry, staging_override="")

    assert result["counts"]["studies_planned"] == len(sample.delivered_studies)


def test_the_log_gives_counts_never_paths_or_patient_data(
    entry: dict[str, Any], sample: SampleManifest, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        run_plan(entry)

    text = caplog.text
    assert "2 studies (12 instances" in text
    assert "metadata_missing=1" in text
    for bad in sample.bad_files:
        assert bad.relative_path not in text
    for study in sample.studies:
        assert study.folder not in text
    assert "DEMO" not in text


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        ("True", True),
        ("false", False),
        (" yes ", True),
        ("", False),
        (None, False),
    ],
)
def test_templated_flags_read_rendered_booleans(value: object, expected: bool) -> None:
    assert templated_flag(value) is expected


def test_templated_flags_refuse_other_words() -> None:
    with pytest.raises(ValueError, match="expected a boolean"):
        templated_flag("sometimes")


def test_an_empty_staging_folder_is_a_run_with_nothing_to_send(folder: Path) -> None:
    (folder / "quiet-day").mkdir()
    entry = site_entry(SITE_ID, folder, staging=str(folder / "quiet-day"))

    result = run_plan(entry)

    assert result["batches"] == []
    assert result["counts"]["studies_planned"] == 0


def test_a_missing_staging_folder_fails_the_task(folder: Path) -> None:
    entry = site_entry(SITE_ID, folder, staging=str(folder / "not-mounted"))

    with pytest.raises(StagingSourceError, match="not an existing folder"):
        run_plan(entry)
