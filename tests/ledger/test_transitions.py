"""State transitions of instances and studies, their idempotence and the transitions refused."""

from __future__ import annotations

import pytest

from dicom_ingest.ledger import (
    InstanceState,
    Ledger,
    LedgerStateError,
    PlannedStudy,
    StudyClaim,
    StudyState,
    UnknownStudyError,
)
from tests.ledger.support import BATCH, RUN, SITE, FakeClock, planned_study, sop_uids, study_uid

MD5 = "9e107d9d372bb6826bd81d3542a419d6"


@pytest.fixture
def study(ledger: Ledger) -> PlannedStudy:
    """Plan one study of three instances."""
    planned = planned_study(1)
    ledger.record_plan(SITE, RUN, BATCH, [planned])
    return planned


@pytest.fixture
def claimed(ledger: Ledger, study: PlannedStudy) -> StudyClaim:
    """Claim the planned study for upload."""
    return ledger.claim_study(SITE, study.study_uid, RUN, BATCH, owner="worker-a:1")


def upload_all(ledger: Ledger, study: PlannedStudy) -> None:
    """Record every instance of ``study`` as uploaded."""
    for sop in sop_uids(study):
        ledger.mark_instance_uploaded(SITE, sop, f"key/{sop}", MD5, MD5)


def states(ledger: Ledger, study: PlannedStudy) -> tuple[str, set[str]]:
    """Return the study's state and the set of its instances' states."""
    detail = ledger.study_detail(SITE, study.study_uid)
    assert detail is not None
    return detail.state, {item.state for item in detail.instances}


def test_a_study_goes_from_planned_to_verified(
    ledger: Ledger, study: PlannedStudy, claimed: StudyClaim, clock: FakeClock
) -> None:
    assert states(ledger, study) == (StudyState.UPLOADING, {InstanceState.PLANNED})
    upload_all(ledger, study)
    assert states(ledger, study) == (StudyState.UPLOADING, {InstanceState.UPLOADED})
    assert ledger.mark_study_uploaded(SITE, study.study_uid, token=claimed.token)
    assert states(ledger, study) == (StudyState.UPLOADED, {InstanceState.UPLOADED})
    assert ledger.mark_metadata_sent(SITE, study.study_uid, "order-1")
    assert states(ledger, study) == (StudyState.METADATA_SENT, {InstanceState.METADATA_SENT})
    assert ledger.mark_verified(SITE, study.study_uid, "order-1", "DELIVERED")
    assert states(ledger, study) == (StudyState.VERIFIED, {InstanceState.VERIFIED})

    detail = ledger.study_detail(SITE, study.study_uid)
    assert detail is not None
    assert (detail.order_id, detail.order_status, detail.verified_at, detail.claim_owner) == (
        "order-1",
        "DELIVERED",
        clock.now,
        None,
    )
    first = detail.instances[0]
    assert (first.key, first.md5, first.etag, first.attempts) == (f"key/{first.sop_uid}", MD5, MD5, 1)
    study_events = [(item.from_state, item.to_state) for item in detail.events if item.sop_uid is None]
    assert study_events == [
        (None, "planned"),
        ("planned", "uploading"),
        ("uploading", "uploaded"),
        ("uploaded", "metadata_sent"),
        ("metadata_sent", "verified"),
    ]
    instance_events = [item for item in detail.events if item.sop_uid is not None]
    assert [(item.sop_uid, item.to_state) for item in instance_events] == [
        (sop, "uploaded") for sop in sop_uids(study)
    ]


def test_recording_an_upload_twice_counts_it_once(
    ledger: Ledger, study: PlannedStudy, claimed: StudyClaim
) -> None:
    sop = sop_uids(study)[0]
    assert ledger.mark_instance_uploaded(SITE, sop, "key/a", MD5, MD5)

    assert not ledger.mark_instance_uploaded(SITE, sop, "key/a", MD5, MD5)

    detail = ledger.study_detail(SITE, study.study_uid)
    assert detail is not None
    assert [item.attempts for item in detail.instances if item.sop_uid == sop] == [1]
    assert [item.sop_uid for item in detail.events].count(sop) == 1


