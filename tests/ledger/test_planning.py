"""Recording plans: new studies, idempotent re-plans, verified studies left alone, batched writes."""

from __future__ import annotations

import dataclasses

from sqlalchemy import event

from dicom_ingest.ledger import (
    ClaimAction,
    InstanceState,
    Ledger,
    PlannedInstance,
    PlannedStudy,
    PlanResult,
    StudyState,
)
from tests.ledger.support import (
    BATCH,
    INSTANCE_SIZE,
    RUN,
    SITE,
    planned_study,
    sop_uids,
    study_uid,
)

NEXT_RUN = "scheduled__2026-11-02T00:00:00+00:00"


def verify(ledger: Ledger, study: PlannedStudy, order_id: str = "order-1") -> None:
    """Take a planned study through upload and metadata to ``verified``."""
    claim = ledger.claim_study(SITE, study.study_uid, RUN, BATCH)
    assert claim.action == ClaimAction.UPLOAD_ALL
    for sop in sop_uids(study):
        ledger.mark_instance_uploaded(SITE, sop, f"key/{sop}", "0" * 32, "0" * 32)
    ledger.mark_study_uploaded(SITE, study.study_uid, token=claim.token)
    ledger.mark_metadata_sent(SITE, study.study_uid, order_id)
    ledger.mark_verified(SITE, study.study_uid, order_id, "DELIVERED")


def test_record_plan_inserts_studies_and_instances_as_planned(ledger: Ledger) -> None:
    result = ledger.record_plan(SITE, RUN, BATCH, [planned_study(1), planned_study(2, instances=2)])

    assert result == PlanResult(
        studies_planned=2, studies_already_done=0, instances_planned=5, bytes_planned=5 * INSTANCE_SIZE
    )
    detail = ledger.study_detail(SITE, study_uid(1))
    assert detail is not None
    assert (detail.state, detail.run_id, detail.batch_id) == (StudyState.PLANNED, RUN, BATCH)
    assert (detail.instance_count, detail.byte_count) == (3, 3 * INSTANCE_SIZE)
    assert [instance.sop_uid for instance in detail.instances] == sop_uids(planned_study(1))
    assert {instance.state for instance in detail.instances} == {InstanceState.PLANNED}
    assert [(item.from_state, item.to_state, item.reason) for item in detail.events] == [
        (None, "planned", "planned")
    ]


def test_replanning_the_same_plan_changes_nothing(ledger: Ledger) -> None:
    plan = [planned_study(1), planned_study(2)]
    ledger.record_plan(SITE, RUN, BATCH, plan)

    again = ledger.record_plan(SITE, RUN, BATCH, plan)

    assert (again.studies_planned, again.instances_planned) == (2, 6)
    summary = ledger.site_summary(SITE)
    assert (summary.studies, summary.instances) == (2, 6)
    assert summary.studies_by_state == {StudyState.PLANNED: 2}
    detail = ledger.study_detail(SITE, study_uid(1))
    assert detail is not None
    assert detail.instance_count == 3


def test_replanning_verified_studies_plans_nothing(ledger: Ledger) -> None:
    first, second = planned_study(1), planned_study(2)
    ledger.record_plan(SITE, RUN, BATCH, [first, second])
    verify(ledger, first)
    verify(ledger, second, order_id="order-2")

    result = ledger.record_plan(SITE, NEXT_RUN, BATCH, [first, second])

    assert result == PlanResult(studies_already_done=2)
    assert ledger.studies_in_batch(SITE, NEXT_RUN, BATCH) == []
    detail = ledger.study_detail(SITE, first.study_uid)
    assert detail is not None
    assert (detail.state, detail.run_id, detail.order_id) == (StudyState.VERIFIED, RUN, "order-1")
    assert {instance.state for instance in detail.instances} == {InstanceState.VERIFIED}
    next_run = ledger.run_summary(SITE, NEXT_RUN)
    assert (next_run.studies, next_run.instances, next_run.studies_already_done) == (0, 0, 2)


def test_done_studies_lists_only_verified_studies(ledger: Ledger) -> None:
    verified, planned = planned_study(1), planned_study(2)
    ledger.record_plan(SITE, RUN, BATCH, [verified, planned])
    verify(ledger, verified)

    done = ledger.done_studies(SITE, [verified.study_uid, planned.study_uid, study_uid(99)])

    assert done == {verified.study_uid}
    assert ledger.is_study_done(SITE, verified.study_uid)
    assert not ledger.is_study_done(SITE, planned.study_uid)
    assert not ledger.is_study_done("lyon", verified.study_uid)


