"""Plans, a controllable clock and database set-up shared by the ledger tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from dicom_ingest.ledger import PlannedInstance, PlannedStudy

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
