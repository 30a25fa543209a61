"""Read-only queries of the ledger for planning, the run report, the sensor and a UI page.

Each function runs inside the caller's transaction and returns plain records: UIDs, states,
reasons, counts and times, never file contents or tag values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from dicom_ingest.ledger.models import (
    INSTANCE_SENT_STATES,
    Event,
    EventReason,
    Instance,
    InstanceState,
    Study,
    StudyState,
)
from dicom_ingest.ledger.planning import batched
from dicom_ingest.ledger.records import (
    BatchStudy,
    EventRecord,
    InstanceRecord,
    ReasonCount,
    RunSummary,
    SiteSummary,
    StudyDetail,
)


def verified_study_uids(session: Session, site_id: str, study_uids: Sequence[str]) -> set[str]:
    """Return which of ``study_uids`` are verified.

    :param session: the open transaction.
    :param site_id: the site.
    :param study_uids: candidate studies.
    """
    done: set[str] = set()
    for part in batched(study_uids):
        done.update(
            session.scalars(
                select(Study.study_uid).where(
                    Study.site_id == site_id,
                    Study.study_uid.in_(part),
                    Study.state == StudyState.VERIFIED,
                )
            )
        )
    return done


def run_summary(session: Session, site_id: str, run_id: str) -> RunSummary:
    """Count a run's studies and instances per state and reason, with bytes planned and sent.

    :param session: the open transaction.
    :param site_id: the site.
    :param run_id: the run.
    """
    already_done = session.scalar(
        select(func.count(func.distinct(Event.study_uid))).where(
            Event.site_id == site_id,
            Event.run_id == run_id,
            Event.reason == EventReason.ALREADY_DONE,
        )
    )
    return RunSummary(
        site_id=site_id,
        run_id=run_id,
        studies_already_done=already_done or 0,
        **_totals(session, site_id, run_id),
    )


def site_summary(session: Session, site_id: str) -> SiteSummary:
    """Count a site's studies and instances over every run.

    :param session: the open transaction.
    :param site_id: the site.
    """
    totals = _totals(session, site_id, None)
    runs, last_activity = session.execute(
        select(func.count(func.distinct(Event.run_id)), func.max(Event.at)).where(Event.site_id == site_id)
    ).one()
    return SiteSummary(
        site_id=site_id,
        bytes_total=totals.pop("bytes_planned"),
        runs=runs,
        last_activity_at=last_activity,
        **totals,
    )


def _scope(model: type[Study] | type[Instance] | type[Event], site_id: str, run_id: str | None) -> list[Any]:
    """Build the criteria selecting a site's rows, or one run's."""
    criteria: list[ColumnElement[bool]] = [model.site_id == site_id]
    if run_id is not None:
        criteria.append(model.run_id == run_id)
    return criteria


def _totals(session: Session, site_id: str, run_id: str | None) -> dict[str, Any]:
    """Count studies and instances of a site (or of one of its runs) per state, with bytes."""
    studies_by_state = dict(
        session.execute(
            select(Study.state, func.count()).where(*_scope(Study, site_id, run_id)).group_by(Study.state)
        ).all()
    )
    instances_by_state: dict[str, int] = {}
    bytes_by_state: dict[str, int] = {}
    for state, count, size in session.execute(
        select(Instance.state, func.count(), func.coalesce(func.sum(Instance.size), 0))
        .where(*_scope(Instance, site_id, run_id))
        .group_by(Instance.state)
    ):
        instances_by_state[state] = count
        bytes_by_state[state] = int(size)
    resends = session.scalar(
        select(func.coalesce(func.sum(Study.resend_count), 0)).where(*_scope(Study, site_id, run_id))
    )
    abandoned = session.scalar(
        select(func.count()).where(
            *_scope(Event, site_id, run_id), Event.reason == EventReason.ORDER_ABANDONED
        )
    )
    return {
        "studies": sum(studies_by_state.values()),
        "instances": sum(instances_by_state.values()),
        "bytes_planned": sum(
            size for state, size in bytes_by_state.items() if state != InstanceState.QUARANTINED
        ),
        "bytes_uploaded": sum(bytes_by_state.get(state, 0) for state in INSTANCE_SENT_STATES),
        "studies_by_state": studies_by_state,
        "instances_by_state": instances_by_state,
        "reasons": reason_counts(session, site_id, run_id),
        "resends": int(resends or 0),
        "abandoned_orders": abandoned or 0,
    }


def reason_counts(session: Session, site_id: str, run_id: str | None) -> list[ReasonCount]:
    """Count studies and instances carrying a reason, per level, state and reason, most frequent first.

    :param session: the open transaction.
    :param site_id: the site.
    :param run_id: only this run (all runs if ``None``).
    """
    counts: list[ReasonCount] = []
    for level, model in (("study", Study), ("instance", Instance)):
        query = (
            select(model.state, model.reason, func.count())
            .where(*_scope(model, site_id, run_id), model.reason.is_not(None))
            .group_by(model.state, model.reason)
        )
        counts.extend(
            ReasonCount(level=level, state=state, reason=reason, count=count)
            for state, reason, count in session.execute(query)
        )
    return sorted(counts, key=lambda item: (-item.count, item.level, item.state, item.reason))


def study_detail(session: Session, site_id: str, study_uid: str) -> StudyDetail | None:
    """Return a study with its instances and its history, or ``None`` if it is unknown.

    :param session: the open transaction.
    :param site_id: the site.
    :param study_uid: the study.
    """
    study = session.scalars(
        select(Study).where(Study.site_id == site_id, Study.study_uid == study_uid)
    ).one_or_none()
    if study is None:
        return None
    instances = session.scalars(
        select(Instance)
        .where(Instance.site_id == site_id, Instance.study_uid == study_uid)
        .order_by(Instance.series_uid, Instance.sop_uid, Instance.path)
    )
    events = session.scalars(
        select(Event).where(Event.site_id == site_id, Event.study_uid == study_uid).order_by(Event.id)
    )
    return StudyDetail(
        site_id=study.site_id,
        study_uid=study.study_uid,
        state=study.state,
        reason=study.reason,
        order_id=study.order_id,
        order_status=study.order_status,
        abandoned_order_ids=list(study.abandoned_order_ids),
        attempts=study.attempts,
        resend_count=study.resend_count,
        run_id=study.run_id,
        batch_id=study.batch_id,
        instance_count=study.instance_count,
        byte_count=study.byte_count,
        claim_owner=study.claim_owner,
        claimed_at=study.claimed_at,
        uploaded_at=study.uploaded_at,
        verified_at=study.verified_at,
        created_at=study.created_at,
        updated_at=study.updated_at,
        instances=[_instance_record(instance) for instance in instances],
        events=[_event_record(item) for item in events],
    )


def studies_in_batch(session: Session, site_id: str, run_id: str, batch_id: str) -> list[BatchStudy]:
    """List the studies of one batch of a run with their orders, in UID order.

    :param session: the open transaction.
    :param site_id: the site.
    :param run_id: the run.
    :param batch_id: the batch.
    """
    return [
        BatchStudy(
            study_uid=study.study_uid,
            state=study.state,
            reason=study.reason,
            order_id=study.order_id,
            order_status=study.order_status,
            abandoned_order_ids=list(study.abandoned_order_ids),
            instance_count=study.instance_count,
            byte_count=study.byte_count,
            resend_count=study.resend_count,
        )
        for study in session.scalars(
            select(Study)
            .where(Study.site_id == site_id, Study.run_id == run_id, Study.batch_id == batch_id)
            .order_by(Study.study_uid)
        )
    ]


def run_events(session: Session, site_id: str, run_id: str, limit: int | None) -> list[EventRecord]:
    """Return a run's history, oldest first.

    :param session: the open transaction.
    :param site_id: the site.
    :param run_id: the run.
    :param limit: at most this many events (all if ``None``).
    """
    query = (
        select(Event).where(Event.site_id == site_id, Event.run_id == run_id).order_by(Event.id).limit(limit)
    )
    return [_event_record(item) for item in session.scalars(query)]


def _instance_record(instance: Instance) -> InstanceRecord:
    return InstanceRecord(
        sop_uid=instance.sop_uid,
        series_uid=instance.series_uid,
        path=instance.path,
        size=instance.size,
        state=instance.state,
        key=instance.key,
        md5=instance.md5,
        etag=instance.etag,
        reason=instance.reason,
        message=instance.message,
        attempts=instance.attempts,
        updated_at=instance.updated_at,
    )


def _event_record(item: Event) -> EventRecord:
    return EventRecord(
        at=item.at,
        run_id=item.run_id,
        study_uid=item.study_uid,
        sop_uid=item.sop_uid,
        from_state=item.from_state,
        to_state=item.to_state,
        reason=item.reason,
    )
