"""Queries for the run report, the sensor and a UI page."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from dicom_ingest.ledger import (
    InstanceState,
    Ledger,
    ReasonCount,
    StudyState,
)
from tests.ledger.support import (
    BATCH,
    INSTANCE_SIZE,
    RUN,
    SITE,
    FakeClock,
    planned_study,
    sop_uids,
    study_uid,
)

MD5 = "0" * 32
SECOND_BATCH = "batch-0001"
NEXT_RUN = "scheduled__2026-11-02T00:00:00+00:00"


@pytest.fixture
def mixed_run(ledger: Ledger, clock: FakeClock) -> Ledger:
    """Record a run with one study in each outcome and two quarantined files.

    Study 1 verified, 2 failed after one instance went up, 3 held for missing metadata,
    4 re-sent once with an abandoned order and its metadata sent (second batch).
    """
    studies = [planned_study(number) for number in (1, 2, 3)]
    ledger.record_plan(SITE, RUN, BATCH, studies)
    ledger.record_plan(SITE, RUN, SECOND_BATCH, [planned_study(4, instances=2)])
    verified, failed, held = studies
    ledger.hold_study(SITE, held.study_uid, RUN, "metadata_missing")

    token = ledger.claim_study(SITE, verified.study_uid, RUN, BATCH).token
    for sop in sop_uids(verified):
        ledger.mark_instance_uploaded(SITE, sop, f"key/{sop}", MD5, MD5)
    ledger.mark_study_uploaded(SITE, verified.study_uid, token=token)
    ledger.mark_metadata_sent(SITE, verified.study_uid, "order-1")
    ledger.mark_verified(SITE, verified.study_uid, "order-1", "DELIVERED")

    ledger.claim_study(SITE, failed.study_uid, RUN, BATCH)
    ledger.mark_instance_uploaded(SITE, sop_uids(failed)[0], "key/x", MD5, MD5)
    ledger.mark_instance_failed(SITE, sop_uids(failed)[1], "put_failed", "PUT of study-2/1.dcm failed")
    ledger.mark_study_failed(SITE, failed.study_uid, "upload_failed")

    resent = planned_study(4, instances=2)
    ledger.claim_study(SITE, resent.study_uid, RUN, SECOND_BATCH, owner="worker-a:1")
    ledger.mark_instance_uploaded(SITE, sop_uids(resent)[0], "key/y", MD5, MD5)
    clock.advance(timedelta(minutes=10))
    token = ledger.claim_study(SITE, resent.study_uid, RUN, SECOND_BATCH, owner="worker-b:2").token
    ledger.record_abandoned_order(SITE, resent.study_uid, "order-partial")
    for sop in sop_uids(resent):
        ledger.mark_instance_uploaded(SITE, sop, f"key/{sop}", MD5, MD5)
    ledger.mark_study_uploaded(SITE, resent.study_uid, token=token)
    ledger.mark_metadata_sent(SITE, resent.study_uid, "order-4")

    ledger.mark_quarantined(
        SITE, RUN, "/staging/paris/notes.txt", "not_dicom", "notes.txt is not DICOM", size=7
    )
    ledger.mark_quarantined(SITE, RUN, "/staging/paris/empty.dcm", "zero_byte", "empty.dcm is empty")
    return ledger


def test_run_summary_counts_states_reasons_and_bytes(mixed_run: Ledger) -> None:
    summary = mixed_run.run_summary(SITE, RUN)

    assert (summary.site_id, summary.run_id, summary.studies, summary.instances) == (SITE, RUN, 4, 13)
    assert summary.studies_by_state == {
        StudyState.VERIFIED: 1,
        StudyState.FAILED: 1,
        StudyState.HELD: 1,
        StudyState.METADATA_SENT: 1,
    }
    assert summary.instances_by_state == {
        InstanceState.VERIFIED: 3,
        InstanceState.UPLOADED: 1,
        InstanceState.FAILED: 1,
        InstanceState.PLANNED: 4,
        InstanceState.METADATA_SENT: 2,
        InstanceState.QUARANTINED: 2,
    }
    assert summary.bytes_planned == 11 * INSTANCE_SIZE
    assert summary.bytes_uploaded == 6 * INSTANCE_SIZE
    assert (summary.resends, summary.abandoned_orders, summary.studies_already_done) == (1, 1, 0)
    assert summary.reasons == [
        ReasonCount(level="instance", state="failed", reason="put_failed", count=1),
        ReasonCount(level="instance", state="quarantined", reason="not_dicom", count=1),
        ReasonCount(level="instance", state="quarantined", reason="zero_byte", count=1),
        ReasonCount(level="study", state="failed", reason="upload_failed", count=1),
        ReasonCount(level="study", state="held", reason="metadata_missing", count=1),
    ]
    json.dumps(summary.to_dict())


def test_run_summary_of_an_unknown_run_is_empty(mixed_run: Ledger) -> None:
    summary = mixed_run.run_summary(SITE, "never-ran")

    assert (summary.studies, summary.instances, summary.bytes_planned, summary.reasons) == (0, 0, 0, [])
    assert mixed_run.run_summary("lyon", RUN).studies == 0


def test_site_summary_spans_runs(mixed_run: Ledger, clock: FakeClock) -> None:
    clock.advance(timedelta(days=1))
    mixed_run.record_plan(SITE, NEXT_RUN, BATCH, [planned_study(1), planned_study(9, instances=1)])

    summary = mixed_run.site_summary(SITE)

    assert (summary.studies, summary.instances, summary.runs) == (5, 14, 2)
    assert summary.studies_by_state[StudyState.PLANNED] == 1
    assert summary.bytes_total == 12 * INSTANCE_SIZE
    assert (summary.resends, summary.abandoned_orders) == (1, 1)
    assert summary.last_activity_at == clock.now
    assert mixed_run.run_summary(SITE, NEXT_RUN).studies_already_done == 1


def test_reasons_filter_by_run(mixed_run: Ledger) -> None:
    mixed_run.mark_quarantined(
        SITE, NEXT_RUN, "/staging/paris/late.txt", "not_dicom", "late.txt is not DICOM"
    )

    everything = {(item.level, item.reason): item.count for item in mixed_run.reasons(SITE)}
    next_run = mixed_run.reasons(SITE, NEXT_RUN)

    assert everything[("instance", "not_dicom")] == 2
    assert next_run == [ReasonCount(level="instance", state="quarantined", reason="not_dicom", count=1)]


def test_studies_in_batch_carry_their_orders(mixed_run: Ledger) -> None:
    first = mixed_run.studies_in_batch(SITE, RUN, BATCH)
    second = mixed_run.studies_in_batch(SITE, RUN, SECOND_BATCH)

    assert [(item.study_uid, item.state, item.order_id) for item in first] == [
        (study_uid(1), StudyState.VERIFIED, "order-1"),
        (study_uid(2), StudyState.FAILED, None),
        (study_uid(3), StudyState.HELD, None),
    ]
    assert [
        (item.study_uid, item.order_id, item.abandoned_order_ids, item.resend_count, item.instance_count)
        for item in second
    ] == [(study_uid(4), "order-4", ["order-partial"], 1, 2)]
    assert mixed_run.studies_in_batch(SITE, NEXT_RUN, BATCH) == []


def test_study_detail_lists_instances_and_history(mixed_run: Ledger) -> None:
    detail = mixed_run.study_detail(SITE, study_uid(2))

    assert detail is not None
    assert (detail.state, detail.reason, detail.attempts, detail.byte_count) == (
        StudyState.FAILED,
        "upload_failed",
        1,
        3 * INSTANCE_SIZE,
    )
    assert [(item.state, item.reason) for item in detail.instances] == [
        (InstanceState.UPLOADED, None),
        (InstanceState.FAILED, "put_failed"),
        (InstanceState.PLANNED, None),
    ]
    assert [(item.sop_uid is None, item.to_state) for item in detail.events] == [
        (True, "planned"),
        (True, "uploading"),
        (False, "uploaded"),
        (False, "failed"),
        (True, "failed"),
    ]
    as_json = json.loads(json.dumps(detail.to_dict()))
    assert as_json["instances"][1]["message"] == "PUT of study-2/1.dcm failed"
    assert as_json["created_at"] == detail.created_at.isoformat()
    assert mixed_run.study_detail(SITE, study_uid(404)) is None


def test_run_events_are_oldest_first_and_limited(mixed_run: Ledger) -> None:
    events = mixed_run.run_events(SITE, RUN)
    first_three = mixed_run.run_events(SITE, RUN, limit=3)

    assert first_three == events[:3]
    assert [item.at for item in events] == sorted(item.at for item in events)
    assert [item.reason for item in events].count("resend") == 1
    assert [item.reason for item in events].count("claim_taken_over") == 1
