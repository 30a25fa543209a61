"""DicomUploadBatchOperator against the sandbox, with an environment connection and no Airflow database."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_ingest.exceptions import DicomIngestConfigError, DicomIngestError
from dicom_ingest.ledger import Ledger, StudyState
from dicom_ingest.links import DicomBatchOrdersLink
from dicom_ingest.operators.upload import BatchRef, DicomUploadBatchOperator
from dicom_ingest_sandbox.testing import Sandbox
from tests.dags.support import open_ledger, private_folder, site_args, site_entry
from tests.upload.sandbox_support import (
    CONN_ID,
    StagedRun,
    assert_one_complete_order_each,
    connect,
    record,
    stage_and_plan,
    wait_until_delivered,
)
from tests.upload.support import RUN

SITE_ID = "nantes"
STUDIES = 2
INSTANCES = 3
CONNECTION_CAP = 2


class RecordingTaskInstance:
    """Stands in for the context's task instance: records what the operator pushes to XCom."""

    def __init__(self) -> None:
        self.pushed: list[tuple[str, Any]] = []

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed.append((key, value))


@pytest.fixture
def folder() -> Iterator[Path]:
    with private_folder() as path:
        yield path


@pytest.fixture
def entry(folder: Path, fresh_sandbox_state: Sandbox, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A site on the sandbox's connection: 3 uploads at once by the site, at most 2 by the connection."""
    connect(monkeypatch, fresh_sandbox_state, upload_concurrency=CONNECTION_CAP)
    return site_entry(SITE_ID, folder, conn_id=CONN_ID, upload_concurrency=3)


@pytest.fixture
def staged(folder: Path) -> StagedRun:
    return stage_and_plan(folder, STUDIES, INSTANCES)


@pytest.fixture
def ledger(entry: dict[str, Any], staged: StagedRun) -> Iterator[Ledger]:
    with open_ledger(entry) as opened:
        record(opened, staged, SITE_ID)
        yield opened


def upload_operator(entry: dict[str, Any], staged: StagedRun) -> DicomUploadBatchOperator:
    """Build the operator for the plan's only batch, as the DAG's mapped group does."""
    (summary,) = staged.plan.batches
    batch = {"index": 1, **summary.to_dict()}
    return DicomUploadBatchOperator(
        task_id="upload", site=site_args(entry), work_uri=str(staged.plan.work), batch=batch
    )


def test_the_operator_uploads_its_batch_and_returns_a_small_xcom_value(
    entry: dict[str, Any],
    staged: StagedRun,
    ledger: Ledger,
    fresh_sandbox_state: Sandbox,
    caplog: pytest.LogCaptureFixture,
) -> None:
    task_instance = RecordingTaskInstance()
    context: dict[str, Any] = {"run_id": RUN, "ti": task_instance}
    caplog.set_level(logging.INFO, logger="dicom_ingest.upload")

    result = upload_operator(entry, staged).execute(context)  # type: ignore[arg-type]

    assert isinstance(result.pop("seconds"), float)
    assert result == {
        "batch_id": staged.batch_id,
        "index": 1,
        "studies": STUDIES,
        "instances": STUDIES * INSTANCES,
        "uploaded": STUDIES * INSTANCES,
        "skipped_done": 0,
        "failed": 0,
        "held": 0,
        "busy": 0,
        "bytes": staged.plan.batches[0].bytes,
        "orders": STUDIES,
    }
    text = json.dumps(result)
    assert "://" not in text
    assert not [uid for uid in staged.instances if uid in text]
    assert context["batch_label"] == f"batch 1: {STUDIES} studies, {STUDIES * INSTANCES} instances"
    assert task_instance.pushed == [(DicomBatchOrdersLink.key, {"batch_id": staged.batch_id})]
    assert f"{CONNECTION_CAP} upload workers" in caplog.text  # the connection's cap beat the site's 3
    assert_one_complete_order_each(wait_until_delivered(fresh_sandbox_state, set(staged.instances)), staged)


def test_the_operator_fails_after_the_batch_naming_the_failed_study_and_reason(
    entry: dict[str, Any], staged: StagedRun, ledger: Ledger, folder: Path, fresh_sandbox_state: Sandbox
) -> None:
    broken, intact = list(staged.plan.iter_batch(staged.batch_id))
    (folder / "staging" / broken.instances[-1].relative_path).unlink()

    with pytest.raises(DicomIngestError) as raised:
        upload_operator(entry, staged).execute({"run_id": RUN, "ti": RecordingTaskInstance()})  # type: ignore[arg-type]

    message = str(raised.value)
    assert f"{broken.study_uid} (source_unreadable)" in message
    assert intact.study_uid not in message
    assert str(folder) not in message
    broken_detail, intact_detail = (
        ledger.study_detail(SITE_ID, study.study_uid) for study in (broken, intact)
    )
    assert broken_detail is not None and intact_detail is not None
    assert (broken_detail.state, intact_detail.state) == (StudyState.FAILED, StudyState.METADATA_SENT)
    audit = fresh_sandbox_state.state()["audit"]
    patched = {event["order_id"] for event in audit if event["event"] == "metadata_patched"}
    assert patched == {intact_detail.order_id}


def test_the_batch_label_counts_with_thousands_separators() -> None:
    batch = BatchRef.from_value({"batch_id": "batch-00003", "index": 3, "studies": 12, "instances": 4211})

    assert batch.label == "batch 3: 12 studies, 4,211 instances"


@pytest.mark.parametrize("value", [["batch-00001"], {"batch_id": "batch-00001"}, {"index": "three"}])
def test_a_batch_that_is_not_one_of_the_plans_batches_is_refused(value: Any) -> None:
    with pytest.raises(DicomIngestConfigError):
        BatchRef.from_value(value)