def test_replanning_mixes_done_and_new_studies(ledger: Ledger) -> None:
    done = planned_study(1)
    ledger.record_plan(SITE, RUN, BATCH, [done])
    verify(ledger, done)

    result = ledger.record_plan(SITE, NEXT_RUN, "batch-0001", [done, planned_study(2, instances=4)])

    assert (result.studies_planned, result.studies_already_done, result.instances_planned) == (1, 1, 4)
    batch = ledger.studies_in_batch(SITE, NEXT_RUN, "batch-0001")
    assert [(item.study_uid, item.state) for item in batch] == [(study_uid(2), StudyState.PLANNED)]


def test_replanning_makes_held_and_failed_studies_planned_again(ledger: Ledger) -> None:
    held, failed = planned_study(1), planned_study(2)
    ledger.record_plan(SITE, RUN, BATCH, [held, failed])
    ledger.hold_study(SITE, held.study_uid, RUN, "metadata_missing")
    ledger.mark_study_failed(SITE, failed.study_uid, "upload_failed")

    ledger.record_plan(SITE, NEXT_RUN, BATCH, [held, failed])

    for study, previous_state in ((held, StudyState.HELD), (failed, StudyState.FAILED)):
        detail = ledger.study_detail(SITE, study.study_uid)
        assert detail is not None
        assert (detail.state, detail.reason, detail.run_id) == (StudyState.PLANNED, None, NEXT_RUN)
        last = detail.events[-1]
        assert (last.run_id, last.from_state, last.to_state, last.reason) == (
            NEXT_RUN,
            previous_state,
            StudyState.PLANNED,
            "replanned",
        )
    assert ledger.reasons(SITE, NEXT_RUN) == []


def test_replanning_adds_late_instances_and_recounts_the_study(ledger: Ledger) -> None:
    ledger.record_plan(SITE, RUN, BATCH, [planned_study(1, instances=2)])

    ledger.record_plan(SITE, NEXT_RUN, BATCH, [planned_study(1, instances=3, size=2 * INSTANCE_SIZE)])

    detail = ledger.study_detail(SITE, study_uid(1))
    assert detail is not None
    assert (detail.instance_count, detail.byte_count) == (3, 6 * INSTANCE_SIZE)


def test_replanning_an_instance_with_a_new_size_plans_it_again(ledger: Ledger) -> None:
    study = planned_study(1, instances=2)
    ledger.record_plan(SITE, RUN, BATCH, [study])
    ledger.claim_study(SITE, study.study_uid, RUN, BATCH)
    for sop in sop_uids(study):
        ledger.mark_instance_uploaded(SITE, sop, f"key/{sop}", "0" * 32, "0" * 32)
    changed = study.instances[0]
    resized = dataclasses.replace(changed, size=changed.size + 1, path="/staging/moved.dcm")

    ledger.record_plan(SITE, RUN, BATCH, [PlannedStudy(study.study_uid, [resized, study.instances[1]])])

    detail = ledger.study_detail(SITE, study.study_uid)
    assert detail is not None
    states = {item.sop_uid: (item.state, item.path) for item in detail.instances}
    assert states[changed.sop_uid] == (InstanceState.PLANNED, "/staging/moved.dcm")
    assert states[study.instances[1].sop_uid] == (InstanceState.UPLOADED, study.instances[1].path)


def test_a_plan_listing_an_instance_twice_keeps_it_once(ledger: Ledger) -> None:
    instance = PlannedInstance(sop_uid="1.2.3.4", path="/staging/a.dcm", size=10)
    duplicate = dataclasses.replace(instance, path="/staging/b.dcm")

    result = ledger.record_plan(SITE, RUN, BATCH, [PlannedStudy("1.2.3", [instance, duplicate])])

    assert result.instances_planned == 1
    detail = ledger.study_detail(SITE, "1.2.3")
    assert detail is not None
    assert [(item.sop_uid, item.path) for item in detail.instances] == [("1.2.3.4", "/staging/b.dcm")]


def test_record_plan_of_ten_thousand_instances_takes_a_few_statements(ledger: Ledger) -> None:
    plan = [planned_study(number, instances=10) for number in range(1_000)]
    ledger.done_studies(SITE, [])  # creates the tables, so only the plan's statements are counted
    statements: list[str] = []

    def count(_connection: object, _cursor: object, statement: str, *_args: object) -> None:
        statements.append(statement)

    event.listen(ledger.engine, "before_cursor_execute", count)
    try:
        result = ledger.record_plan(SITE, RUN, BATCH, plan)
    finally:
        event.remove(ledger.engine, "before_cursor_execute", count)

    assert result.instances_planned == 10_000
    assert ledger.site_summary(SITE).instances == 10_000
    assert len(statements) < 50, f"{len(statements)} statements for 10,000 instances"