def test_repeated_study_transitions_are_no_ops(
    ledger: Ledger, study: PlannedStudy, claimed: StudyClaim
) -> None:
    upload_all(ledger, study)
    assert ledger.mark_study_uploaded(SITE, study.study_uid, token=claimed.token)
    assert not ledger.mark_study_uploaded(SITE, study.study_uid, token=claimed.token)
    assert ledger.mark_metadata_sent(SITE, study.study_uid, "order-1")
    assert not ledger.mark_metadata_sent(SITE, study.study_uid, "order-1")
    assert ledger.mark_verified(SITE, study.study_uid, "order-1", "DELIVERED")
    assert not ledger.mark_verified(SITE, study.study_uid, "order-1", "DELIVERED")

    detail = ledger.study_detail(SITE, study.study_uid)
    assert detail is not None
    assert [item.reason for item in detail.events if item.sop_uid is None] == [
        "planned",
        "claimed",
        "study_uploaded",
        "metadata_sent",
        "verified",
    ]


def test_a_study_with_an_instance_not_uploaded_cannot_be_marked_uploaded(
    ledger: Ledger, study: PlannedStudy, claimed: StudyClaim
) -> None:
    first, second, _third = sop_uids(study)
    ledger.mark_instance_uploaded(SITE, first, "key/1", MD5, MD5)
    ledger.mark_instance_failed(SITE, second, "put_failed", "PUT of study-1/1.dcm failed")

    with pytest.raises(LedgerStateError, match="2 instances not uploaded"):
        ledger.mark_study_uploaded(SITE, study.study_uid, token=claimed.token)
    assert states(ledger, study)[0] == StudyState.UPLOADING


def test_an_unclaimed_study_cannot_be_marked_uploaded(ledger: Ledger, study: PlannedStudy) -> None:
    with pytest.raises(LedgerStateError, match="planned, not uploading"):
        ledger.mark_study_uploaded(SITE, study.study_uid)


def test_metadata_cannot_be_recorded_before_the_upload(
    ledger: Ledger, study: PlannedStudy, claimed: StudyClaim
) -> None:
    with pytest.raises(LedgerStateError, match="uploading, not uploaded"):
        ledger.mark_metadata_sent(SITE, study.study_uid, "order-1")


def test_failed_uploads_count_attempts_and_keep_the_reason(
    ledger: Ledger, study: PlannedStudy, claimed: StudyClaim
) -> None:
    sop = sop_uids(study)[0]
    ledger.mark_instance_failed(SITE, sop, "put_failed", "PUT of study-1/0.dcm failed")
    ledger.mark_instance_failed(SITE, sop, "url_expired", "PUT of study-1/0.dcm: URL expired")

    detail = ledger.study_detail(SITE, study.study_uid)
    assert detail is not None
    failed = next(item for item in detail.instances if item.sop_uid == sop)
    assert (failed.state, failed.reason, failed.message, failed.attempts) == (
        InstanceState.FAILED,
        "url_expired",
        "PUT of study-1/0.dcm: URL expired",
        2,
    )
    ledger.mark_instance_uploaded(SITE, sop, "key/0", MD5, MD5)
    detail = ledger.study_detail(SITE, study.study_uid)
    assert detail is not None
    uploaded = next(item for item in detail.instances if item.sop_uid == sop)
    assert (uploaded.state, uploaded.reason, uploaded.message, uploaded.attempts) == (
        InstanceState.UPLOADED,
        None,
        None,
        3,
    )


def test_a_verified_study_is_never_marked_failed(
    ledger: Ledger, study: PlannedStudy, claimed: StudyClaim
) -> None:
    ledger.mark_verified(SITE, study.study_uid, "order-1", "DELIVERED")

    assert not ledger.mark_study_failed(SITE, study.study_uid, "order_failed", "order-1")
    assert not ledger.mark_instance_failed(SITE, sop_uids(study)[0], "put_failed")
    assert not ledger.mark_instance_uploaded(SITE, sop_uids(study)[0], "key/late", MD5, MD5)
    assert states(ledger, study) == (StudyState.VERIFIED, {InstanceState.VERIFIED})


def test_a_failed_study_keeps_its_reason_and_order(
    ledger: Ledger, study: PlannedStudy, claimed: StudyClaim
) -> None:
    assert ledger.mark_study_failed(SITE, study.study_uid, "order_failed", "order-1", token=claimed.token)
    assert not ledger.mark_study_failed(SITE, study.study_uid, "order_failed")

    detail = ledger.study_detail(SITE, study.study_uid)
    assert detail is not None
    assert (detail.state, detail.reason, detail.order_id, detail.claim_owner) == (
        StudyState.FAILED,
        "order_failed",
        "order-1",
        None,
    )
    assert (detail.events[-1].to_state, detail.events[-1].reason) == ("failed", "order_failed")


