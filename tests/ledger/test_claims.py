"""Claiming studies: skip what the vendor has, re-send interrupted studies whole, leases and takeovers."""

from __future__ import annotations

from datetime import timedelta

import pytest

from dicom_ingest.ledger import (
    ClaimAction,
    ClaimLostError,
    InstanceState,
    Ledger,
    PlannedStudy,
    StudyClaim,
    StudyState,
    UnknownStudyError,
)
from tests.ledger.conftest import LEASE
from tests.ledger.support import BATCH, RUN, SITE, FakeClock, planned_study, sop_uids, study_uid

WORKER_A = "worker-a:101"
WORKER_B = "worker-b:202"
RETRY_RUN = "manual__2026-11-01T05:00:00+00:00"


@pytest.fixture
def study(ledger: Ledger) -> PlannedStudy:
    """Plan one study of three instances."""
    planned = planned_study(1)
    ledger.record_plan(SITE, RUN, BATCH, [planned])
    return planned


def claim(ledger: Ledger, study: PlannedStudy, owner: str, **options: object) -> StudyClaim:
    """Claim ``study`` for ``owner`` in the test run."""
    return ledger.claim_study(SITE, study.study_uid, RUN, BATCH, owner=owner, **options)  # type: ignore[arg-type]


def upload(ledger: Ledger, sops: list[str]) -> None:
    """Record the given instances as uploaded."""
    for sop in sops:
        ledger.mark_instance_uploaded(SITE, sop, f"key/{sop}", "0" * 32, "0" * 32)


def event_reasons(ledger: Ledger, study: PlannedStudy) -> list[str | None]:
    """Return the reasons of the study-level events of ``study``, oldest first."""
    detail = ledger.study_detail(SITE, study.study_uid)
    assert detail is not None
    return [item.reason for item in detail.events if item.sop_uid is None]


def test_a_fresh_study_is_uploaded_whole(ledger: Ledger, study: PlannedStudy) -> None:
    answer = claim(ledger, study, WORKER_A)

    assert answer.action == ClaimAction.UPLOAD_ALL
    assert answer.token
    assert (answer.state, answer.owner, answer.resent, answer.took_over) == (
        StudyState.UPLOADING,
        WORKER_A,
        False,
        False,
    )
    detail = ledger.study_detail(SITE, study.study_uid)
    assert detail is not None
    assert (detail.state, detail.attempts, detail.resend_count, detail.claim_owner) == (
        StudyState.UPLOADING,
        1,
        0,
        WORKER_A,
    )
    assert event_reasons(ledger, study) == ["planned", "claimed"]


def test_a_verified_study_is_never_sent_again(ledger: Ledger, study: PlannedStudy) -> None:
    first = claim(ledger, study, WORKER_A)
    upload(ledger, sop_uids(study))
    ledger.mark_study_uploaded(SITE, study.study_uid, token=first.token)
    ledger.mark_metadata_sent(SITE, study.study_uid, "order-1")
    ledger.mark_verified(SITE, study.study_uid, "order-1", "DELIVERED")

    answer = claim(ledger, study, WORKER_B)

    assert (answer.action, answer.state, answer.order_id, answer.token) == (
        ClaimAction.SKIP,
        StudyState.VERIFIED,
        "order-1",
        None,
    )
    detail = ledger.study_detail(SITE, study.study_uid)
    assert detail is not None
    assert (detail.resend_count, detail.attempts) == (0, 1)
    assert {item.state for item in detail.instances} == {InstanceState.VERIFIED}


def test_a_study_whose_metadata_the_vendor_accepted_is_skipped(ledger: Ledger, study: PlannedStudy) -> None:
    first = claim(ledger, study, WORKER_A)
    upload(ledger, sop_uids(study))
    ledger.mark_study_uploaded(SITE, study.study_uid, token=first.token)
    ledger.mark_metadata_sent(SITE, study.study_uid, "order-1")

    answer = claim(ledger, study, WORKER_B)

    assert (answer.action, answer.state, answer.order_id) == (
        ClaimAction.SKIP,
        StudyState.METADATA_SENT,
        "order-1",
    )
    detail = ledger.study_detail(SITE, study.study_uid)
    assert detail is not None
    assert {item.state for item in detail.instances} == {InstanceState.METADATA_SENT}


def test_a_held_study_is_skipped_with_its_reason(ledger: Ledger, study: PlannedStudy) -> None:
    ledger.hold_study(SITE, study.study_uid, RUN, "metadata_missing")

    answer = claim(ledger, study, WORKER_A)

    assert (answer.action, answer.state, answer.reason) == (
        ClaimAction.SKIP,
        StudyState.HELD,
        "metadata_missing",
    )


