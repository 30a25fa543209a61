"""Recording many uploaded instances at once: the single call's rules, one transaction, few statements."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from dicom_ingest.ledger import (
    ClaimAction,
    InstanceState,
    InstanceUpload,
    Ledger,
    PlannedStudy,
    StudyState,
    UnknownStudyError,
)
from tests.ledger.conftest import LEASE
from tests.ledger.support import BATCH, RUN, SITE, FakeClock, planned_study, sop_uids, watching

OTHER_SITE = "lyon"
OWNER = "worker-a:101"
OTHER_OWNER = "worker-b:202"
MD5 = "9e107d9d372bb6826bd81d3542a419d6"


def uploads_of(*studies: PlannedStudy) -> list[InstanceUpload]:
    """Return an upload record for every instance of ``studies``."""
    return [InstanceUpload(sop, f"incoming/{sop}", MD5, MD5) for study in studies for sop in sop_uids(study)]


def plan_and_claim(ledger: Ledger, site_id: str, studies: list[PlannedStudy]) -> None:
    """Plan ``studies`` for ``site_id`` and claim each for upload."""
    ledger.record_plan(site_id, RUN, BATCH, studies)
    for study in studies:
        ledger.claim_study(site_id, study.study_uid, RUN, BATCH, owner=OWNER)


def recorded(ledger: Ledger, site_id: str, studies: list[PlannedStudy]) -> list[tuple[Any, ...]]:
    """Return the instance rows and instance history of ``studies``, without ids or site."""
    rows: list[tuple[Any, ...]] = []
    for study in studies:
        detail = ledger.study_detail(site_id, study.study_uid)
        assert detail is not None
        rows.append((detail.study_uid, detail.state, detail.claim_owner))
        rows.extend(
            (item.sop_uid, item.state, item.key, item.md5, item.etag, item.reason, item.attempts)
            for item in detail.instances
        )
        rows.extend(
            (item.sop_uid, item.run_id, item.from_state, item.to_state, item.reason, item.at)
            for item in detail.events
            if item.sop_uid is not None
        )
    return rows


def test_a_batch_records_exactly_what_single_calls_record(ledger: Ledger) -> None:
    studies = [planned_study(1, instances=3), planned_study(2, instances=4)]
    plan_and_claim(ledger, SITE, studies)
    plan_and_claim(ledger, OTHER_SITE, studies)
    # Out of study order on purpose: the history follows the order of the uploads.
    uploads = uploads_of(*studies)
    uploads = uploads[3:5] + uploads[:3] + uploads[5:]

    changed = ledger.mark_instances_uploaded(SITE, uploads)
    for upload in uploads:
        assert ledger.mark_instance_uploaded(OTHER_SITE, upload.sop_uid, upload.key, upload.md5, upload.etag)

    assert changed == {upload.sop_uid for upload in uploads}
    assert recorded(ledger, SITE, studies) == recorded(ledger, OTHER_SITE, studies)
    first = ledger.study_detail(SITE, studies[1].study_uid)
    assert first is not None
    history = [item.sop_uid for item in first.events if item.sop_uid is not None]
    assert history == [upload.sop_uid for upload in uploads if upload.sop_uid in sop_uids(studies[1])]
    assert {(item.state, item.attempts) for item in first.instances} == {(InstanceState.UPLOADED, 1)}


def test_recording_a_batch_again_changes_only_what_differs(ledger: Ledger) -> None:
    study = planned_study(1, instances=4)
    plan_and_claim(ledger, SITE, [study])
    uploads = uploads_of(study)
    ledger.mark_instances_uploaded(SITE, uploads)
    before = recorded(ledger, SITE, [study])

    assert ledger.mark_instances_uploaded(SITE, uploads) == set()
    assert recorded(ledger, SITE, [study]) == before

    resent = replace(uploads[2], key="incoming/again", md5="f" * 32, etag="f" * 32)
    assert ledger.mark_instances_uploaded(SITE, [uploads[0], resent, uploads[3]]) == {resent.sop_uid}
    detail = ledger.study_detail(SITE, study.study_uid)
    assert detail is not None
    by_uid = {item.sop_uid: item for item in detail.instances}
    assert (by_uid[resent.sop_uid].key, by_uid[resent.sop_uid].attempts) == ("incoming/again", 2)
    assert [by_uid[upload.sop_uid].attempts for upload in (uploads[0], uploads[1], uploads[3])] == [1, 1, 1]
    assert [item.sop_uid for item in detail.events].count(resent.sop_uid) == 2


def test_instances_past_upload_are_left_alone_in_a_batch(ledger: Ledger) -> None:
    sent, fresh = planned_study(1, instances=2), planned_study(2, instances=2)
    plan_and_claim(ledger, SITE, [sent, fresh])
    ledger.mark_instances_uploaded(SITE, uploads_of(sent))
    ledger.mark_study_uploaded(SITE, sent.study_uid)
    ledger.mark_metadata_sent(SITE, sent.study_uid, "order-1")

    late = [replace(upload, key="incoming/late") for upload in uploads_of(sent)]
    changed = ledger.mark_instances_uploaded(SITE, late + uploads_of(fresh))

    assert changed == set(sop_uids(fresh))
    detail = ledger.study_detail(SITE, sent.study_uid)
    assert detail is not None
    assert {(item.state, item.key) for item in detail.instances} == {
        (InstanceState.METADATA_SENT, f"incoming/{sop}") for sop in sop_uids(sent)
    }


def test_one_unknown_instance_refuses_the_whole_batch(ledger: Ledger) -> None:
    study = planned_study(1, instances=3)
    plan_and_claim(ledger, SITE, [study])
    before = recorded(ledger, SITE, [study])
    stranger = InstanceUpload("9.9.9.9", "incoming/9", MD5, MD5)

    with pytest.raises(UnknownStudyError, match=r"9\.9\.9\.9 was never planned"):
        ledger.mark_instances_uploaded(SITE, [*uploads_of(study), stranger])

    assert recorded(ledger, SITE, [study]) == before


def test_a_batch_renews_the_claims_of_its_studies(ledger: Ledger, clock: FakeClock) -> None:
    studies = [planned_study(1, instances=2), planned_study(2, instances=2)]
    plan_and_claim(ledger, SITE, studies)
    clock.advance(LEASE - timedelta(seconds=10))
    ledger.mark_instances_uploaded(SITE, uploads_of(*studies)[1:3])
    clock.advance(timedelta(seconds=30))

    answers = [ledger.claim_study(SITE, study.study_uid, RUN, BATCH, owner=OTHER_OWNER) for study in studies]

    assert [answer.action for answer in answers] == [ClaimAction.BUSY, ClaimAction.BUSY]


@pytest.mark.parametrize("instances", [10, 120])
def test_a_batch_is_one_transaction_of_a_few_statements(ledger: Ledger, instances: int) -> None:
    studies = [planned_study(number, instances=instances // 2) for number in (1, 2)]
    plan_and_claim(ledger, SITE, studies)

    with watching(ledger) as activity:
        changed = ledger.mark_instances_uploaded(SITE, uploads_of(*studies))

    assert len(changed) == instances
    # Map instances to studies, lock studies, lock instances, renew claims, update, history.
    assert (activity.transactions, activity.statements) == (1, 6)
    for study in studies:
        detail = ledger.study_detail(SITE, study.study_uid)
        assert detail is not None
        assert detail.state == StudyState.UPLOADING
        assert {item.state for item in detail.instances} == {InstanceState.UPLOADED}


def test_an_empty_batch_does_not_touch_the_database(ledger: Ledger) -> None:
    ledger.done_studies(SITE, [])

    with watching(ledger) as activity:
        assert ledger.mark_instances_uploaded(SITE, []) == set()

    assert (activity.transactions, activity.statements) == (0, 0)
