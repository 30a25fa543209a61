"""Recording a plan with a few multi-row statements per chunk of studies, never one per instance.

Rows are written in UID order, so concurrent planners of overlapping studies lock them in the
same order on PostgreSQL and cannot deadlock.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Column, Row, case, func, insert, null, select, update
from sqlalchemy.orm import Session

from dicom_ingest.ledger.engine import dialect_insert
from dicom_ingest.ledger.models import Event, EventReason, Instance, InstanceState, Study, StudyState
from dicom_ingest.ledger.records import PlannedStudy, PlanResult

log = logging.getLogger(__name__)

_T = TypeVar("_T")

PLAN_CHUNK_INSTANCES = 5_000
"""Instances written per group of multi-row statements."""

IN_LIST_SIZE = 1_000
"""UIDs per ``IN (...)`` list."""

REPLAN_RESET_STATES = (StudyState.HELD, StudyState.FAILED)
"""Study states a new plan turns back into ``planned``."""


def batched(items: Sequence[_T], size: int = IN_LIST_SIZE) -> Iterator[Sequence[_T]]:
    """Yield consecutive slices of ``items`` of at most ``size`` elements.

    :param items: the sequence to cut.
    :param size: the largest slice.
    """
    for start in range(0, len(items), size):
        yield items[start : start + size]


def rows_by_uid(
    session: Session,
    columns: Sequence[Column[Any]],
    uid_column: Column[Any],
    site_id: str,
    uids: Sequence[str],
    *,
    lock: bool,
) -> dict[str, Row[Any]]:
    """Select a site's rows whose ``uid_column`` is among ``uids`` (bounded ``IN`` lists), by UID.

    :param session: the open transaction.
    :param columns: the columns to select (``uid_column`` among them), all of one table.
    :param uid_column: the UID column matched against ``uids``.
    :param site_id: the site (the table's ``site_id``).
    :param uids: the UIDs, in the order their rows are to be locked.
    :param lock: lock the rows (``FOR UPDATE``), in UID order within each list.
    """
    site_column = uid_column.table.c.site_id
    found: dict[str, Row[Any]] = {}
    for part in batched(uids):
        statement = select(*columns).where(site_column == site_id, uid_column.in_(part))
        if lock:
            statement = statement.order_by(uid_column).with_for_update()
        for row in session.execute(statement):
            found[getattr(row, uid_column.key)] = row
    return found


def plan_chunks(studies: Sequence[PlannedStudy], max_instances: int) -> Iterator[list[PlannedStudy]]:
    """Group whole studies into chunks of about ``max_instances`` instances.

    :param studies: the plan.
    :param max_instances: instances after which a chunk is closed.
    """
    chunk: list[PlannedStudy] = []
    instances = 0
    for study in studies:
        chunk.append(study)
        instances += max(len(study.instances), 1)
        if instances >= max_instances:
            yield chunk
            chunk, instances = [], 0
    if chunk:
        yield chunk


@dataclass(frozen=True, slots=True)
class PlanScope:
    """Where a plan belongs: a site, one of its runs and a batch of that run."""

    site_id: str
    run_id: str
    batch_id: str


def event_row(
    scope: PlanScope, study_uid: str, from_state: str | None, to_state: str, reason: str, at: datetime
) -> dict[str, Any]:
    """Build one study-level history row of a plan.

    :param scope: the plan's site and run.
    :param study_uid: the study.
    :param from_state: its state before the plan (``None`` if new).
    :param to_state: its state after the plan.
    :param reason: why.
    :param at: when.
    """
    return {
        "site_id": scope.site_id,
        "run_id": scope.run_id,
        "study_uid": study_uid,
        "sop_uid": None,
        "from_state": from_state,
        "to_state": to_state,
        "reason": reason,
        "at": at,
    }


def record_plan_chunk(
    session: Session, scope: PlanScope, chunk: list[PlannedStudy], now: datetime
) -> PlanResult:
    """Record one chunk of a plan inside the caller's transaction.

    :param session: the open write transaction.
    :param scope: the site, run and batch of the plan.
    :param chunk: whole studies with their instances.
    :param now: the time to stamp on the rows.
    """
    by_uid = {study.study_uid: study for study in chunk}
    uids = sorted(by_uid)
    new_uids = _insert_new_studies(session, scope, uids, now)
    prior_states = _lock_known_studies(session, scope.site_id, [uid for uid in uids if uid not in new_uids])
    done = sorted(uid for uid, state in prior_states.items() if state == StudyState.VERIFIED)
    replanned = sorted(uid for uid, state in prior_states.items() if state != StudyState.VERIFIED)
    _move_studies_to_plan(session, scope, replanned, now)
    to_plan = sorted(new_uids.union(replanned))
    instance_rows = _instance_rows(scope, by_uid, to_plan, now)
    _upsert_instances(session, instance_rows)
    _refresh_study_totals(session, scope.site_id, to_plan)
    events = [
        event_row(scope, uid, None, StudyState.PLANNED, EventReason.PLANNED, now) for uid in sorted(new_uids)
    ]
    for uid in replanned:
        state = prior_states[uid]
        after = StudyState.PLANNED if state in REPLAN_RESET_STATES else state
        events.append(event_row(scope, uid, state, after, EventReason.REPLANNED, now))
    events.extend(
        event_row(scope, uid, prior_states[uid], prior_states[uid], EventReason.ALREADY_DONE, now)
        for uid in done
    )
    if events:
        session.execute(insert(Event.__table__), events)
    log.info(
        "Planned %d studies (%d instances) for site %s, run %s, batch %s; %d already done",
        len(to_plan),
        len(instance_rows),
        scope.site_id,
        scope.run_id,
        scope.batch_id,
        len(done),
    )
    return PlanResult(
        studies_planned=len(to_plan),
        studies_already_done=len(done),
        instances_planned=len(instance_rows),
        bytes_planned=sum(row["size"] for row in instance_rows),
    )


def _insert_new_studies(session: Session, scope: PlanScope, uids: list[str], now: datetime) -> set[str]:
    """Insert the studies not known yet and return their UIDs."""
    studies = Study.__table__
    rows = [
        {
            "site_id": scope.site_id,
            "study_uid": uid,
            "state": StudyState.PLANNED,
            "attempts": 0,
            "resend_count": 0,
            "abandoned_order_ids": [],
            "run_id": scope.run_id,
            "batch_id": scope.batch_id,
            "instance_count": 0,
            "byte_count": 0,
            "created_at": now,
            "updated_at": now,
        }
        for uid in uids
    ]
    statement = (
        dialect_insert(session)(studies)
        .on_conflict_do_nothing(index_elements=["site_id", "study_uid"])
        .returning(studies.c.study_uid)
    )
    return set(session.scalars(statement, rows))


def _lock_known_studies(session: Session, site_id: str, uids: list[str]) -> dict[str, str]:
    """Lock the known studies (in UID order) and return their states."""
    studies = Study.__table__
    selected = [studies.c.study_uid, studies.c.state]
    locked = rows_by_uid(session, selected, studies.c.study_uid, site_id, uids, lock=True)
    return {uid: row.state for uid, row in locked.items()}


def _move_studies_to_plan(session: Session, scope: PlanScope, uids: list[str], now: datetime) -> None:
    """Move known, unfinished studies to this run and batch; held and failed ones become planned."""
    studies = Study.__table__
    reset = studies.c.state.in_(REPLAN_RESET_STATES)
    for part in batched(uids):
        session.execute(
            update(studies)
            .where(studies.c.site_id == scope.site_id, studies.c.study_uid.in_(part))
            .values(
                run_id=scope.run_id,
                batch_id=scope.batch_id,
                updated_at=now,
                state=case((reset, StudyState.PLANNED), else_=studies.c.state),
                reason=case((reset, null()), else_=studies.c.reason),
            )
        )


def _instance_rows(
    scope: PlanScope, by_uid: dict[str, PlannedStudy], study_uids: list[str], now: datetime
) -> list[dict[str, Any]]:
    """Build rows for the instances of ``study_uids``, one per SOP UID, in SOP UID order."""
    rows: dict[str, dict[str, Any]] = {}
    for study_uid in study_uids:
        for instance in by_uid[study_uid].instances:
            rows[instance.sop_uid] = {
                "site_id": scope.site_id,
                "study_uid": study_uid,
                "sop_uid": instance.sop_uid,
                "series_uid": instance.series_uid,
                "path": instance.path,
                "size": instance.size,
                "state": InstanceState.PLANNED,
                "attempts": 0,
                "run_id": scope.run_id,
                "batch_id": scope.batch_id,
                "created_at": now,
                "updated_at": now,
            }
    return [rows[sop_uid] for sop_uid in sorted(rows)]


def _upsert_instances(session: Session, rows: list[dict[str, Any]]) -> None:
    """Insert new instances; known ones take the planned path and size (planned again if resized)."""
    if not rows:
        return
    instances = Instance.__table__
    upsert = dialect_insert(session)(instances)
    resized = instances.c.size != upsert.excluded.size
    upsert = upsert.on_conflict_do_update(
        index_elements=["site_id", "sop_uid"],
        set_={
            "path": upsert.excluded.path,
            "series_uid": upsert.excluded.series_uid,
            "size": upsert.excluded.size,
            "run_id": upsert.excluded.run_id,
            "batch_id": upsert.excluded.batch_id,
            "updated_at": upsert.excluded.updated_at,
            "state": case((resized, InstanceState.PLANNED), else_=instances.c.state),
        },
    )
    session.execute(upsert, rows)


def _refresh_study_totals(session: Session, site_id: str, study_uids: list[str]) -> None:
    """Recount the instances and bytes of the given studies from their instance rows."""
    studies, instances = Study.__table__, Instance.__table__
    of_study = (
        instances.c.site_id == studies.c.site_id,
        instances.c.study_uid == studies.c.study_uid,
        instances.c.sop_uid.is_not(None),
    )
    count = select(func.count(instances.c.id)).where(*of_study).scalar_subquery()
    size = select(func.coalesce(func.sum(instances.c.size), 0)).where(*of_study).scalar_subquery()
    for part in batched(study_uids):
        session.execute(
            update(studies)
            .where(studies.c.site_id == site_id, studies.c.study_uid.in_(part))
            .values(instance_count=count, byte_count=size)
        )
