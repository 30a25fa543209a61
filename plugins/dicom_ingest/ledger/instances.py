"""Recording what happened to many instances with a few statements, never a few per instance.

:func:`record_instance_outcomes` runs inside the caller's write transaction. It locks the
instances' studies, then the instances (each kind in UID order, as every ledger transaction
does), and writes one multi-row ``UPDATE`` of the instances, one multi-row ``INSERT`` of their
history and one ``UPDATE`` of the studies' heartbeats: the statement count does not grow with the
number of instances (beyond one per 1,000 UIDs in ``IN`` lists).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Row, bindparam, insert, update
from sqlalchemy.orm import Session

from dicom_ingest.ledger.errors import UnknownStudyError
from dicom_ingest.ledger.models import Event, Instance, InstanceState, Study, StudyState
from dicom_ingest.ledger.planning import batched, rows_by_uid

FINAL_INSTANCE_STATES = frozenset({InstanceState.METADATA_SENT, InstanceState.VERIFIED})
"""Instance states no upload outcome changes any more."""

_INSTANCE_ID = "instance_id"
"""Name of the bound row id in the multi-row ``UPDATE``."""


def record_instance_outcomes(
    session: Session,
    site_id: str,
    to_state: InstanceState,
    changes: Mapping[str, Mapping[str, Any]],
    now: datetime,
    *,
    repeat_is_no_op: bool,
) -> set[str]:
    """Move instances to ``to_state`` with new column values; return the SOP UIDs that changed.

    Each changed instance gets its new values, one more attempt, ``updated_at`` and one history
    row (whose reason is the instance's new ``reason``, if it gets one). An instance already past
    upload (``metadata_sent``, ``verified``) is left alone. Every study being uploaded that one of
    the instances belongs to has its claim renewed: a recorded instance is a sign of life.

    :param session: the open write transaction.
    :param site_id: the site.
    :param to_state: the instances' new state.
    :param changes: SOP UID → new column values (``key``, ``md5``, ``reason``, ...; the same
        columns for every instance), in the order the history rows are written.
    :param now: the time to stamp on the rows.
    :param repeat_is_no_op: whether an instance already in ``to_state`` with exactly these values
        stays as it is (recording the same upload twice counts it once); otherwise every call
        counts one more attempt.
    :raises UnknownStudyError: one of the instances was never planned for the site (nothing is written).
    """
    if not changes:
        return set()
    study_of = _study_uids_of(session, site_id, sorted(changes))
    unknown = [sop_uid for sop_uid in changes if sop_uid not in study_of]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise UnknownStudyError(f"instance {unknown[0]} was never planned for site {site_id!r}{more}")
    columns = list(next(iter(changes.values())))
    if any(list(values) != columns for values in changes.values()):
        raise ValueError("every instance must get values for the same columns")
    studies = _lock_studies(session, site_id, sorted(set(study_of.values())))
    current = _lock_instances(session, site_id, sorted(changes), columns)
    updates: list[dict[str, Any]] = []
    history: list[dict[str, Any]] = []
    for sop_uid, values in changes.items():
        row = current[sop_uid]
        if row.state in FINAL_INSTANCE_STATES or (
            repeat_is_no_op
            and row.state == to_state
            and all(getattr(row, column) == value for column, value in values.items())
        ):
            continue
        updates.append({_INSTANCE_ID: row.id, **values})
        history.append(
            {
                "site_id": site_id,
                "run_id": studies[row.study_uid].run_id,
                "study_uid": row.study_uid,
                "sop_uid": sop_uid,
                "from_state": row.state,
                "to_state": to_state,
                "reason": values.get("reason"),
                "at": now,
            }
        )
    _renew_claims(
        session,
        site_id,
        sorted(uid for uid, study in studies.items() if study.state == StudyState.UPLOADING),
        now,
    )
    if updates:
        instances = Instance.__table__
        session.execute(
            update(instances)
            .where(instances.c.id == bindparam(_INSTANCE_ID))
            .values(state=to_state, attempts=instances.c.attempts + 1, updated_at=now),
            updates,
        )
        session.execute(insert(Event.__table__), history)
    return {row["sop_uid"] for row in history}


def _study_uids_of(session: Session, site_id: str, sop_uids: Sequence[str]) -> dict[str, str]:
    """Return the study of each known instance among ``sop_uids`` (without locking anything)."""
    instances = Instance.__table__
    selected = [instances.c.sop_uid, instances.c.study_uid]
    found = rows_by_uid(session, selected, instances.c.sop_uid, site_id, sop_uids, lock=False)
    return {sop_uid: row.study_uid for sop_uid, row in found.items()}


def _lock_studies(session: Session, site_id: str, study_uids: Sequence[str]) -> dict[str, Row[Any]]:
    """Lock the studies in UID order and return their state and run by UID."""
    studies = Study.__table__
    selected = [studies.c.study_uid, studies.c.state, studies.c.run_id]
    return rows_by_uid(session, selected, studies.c.study_uid, site_id, study_uids, lock=True)


def _lock_instances(
    session: Session, site_id: str, sop_uids: Sequence[str], columns: Sequence[str]
) -> dict[str, Row[Any]]:
    """Lock the instances in UID order and return their id, study, state and ``columns`` by UID."""
    instances = Instance.__table__
    selected = [instances.c.id, instances.c.sop_uid, instances.c.study_uid, instances.c.state]
    selected.extend(instances.c[name] for name in columns)
    return rows_by_uid(session, selected, instances.c.sop_uid, site_id, sop_uids, lock=True)


def _renew_claims(session: Session, site_id: str, study_uids: Sequence[str], now: datetime) -> None:
    """Stamp a sign of life on the claims of the given studies (already locked)."""
    studies = Study.__table__
    for part in batched(study_uids):
        session.execute(
            update(studies)
            .where(studies.c.site_id == site_id, studies.c.study_uid.in_(part))
            .values(heartbeat_at=now)
        )
