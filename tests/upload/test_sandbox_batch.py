"""A real batch through the real hook into the sandbox: orders, metadata, reruns and a failed study."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dicom_ingest.hooks.dicom_ingest import DicomIngestHook
from dicom_ingest.ledger import Ledger, StudyState
from dicom_ingest.upload import BatchResult, BatchUploader
from dicom_ingest_sandbox.testing import Sandbox
from tests.upload.sandbox_support import (
    CONN_ID,
    StagedRun,
    assert_one_complete_order_each,
    connect,
    orders_by_study,
    record,
    stage_and_plan,
    wait_until_delivered,
)
from tests.upload.support import OWNER, RUN, SITE

pytestmark = pytest.mark.sandbox

STUDIES = 3
INSTANCES = 4


@pytest.fixture
def staged(folder: Path) -> StagedRun:
    """Plan three studies of four DICOM files each."""
    return stage_and_plan(folder, STUDIES, INSTANCES)


@pytest.fixture
def ledger(folder: Path, staged: StagedRun) -> Iterator[Ledger]:
    """Open a SQLite ledger with the plan recorded."""
    with Ledger(f"sqlite:///{folder / 'ledger.sqlite3'}") as opened:
        record(opened, staged)
        yield opened


@pytest.fixture
def upload_batch(staged: StagedRun, ledger: Ledger) -> Iterator[Callable[[int], BatchResult]]:
    """Run the plan's batch through a fresh hook and uploader; return the result."""
    hooks: list[DicomIngestHook] = []

    def run(concurrency: int) -> BatchResult:
        hook = DicomIngestHook(CONN_ID)
        hooks.append(hook)
        uploader = BatchUploader(
            hook,
            ledger,
            staged.plan.source(),
            SITE,
            RUN,
            staged.batch_id,
            concurrency,
            claim_owner=OWNER,
            metadata_wait=20.0,
            progress_interval=1.0,
        )
        return uploader.run(staged.plan.iter_batch(staged.batch_id))

    yield run
    for hook in hooks:
        hook.close()


def test_a_batch_gets_one_complete_order_per_study_and_a_rerun_sends_nothing(
    fresh_sandbox_state: Sandbox,
    monkeypatch: pytest.MonkeyPatch,
    staged: StagedRun,
    ledger: Ledger,
    upload_batch: Callable[[int], BatchResult],
) -> None:
    sandbox = fresh_sandbox_state
    connect(monkeypatch, sandbox)

    first = upload_batch(4)

    assert (first.uploaded, first.orders, first.failed) == (STUDIES * INSTANCES, STUDIES, 0)
    orders = wait_until_delivered(sandbox, set(staged.instances))
    assert_one_complete_order_each(orders, staged)
    for study_uid, (order,) in orders.items():
        detail = ledger.study_detail(SITE, study_uid)
        assert detail is not None
        assert (detail.state, detail.order_id) == (StudyState.METADATA_SENT, order["order_id"])
    calls_after_first = sandbox.state()["calls"]

    second = upload_batch(4)

    assert (second.uploaded, second.orders, second.skipped_done) == (0, 0, STUDIES)
    state = sandbox.state()
    assert state["calls"]["upload"] == calls_after_first["upload"]
    assert state["calls"]["add-metadata"] == calls_after_first["add-metadata"]
    assert_one_complete_order_each(orders_by_study(state), staged)


def test_a_study_failing_mid_way_is_reported_and_its_rerun_joins_the_same_order(
    fresh_sandbox_state: Sandbox,
    monkeypatch: pytest.MonkeyPatch,
    staged: StagedRun,
    ledger: Ledger,
    upload_batch: Callable[[int], BatchResult],
) -> None:
    sandbox = fresh_sandbox_state
    # Presigned URLs are asked for one at a time here, so that the fault below hits a known upload.
    connect(monkeypatch, sandbox, max_retries=1, presign_ahead=False)
    studies = list(staged.plan.iter_batch(staged.batch_id))
    failing = studies[1].study_uid
    # One worker: presigns 1-5 go through (study 1, then study 2's first instance); the sixth and
    # its one retry are refused, so study 2's second instance fails.
    sandbox.faults({"endpoint": "upload", "status": 503, "after": INSTANCES + 1, "count": 2})

    with sandbox.clocks(overwrite_window=60, metadata_deadline=120):
        failed_run = upload_batch(1)
        partial = sandbox.wait_for(lambda state: orders_by_study(state).get(failing))
        rerun = upload_batch(1)
        orders = wait_until_delivered(sandbox, set(staged.instances))

    assert dict(failed_run.failures) == {failing: "upload_failed"}
    assert (failed_run.uploaded, failed_run.orders) == (2 * INSTANCES + 1, STUDIES - 1)
    assert [order["status"] for order in partial] == ["UPLOADING"]
    assert (rerun.failed, rerun.skipped_done, rerun.uploaded, rerun.orders) == (0, STUDIES - 1, INSTANCES, 1)
    assert_one_complete_order_each(orders, staged)
    assert orders[failing][0]["order_id"] == partial[0]["order_id"]
    detail = ledger.study_detail(SITE, failing)
    assert detail is not None
    assert (detail.state, detail.resend_count, detail.abandoned_order_ids) == (
        StudyState.METADATA_SENT,
        1,
        [],
    )


def test_urls_asked_for_ahead_survive_a_refusing_presign_endpoint_and_none_is_wasted(
    fresh_sandbox_state: Sandbox,
    monkeypatch: pytest.MonkeyPatch,
    staged: StagedRun,
    upload_batch: Callable[[int], BatchResult],
) -> None:
    sandbox = fresh_sandbox_state
    connect(monkeypatch, sandbox)
    # Three GET /upload in a row are refused mid-batch, whether a worker or the supply asked.
    sandbox.faults({"endpoint": "upload", "status": 503, "after": 5, "count": 3})

    result = upload_batch(4)

    assert (result.uploaded, result.orders, result.failed) == (STUDIES * INSTANCES, STUDIES, 0)
    assert_one_complete_order_each(wait_until_delivered(sandbox, set(staged.instances)), staged)
    state = sandbox.state()
    issued = [event for event in state["audit"] if event["event"] == "url_issued"]
    # One URL per instance: nothing asked for ahead was left over, and the refusals were retried.
    assert len(issued) == STUDIES * INSTANCES
    assert state["calls"]["upload"] == STUDIES * INSTANCES + 3