def test_a_live_claim_makes_other_workers_wait(ledger: Ledger, study: PlannedStudy, clock: FakeClock) -> None:
    first = claim(ledger, study, WORKER_A)
    clock.advance(LEASE - timedelta(seconds=1))

    answer = claim(ledger, study, WORKER_B)

    assert (answer.action, answer.owner, answer.claimed_at, answer.token) == (
        ClaimAction.BUSY,
        WORKER_A,
        first.claimed_at,
        None,
    )
    assert event_reasons(ledger, study) == ["planned", "claimed"]


def test_an_interrupted_study_is_resent_whole_after_the_lease(
    ledger: Ledger, study: PlannedStudy, clock: FakeClock
) -> None:
    first = claim(ledger, study, WORKER_A)
    upload(ledger, sop_uids(study)[:2])
    clock.advance(LEASE)

    answer = ledger.claim_study(SITE, study.study_uid, RETRY_RUN, "batch-0007", owner=WORKER_B)

    assert answer.action == ClaimAction.UPLOAD_ALL
    assert (answer.resent, answer.took_over, answer.resend_count, answer.owner) == (True, True, 1, WORKER_B)
    assert answer.token != first.token
    detail = ledger.study_detail(SITE, study.study_uid)
    assert detail is not None
    assert (detail.resend_count, detail.attempts, detail.run_id, detail.batch_id) == (
        1,
        2,
        RETRY_RUN,
        "batch-0007",
    )
    assert [(item.state, item.key, item.md5) for item in detail.instances] == [
        (InstanceState.PLANNED, None, None)
    ] * 3
    assert event_reasons(ledger, study) == ["planned", "claimed", "claim_taken_over", "resend"]
    resend = detail.events[-1]
    assert (resend.run_id, resend.from_state, resend.to_state) == (
        RETRY_RUN,
        StudyState.UPLOADING,
        StudyState.UPLOADING,
    )


def test_the_worker_that_lost_its_claim_cannot_finish_the_study(
    ledger: Ledger, study: PlannedStudy, clock: FakeClock
) -> None:
    stale = claim(ledger, study, WORKER_A)
    clock.advance(LEASE)
    claim(ledger, study, WORKER_B)
    upload(ledger, sop_uids(study))

    with pytest.raises(ClaimLostError):
        ledger.mark_study_uploaded(SITE, study.study_uid, token=stale.token)
    with pytest.raises(ClaimLostError):
        ledger.renew_claim(SITE, study.study_uid, stale.token or "")
    detail = ledger.study_detail(SITE, study.study_uid)
    assert detail is not None
    assert (detail.state, detail.claim_owner) == (StudyState.UPLOADING, WORKER_B)


@pytest.mark.parametrize("sign_of_life", ["instance_uploaded", "renew_claim"])
def test_signs_of_life_extend_the_lease(
    ledger: Ledger, study: PlannedStudy, clock: FakeClock, sign_of_life: str
) -> None:
    first = claim(ledger, study, WORKER_A)
    clock.advance(LEASE - timedelta(seconds=10))
    if sign_of_life == "instance_uploaded":
        upload(ledger, sop_uids(study)[:1])
    else:
        ledger.renew_claim(SITE, study.study_uid, first.token or "")
    clock.advance(timedelta(seconds=30))

    assert claim(ledger, study, WORKER_B).action == ClaimAction.BUSY

    clock.advance(LEASE)
    taken = claim(ledger, study, WORKER_B)
    assert (taken.action, taken.took_over) == (ClaimAction.UPLOAD_ALL, True)


def test_the_same_owner_takes_its_claim_back_at_once(ledger: Ledger, study: PlannedStudy) -> None:
    claim(ledger, study, WORKER_A)
    upload(ledger, sop_uids(study)[:1])

    again = claim(ledger, study, WORKER_A)

    assert (again.action, again.took_over, again.resent, again.resend_count) == (
        ClaimAction.UPLOAD_ALL,
        True,
        True,
        1,
    )


def test_a_study_uploaded_whole_resumes_with_its_metadata(
    ledger: Ledger, study: PlannedStudy, clock: FakeClock
) -> None:
    claim(ledger, study, WORKER_A)
    upload(ledger, sop_uids(study))
    last_upload = clock.now
    clock.advance(LEASE)

    answer = claim(ledger, study, WORKER_B)

    assert answer.action == ClaimAction.RESUME_METADATA
    assert (answer.state, answer.resent, answer.resend_count, answer.uploaded_at) == (
        StudyState.UPLOADED,
        False,
        0,
        last_upload,
    )
    assert claim(ledger, study, "worker-c:303").action == ClaimAction.BUSY
    assert ledger.mark_metadata_sent(SITE, study.study_uid, "order-1", token=answer.token)
    detail = ledger.study_detail(SITE, study.study_uid)
    assert detail is not None
    assert {item.state for item in detail.instances} == {InstanceState.METADATA_SENT}


