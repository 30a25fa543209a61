"""A failing instance fails its study only; a partial order never gets metadata; a retry heals it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dicom_ingest.ledger import Ledger, StudyState
from dicom_ingest.upload import BatchUploader, FailureReason
from tests.upload.support import SITE, FakeVendor, record_plan, sop_uid, stage_study, study_uid


def study_state(ledger: Ledger, uid: str) -> tuple[str, str | None]:
    """Return a study's state and reason in the ledger."""
    detail = ledger.study_detail(SITE, uid)
    assert detail is not None
    return detail.state, detail.reason


def test_an_instance_that_keeps_failing_fails_its_study_and_the_others_carry_on(
    make_uploader: Callable[..., BatchUploader], vendor: FakeVendor, ledger: Ledger, staging_root: Path
) -> None:
    studies = [stage_study(staging_root, number, 4) for number in (1, 2, 3)]
    record_plan(ledger, studies)
    vendor.failing_sops.add(sop_uid(2, 1))

    result = make_uploader(concurrency=1).run(studies)

    # The failed study's later instances are not sent; its partial order gets no metadata.
    assert vendor.put_starts == [
        *(sop_uid(1, index) for index in range(4)),
        sop_uid(2, 0),
        sop_uid(2, 1),
        *(sop_uid(3, index) for index in range(4)),
    ]
    partial_order = vendor.orders[study_uid(2)][0]
    assert vendor.filed[partial_order] == {sop_uid(2, 0)}
    assert partial_order not in vendor.patched_orders()
    assert len(vendor.patched_orders()) == 2
    assert study_state(ledger, study_uid(2)) == (StudyState.FAILED, FailureReason.UPLOAD_FAILED)
    assert (
        study_state(ledger, study_uid(1))[0]
        == study_state(ledger, study_uid(3))[0]
        == StudyState.METADATA_SENT
    )
    assert dict(result.failures) == {study_uid(2): "upload_failed"}
    assert (result.failed, result.orders, result.uploaded) == (1, 2, 9)
    assert result.failure_summary() == f"{study_uid(2)} (upload_failed)"


def test_a_staged_file_gone_since_planning_fails_its_study(
    make_uploader: Callable[..., BatchUploader], vendor: FakeVendor, ledger: Ledger, staging_root: Path
) -> None:
    vanished, intact = stage_study(staging_root, 1, 3), stage_study(staging_root, 2, 3)
    record_plan(ledger, [vanished, intact])
    (staging_root / vanished.instances[2].relative_path).unlink()

    result = make_uploader(concurrency=2).run([vanished, intact])

    assert dict(result.failures) == {vanished.study_uid: "source_unreadable"}
    assert vendor.orders[vanished.study_uid][0] not in vendor.patched_orders()
    assert study_state(ledger, intact.study_uid)[0] == StudyState.METADATA_SENT


def test_a_staged_file_whose_size_changed_since_planning_is_not_sent(
    make_uploader: Callable[..., BatchUploader], vendor: FakeVendor, ledger: Ledger, staging_root: Path
) -> None:
    study = stage_study(staging_root, 1, 3)
    record_plan(ledger, [study])
    with (staging_root / study.instances[0].relative_path).open("ab") as staged:
        staged.write(b"appended after planning")

    result = make_uploader(concurrency=1).run([study])

    assert vendor.put_starts == []
    assert dict(result.failures) == {study.study_uid: "source_changed"}
    assert study_state(ledger, study.study_uid) == (StudyState.FAILED, FailureReason.SOURCE_CHANGED)


def test_the_retry_of_a_failed_batch_resends_only_the_failed_study_into_its_partial_order(
    make_uploader: Callable[..., BatchUploader], vendor: FakeVendor, ledger: Ledger, staging_root: Path
) -> None:
    studies = [stage_study(staging_root, number, 3) for number in (1, 2)]
    record_plan(ledger, studies)
    vendor.failing_sops.add(sop_uid(2, 2))
    first = make_uploader(concurrency=1).run(studies)
    vendor.failing_sops.clear()
    starts_before_retry = len(vendor.put_starts)

    retry = make_uploader(concurrency=1).run(studies)

    assert first.failed == 1
    assert vendor.put_starts[starts_before_retry:] == [sop_uid(2, index) for index in range(3)]
    assert vendor.orders[study_uid(2)] == [partial := vendor.orders[study_uid(2)][0]]
    assert vendor.filed[partial] == {sop_uid(2, index) for index in range(3)}
    assert vendor.patched_orders()[-1] == partial
    assert (retry.failed, retry.skipped_done, retry.uploaded, retry.orders) == (0, 1, 3, 1)
    detail = ledger.study_detail(SITE, study_uid(2))
    assert detail is not None
    assert (detail.state, detail.order_id, detail.resend_count) == (StudyState.METADATA_SENT, partial, 1)
