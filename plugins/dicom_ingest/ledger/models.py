"""SQLAlchemy models of the ledger: instances, studies and the append-only event history.

The tables live in their own :class:`~sqlalchemy.MetaData` (never Airflow's) and are created with
``create_all`` the first time a :class:`~dicom_ingest.ledger.Ledger` is used. There are no
migrations yet: a change to these models needs a migration story (Alembic) before release.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

TABLE_PREFIX = "dicom_ingest_"

UID_LENGTH = 64
"""DICOM UIDs are at most 64 characters."""

_NAME_LENGTH = 250
_REASON_LENGTH = 64
_STATE_LENGTH = 16

_IdColumn = BigInteger().with_variant(Integer(), "sqlite")
"""64-bit ids on PostgreSQL; SQLite only auto-increments an ``INTEGER PRIMARY KEY``."""


class InstanceState(enum.StrEnum):
    """Where one staged file stands."""

    PLANNED = "planned"
    UPLOADED = "uploaded"
    METADATA_SENT = "metadata_sent"
    VERIFIED = "verified"
    FAILED = "failed"
    QUARANTINED = "quarantined"


class StudyState(enum.StrEnum):
    """Where one study stands."""

    PLANNED = "planned"
    UPLOADING = "uploading"
    UPLOADED = "uploaded"
    METADATA_SENT = "metadata_sent"
    VERIFIED = "verified"
    FAILED = "failed"
    HELD = "held"


class EventReason(enum.StrEnum):
    """Reasons the ledger itself writes into the history (callers add their own failure reasons)."""

    PLANNED = "planned"
    REPLANNED = "replanned"
    ALREADY_DONE = "already_done"
    CLAIMED = "claimed"
    CLAIM_TAKEN_OVER = "claim_taken_over"
    RESEND = "resend"
    RESUME_METADATA = "resume_metadata"
    STUDY_UPLOADED = "study_uploaded"
    METADATA_SENT = "metadata_sent"
    VERIFIED = "verified"
    ORDER_ABANDONED = "order_abandoned"


INSTANCE_SENT_STATES = (InstanceState.UPLOADED, InstanceState.METADATA_SENT, InstanceState.VERIFIED)
"""Instance states whose bytes reached the vendor's store."""


class UtcDateTime(TypeDecorator[datetime]):
    """Store timezone-aware datetimes as UTC and always read them back as aware UTC values.

    SQLite keeps no time zone, so values are stored there as naive UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert an aware datetime to UTC (naive on SQLite) before it is stored.

        :param value: the datetime to store; naive values are refused.
        :param dialect: the database dialect in use.
        """
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("the ledger stores timezone-aware datetimes only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Return the stored value as an aware UTC datetime.

        :param value: the value read from the database.
        :param dialect: the database dialect in use.
        """
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class LedgerBase(DeclarativeBase):
    """Declarative base bound to the ledger's own metadata."""

    metadata = MetaData()
    type_annotation_map: dict[Any, Any] = {datetime: UtcDateTime}


class Instance(LedgerBase):
    """One staged file: a valid instance (keyed by SOP Instance UID) or a quarantined file.

    Quarantined files are keyed by their path and carry no SOP Instance UID, because a file may be
    quarantined exactly because its UID is missing or collides with another file's.
    """

    __tablename__ = f"{TABLE_PREFIX}instances"
    __table_args__ = (
        UniqueConstraint("site_id", "sop_uid", name=f"uq_{TABLE_PREFIX}instances_sop"),
        Index(f"ix_{TABLE_PREFIX}instances_study", "site_id", "study_uid"),
        Index(f"ix_{TABLE_PREFIX}instances_run", "site_id", "run_id", "state"),
    )

    id: Mapped[int] = mapped_column(_IdColumn, primary_key=True, autoincrement=True)
    site_id: Mapped[str] = mapped_column(String(_NAME_LENGTH))
    study_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    sop_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    series_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    state: Mapped[str] = mapped_column(String(_STATE_LENGTH))
    key: Mapped[str | None] = mapped_column(Text)
    md5: Mapped[str | None] = mapped_column(String(32))
    etag: Mapped[str | None] = mapped_column(String(_NAME_LENGTH))
    order_id: Mapped[str | None] = mapped_column(String(_NAME_LENGTH))
    reason: Mapped[str | None] = mapped_column(String(_REASON_LENGTH))
    message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    run_id: Mapped[str | None] = mapped_column(String(_NAME_LENGTH))
    batch_id: Mapped[str | None] = mapped_column(String(_NAME_LENGTH))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


QUARANTINED_PATH_WHERE = Instance.sop_uid.is_(None)
"""Predicate of the partial unique index that keys quarantined files by path."""

Index(
    f"uq_{TABLE_PREFIX}instances_quarantined_path",
    Instance.site_id,
    Instance.path,
    unique=True,
    sqlite_where=QUARANTINED_PATH_WHERE,
    postgresql_where=QUARANTINED_PATH_WHERE,
)


class Study(LedgerBase):
    """One study of a site, with its vendor order and the claim of the worker uploading it."""

    __tablename__ = f"{TABLE_PREFIX}studies"
    __table_args__ = (
        UniqueConstraint("site_id", "study_uid", name=f"uq_{TABLE_PREFIX}studies_study"),
        Index(f"ix_{TABLE_PREFIX}studies_batch", "site_id", "run_id", "batch_id"),
    )

    id: Mapped[int] = mapped_column(_IdColumn, primary_key=True, autoincrement=True)
    site_id: Mapped[str] = mapped_column(String(_NAME_LENGTH))
    study_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    state: Mapped[str] = mapped_column(String(_STATE_LENGTH))
    order_id: Mapped[str | None] = mapped_column(String(_NAME_LENGTH))
    order_status: Mapped[str | None] = mapped_column(String(_REASON_LENGTH))
    reason: Mapped[str | None] = mapped_column(String(_REASON_LENGTH))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    resend_count: Mapped[int] = mapped_column(Integer, default=0)
    abandoned_order_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    run_id: Mapped[str | None] = mapped_column(String(_NAME_LENGTH))
    batch_id: Mapped[str | None] = mapped_column(String(_NAME_LENGTH))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    byte_count: Mapped[int] = mapped_column(BigInteger, default=0)
    claim_token: Mapped[str | None] = mapped_column(String(32))
    claim_owner: Mapped[str | None] = mapped_column(String(_NAME_LENGTH))
    claimed_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    uploaded_at: Mapped[datetime | None]
    verified_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class Event(LedgerBase):
    """One state change of a study or an instance; rows are only ever appended."""

    __tablename__ = f"{TABLE_PREFIX}events"
    __table_args__ = (
        Index(f"ix_{TABLE_PREFIX}events_run", "site_id", "run_id"),
        Index(f"ix_{TABLE_PREFIX}events_study", "site_id", "study_uid"),
    )

    id: Mapped[int] = mapped_column(_IdColumn, primary_key=True, autoincrement=True)
    site_id: Mapped[str] = mapped_column(String(_NAME_LENGTH))
    run_id: Mapped[str | None] = mapped_column(String(_NAME_LENGTH))
    study_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    sop_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    from_state: Mapped[str | None] = mapped_column(String(_STATE_LENGTH))
    to_state: Mapped[str] = mapped_column(String(_STATE_LENGTH))
    reason: Mapped[str | None] = mapped_column(String(_REASON_LENGTH))
    at: Mapped[datetime]
