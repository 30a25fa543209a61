"""Plans, a controllable clock, database set-up and activity counting shared by the ledger tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import event

from dicom_ingest.ledger import Ledger, PlannedInstance, PlannedStudy

SITE = "paris"
RUN = "scheduled__2026-11-01T00:00:00+00:00"
BATCH = "batch-0000"
INSTANCE_SIZE = 1_000


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, start: datetime = datetime(2026, 11, 1, 2, 0, tzinfo=UTC)) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        """Move the clock forward by ``delta``."""
        self.now += delta


def study_uid(number: int) -> str:
    """Return a UID for the study numbered ``number``."""
    return f"1.2.826.0.1.3680043.8.498.{number}"


def sop_uid(study_number: int, instance_number: int) -> str:
    """Return a UID for an instance of the study numbered ``study_number``."""
    return f"{study_uid(study_number)}.1.{instance_number}"


def planned_study(number: int, instances: int = 3, size: int = INSTANCE_SIZE) -> PlannedStudy:
    """Build a planned study of ``instances`` instances of ``size`` bytes each in one series."""
    return PlannedStudy(
        study_uid=study_uid(number),
        instances=[
            PlannedInstance(
                sop_uid=sop_uid(number, index),
                series_uid=f"{study_uid(number)}.1",
                path=f"/staging/{SITE}/study-{number}/{index}.dcm",
                size=size,
            )
            for index in range(instances)
        ],
    )


def sop_uids(study: PlannedStudy) -> list[str]:
    """Return the SOP UIDs of a planned study."""
    return [instance.sop_uid for instance in study.instances]


@dataclass
class DatabaseActivity:
    """Transactions begun and statements sent to the database while it was watched."""

    transactions: int = 0
    statements: int = 0


@contextmanager
def watching(ledger: Ledger) -> Iterator[DatabaseActivity]:
    """Count the ledger's transactions and their statements (a multi-row statement counts once).

    :param ledger: the ledger to watch.
    """
    activity = DatabaseActivity()

    def on_begin(*_: object) -> None:
        activity.transactions += 1

    def on_statement(_connection: object, _cursor: object, statement: str, *_: object) -> None:
        if not statement.startswith("BEGIN"):  # SQLite's BEGIN IMMEDIATE is the transaction itself
            activity.statements += 1

    event.listen(ledger.engine, "begin", on_begin)
    event.listen(ledger.engine, "before_cursor_execute", on_statement)
    try:
        yield activity
    finally:
        event.remove(ledger.engine, "begin", on_begin)
        event.remove(ledger.engine, "before_cursor_execute", on_statement)