def test_abandoned_orders_are_recorded_once(ledger: Ledger, study: PlannedStudy, claimed: StudyClaim) -> None:
    upload_all(ledger, study)
    ledger.mark_study_uploaded(SITE, study.study_uid)
    ledger.mark_metadata_sent(SITE, study.study_uid, "order-1")

    assert ledger.record_abandoned_order(SITE, study.study_uid, "order-1")
    assert not ledger.record_abandoned_order(SITE, study.study_uid, "order-1")
    assert ledger.record_abandoned_order(SITE, study.study_uid, "order-0")

    detail = ledger.study_detail(SITE, study.study_uid)
    assert detail is not None
    assert (detail.abandoned_order_ids, detail.order_id) == (["order-1", "order-0"], None)
    assert [item.reason for item in detail.events].count("order_abandoned") == 2


def test_quarantined_files_are_keyed_by_path(ledger: Ledger) -> None:
    ledger.mark_quarantined(SITE, RUN, "/staging/x/notes.txt", "not_dicom", "notes.txt is not DICOM")
    ledger.mark_quarantined(
        SITE, RUN, "/staging/x/notes.txt", "not_dicom", "notes.txt is not DICOM", study_uid=None
    )
    ledger.mark_quarantined(
        SITE, RUN, "/staging/x/empty.dcm", "zero_byte", "empty.dcm is empty", study_uid=study_uid(3)
    )

    summary = ledger.run_summary(SITE, RUN)
    assert summary.instances_by_state == {InstanceState.QUARANTINED: 2}
    assert {(item.reason, item.count) for item in summary.reasons} == {("not_dicom", 1), ("zero_byte", 1)}
    detail = ledger.study_detail(SITE, study_uid(3))
    assert detail is None
    events = ledger.run_events(SITE, RUN)
    assert [(item.study_uid, item.to_state, item.reason) for item in events] == [
        (None, "quarantined", "not_dicom"),
        (None, "quarantined", "not_dicom"),
        (study_uid(3), "quarantined", "zero_byte"),
    ]


def test_quarantining_a_file_again_counts_how_often_it_was_seen(ledger: Ledger) -> None:
    path = "/staging/x/dup.dcm"
    ledger.mark_quarantined(SITE, RUN, path, "duplicate_conflict", "dup.dcm collides", size=10)
    ledger.mark_quarantined(SITE, "run-2", path, "duplicate_conflict", "dup.dcm collides", size=10)

    assert ledger.run_summary(SITE, RUN).instances == 0
    second = ledger.run_summary(SITE, "run-2")
    assert (second.instances, second.bytes_planned) == (1, 0)
    summary = ledger.site_summary(SITE)
    assert summary.instances_by_state == {InstanceState.QUARANTINED: 1}


def test_a_study_can_be_held_before_it_is_planned(ledger: Ledger) -> None:
    assert ledger.hold_study(SITE, study_uid(5), RUN, "conflict")
    assert not ledger.hold_study(SITE, study_uid(5), RUN, "conflict")

    detail = ledger.study_detail(SITE, study_uid(5))
    assert detail is not None
    assert (detail.state, detail.reason, detail.run_id, detail.instance_count) == (
        StudyState.HELD,
        "conflict",
        RUN,
        0,
    )


def test_a_study_being_uploaded_cannot_be_held(
    ledger: Ledger, study: PlannedStudy, claimed: StudyClaim
) -> None:
    with pytest.raises(LedgerStateError, match="being uploaded"):
        ledger.hold_study(SITE, study.study_uid, RUN, "metadata_missing")


def test_a_study_whose_metadata_is_sent_is_not_held(
    ledger: Ledger, study: PlannedStudy, claimed: StudyClaim
) -> None:
    upload_all(ledger, study)
    ledger.mark_study_uploaded(SITE, study.study_uid)
    ledger.mark_metadata_sent(SITE, study.study_uid, "order-1")

    assert not ledger.hold_study(SITE, study.study_uid, RUN, "metadata_missing")
    assert states(ledger, study)[0] == StudyState.METADATA_SENT


def test_unknown_instances_and_studies_are_refused(ledger: Ledger, study: PlannedStudy) -> None:
    with pytest.raises(UnknownStudyError, match="never planned"):
        ledger.mark_instance_uploaded(SITE, "9.9.9", "key", MD5, MD5)
    with pytest.raises(UnknownStudyError):
        ledger.mark_verified(SITE, study_uid(77), "order-1", "DELIVERED")
    with pytest.raises(UnknownStudyError):
        ledger.mark_instance_uploaded("lyon", sop_uids(study)[0], "key", MD5, MD5)