def test_an_uploaded_study_resumes_with_its_metadata_right_away(ledger: Ledger, study: PlannedStudy) -> None:
    first = claim(ledger, study, WORKER_A)
    upload(ledger, sop_uids(study))
    ledger.mark_study_uploaded(SITE, study.study_uid, token=first.token)

    answer = claim(ledger, study, WORKER_B)

    assert (answer.action, answer.took_over, answer.resent) == (ClaimAction.RESUME_METADATA, False, False)


def test_an_upload_older_than_the_resume_window_is_resent_whole(
    ledger: Ledger, study: PlannedStudy, clock: FakeClock
) -> None:
    first = claim(ledger, study, WORKER_A)
    upload(ledger, sop_uids(study))
    ledger.mark_study_uploaded(SITE, study.study_uid, token=first.token)
    clock.advance(timedelta(minutes=16))

    answer = claim(ledger, study, WORKER_B, resume_window=timedelta(minutes=15))

    assert (answer.action, answer.resent, answer.resend_count) == (ClaimAction.UPLOAD_ALL, True, 1)


def test_a_failed_study_is_resent_only_if_bytes_went_out(ledger: Ledger) -> None:
    partly_sent, nothing_sent = planned_study(1), planned_study(2)
    ledger.record_plan(SITE, RUN, BATCH, [partly_sent, nothing_sent])
    for planned in (partly_sent, nothing_sent):
        claim(ledger, planned, WORKER_A)
    upload(ledger, sop_uids(partly_sent)[:1])
    ledger.mark_instance_failed(SITE, sop_uids(partly_sent)[1], "put_failed")
    ledger.mark_study_failed(SITE, partly_sent.study_uid, "upload_failed")
    ledger.mark_instance_failed(SITE, sop_uids(nothing_sent)[0], "put_failed")
    ledger.mark_study_failed(SITE, nothing_sent.study_uid, "upload_failed")

    resent = claim(ledger, partly_sent, WORKER_B)
    fresh = claim(ledger, nothing_sent, WORKER_B)

    assert (resent.action, resent.resent, resent.resend_count, resent.took_over) == (
        ClaimAction.UPLOAD_ALL,
        True,
        1,
        False,
    )
    assert (fresh.action, fresh.resent, fresh.resend_count) == (ClaimAction.UPLOAD_ALL, False, 0)
    detail = ledger.study_detail(SITE, nothing_sent.study_uid)
    assert detail is not None
    assert {(item.state, item.reason) for item in detail.instances} == {(InstanceState.PLANNED, None)}


def test_claiming_an_unplanned_study_fails(ledger: Ledger) -> None:
    with pytest.raises(UnknownStudyError, match=study_uid(42)):
        ledger.claim_study(SITE, study_uid(42), RUN, BATCH)


def test_a_released_claim_can_be_taken_at_once(ledger: Ledger, study: PlannedStudy) -> None:
    first = claim(ledger, study, WORKER_A)
    upload(ledger, sop_uids(study))
    ledger.mark_study_uploaded(SITE, study.study_uid, token=first.token)
    resumed = claim(ledger, study, WORKER_A)

    assert ledger.release_claim(SITE, study.study_uid, resumed.token or "")
    assert not ledger.release_claim(SITE, study.study_uid, resumed.token or "")
    answer = claim(ledger, study, WORKER_B)

    assert (answer.action, answer.took_over, answer.owner) == (ClaimAction.RESUME_METADATA, False, WORKER_B)


def test_a_study_failed_after_upload_is_resent_when_planned_again(
    ledger: Ledger, study: PlannedStudy
) -> None:
    first = claim(ledger, study, WORKER_A)
    upload(ledger, sop_uids(study))
    ledger.mark_study_uploaded(SITE, study.study_uid, token=first.token)
    ledger.mark_study_failed(SITE, study.study_uid, "metadata_rejected")
    assert claim(ledger, study, WORKER_A).action == ClaimAction.RESUME_METADATA
    ledger.mark_study_failed(SITE, study.study_uid, "metadata_rejected")

    ledger.record_plan(SITE, RETRY_RUN, BATCH, [study])
    answer = ledger.claim_study(SITE, study.study_uid, RETRY_RUN, BATCH, owner=WORKER_B)

    assert (answer.action, answer.resent, answer.resend_count) == (ClaimAction.UPLOAD_ALL, True, 1)
