"""Plain values going into and out of the ledger.

Inputs are the plan (:class:`PlannedStudy`, :class:`PlannedInstance`); outputs are frozen
dataclasses carrying UIDs, states, reasons, counts and timestamps only: never file contents or
DICOM tag values. :meth:`LedgerRecord.to_dict` turns any of them into JSON-ready dicts.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


def _json_ready(value: Any) -> Any:
    """Convert datetimes and enums, also inside dicts and lists, to JSON types."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(item) for item in value]
    return value


class LedgerRecord:
    """Mixin giving the ledger's result dataclasses a JSON-ready ``to_dict``."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        """Return the record as a dict of JSON types (datetimes as ISO 8601 strings)."""
        return _json_ready(dataclasses.asdict(self))  # type: ignore[call-overload]


@dataclass(frozen=True, slots=True)
class PlannedInstance:
    """One valid staged file, as the plan lists it.

    :param sop_uid: SOP Instance UID.
    :param series_uid: Series Instance UID, if known.
    :param path: where the file is staged (local path or URI).
    :param size: size of the file in bytes.
    """

    sop_uid: str
    path: str
    size: int
    series_uid: str | None = None


@dataclass(frozen=True, slots=True)
class PlannedStudy:
    """One study of the plan with its instances.

    :param study_uid: Study Instance UID.
    :param instances: the study's valid instances.
    """

    study_uid: str
    instances: Sequence[PlannedInstance] = ()


@dataclass(frozen=True, slots=True)
class InstanceUpload:
    """One instance that reached the vendor's store.

    What :meth:`~dicom_ingest.ledger.Ledger.mark_instances_uploaded` records for it.

    :param sop_uid: SOP Instance UID.
    :param key: the object key the vendor gave for it.
    :param md5: hex MD5 of the bytes sent.
    :param etag: the ETag the store answered with.
    """

    sop_uid: str
    key: str
    md5: str
    etag: str | None


@dataclass(frozen=True, slots=True)
class PlanResult(LedgerRecord):
    """What :meth:`~dicom_ingest.ledger.Ledger.record_plan` recorded.

    :param studies_planned: studies now planned in this run (new, or not done and re-planned).
    :param studies_already_done: studies left alone because the vendor already confirmed them.
    :param instances_planned: instances of the planned studies.
    :param bytes_planned: bytes of the planned instances.
    """

    studies_planned: int = 0
    studies_already_done: int = 0
    instances_planned: int = 0
    bytes_planned: int = 0

    def __add__(self, other: PlanResult) -> PlanResult:
        """Add the counts of two results (of two chunks of one plan)."""
        return PlanResult(*(getattr(self, name) + getattr(other, name) for name in self.__dataclass_fields__))


class ClaimAction(enum.StrEnum):
    """What a worker claiming a study must do."""

    SKIP = "skip"
    """Nothing: the study is verified, its metadata is with the vendor, or it is held back."""
    UPLOAD_ALL = "upload_all"
    """Upload every instance of the study (fresh, or a deliberate re-send after an interruption)."""
    RESUME_METADATA = "resume_metadata"
    """Every instance is uploaded but the metadata is not confirmed: attach it (or decide to re-send)."""
    BUSY = "busy"
    """Another worker holds a live claim on the study."""


@dataclass(frozen=True, slots=True)
class StudyClaim(LedgerRecord):
    """The ledger's answer to a claim on a study.

    :param action: what the caller must do.
    :param site_id: the site.
    :param study_uid: the study.
    :param state: the study's state after the claim.
    :param token: proof of ownership for the caller (``None`` unless it now holds the claim).
    :param owner: who holds the claim (the caller, or the other worker when ``busy``).
    :param claimed_at: when the current claim was taken.
    :param reason: why the study is skipped or held, if it is.
    :param order_id: the vendor's order id, once known.
    :param resend_count: how many times the study was re-sent whole.
    :param resent: whether this claim is a re-send of a study whose bytes went out before.
    :param took_over: whether this claim replaced another worker's expired claim.
    :param uploaded_at: when the last instance (or the study) was uploaded, if it was.
    """

    action: ClaimAction
    site_id: str
    study_uid: str
    state: str
    token: str | None = None
    owner: str | None = None
    claimed_at: datetime | None = None
    reason: str | None = None
    order_id: str | None = None
    resend_count: int = 0
    resent: bool = False
    took_over: bool = False
    uploaded_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class InstanceRecord(LedgerRecord):
    """One instance (or quarantined file) as the ledger knows it."""

    sop_uid: str | None
    series_uid: str | None
    path: str
    size: int
    state: str
    key: str | None
    md5: str | None
    etag: str | None
    reason: str | None
    message: str | None
    attempts: int
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class EventRecord(LedgerRecord):
    """One entry of the append-only history."""

    at: datetime
    run_id: str | None
    study_uid: str | None
    sop_uid: str | None
    from_state: str | None
    to_state: str
    reason: str | None


@dataclass(frozen=True, slots=True)
class BatchStudy(LedgerRecord):
    """A study of a batch with its order, for the sensor and the extra link."""

    study_uid: str
    state: str
    reason: str | None
    order_id: str | None
    order_status: str | None
    abandoned_order_ids: list[str]
    instance_count: int
    byte_count: int
    resend_count: int


@dataclass(frozen=True, slots=True)
class StudyDetail(LedgerRecord):
    """Everything the ledger knows about one study: its row, instances and history."""

    site_id: str
    study_uid: str
    state: str
    reason: str | None
    order_id: str | None
    order_status: str | None
    abandoned_order_ids: list[str]
    attempts: int
    resend_count: int
    run_id: str | None
    batch_id: str | None
    instance_count: int
    byte_count: int
    claim_owner: str | None
    claimed_at: datetime | None
    uploaded_at: datetime | None
    verified_at: datetime | None
    created_at: datetime
    updated_at: datetime
    instances: list[InstanceRecord] = field(default_factory=list)
    events: list[EventRecord] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ReasonCount(LedgerRecord):
    """How many studies or instances ended in one state for one reason.

    :param level: ``"study"`` or ``"instance"``.
    """

    level: str
    state: str
    reason: str
    count: int


@dataclass(frozen=True, slots=True)
class RunSummary(LedgerRecord):
    """Counts of one run of one site, for the run's report.

    :param studies: studies planned (or held) in the run.
    :param instances: instances and quarantined files of the run.
    :param bytes_planned: bytes of the run's valid instances.
    :param bytes_uploaded: bytes of those that reached the vendor's store.
    :param studies_already_done: studies the run found already confirmed and left alone.
    :param resends: studies re-sent whole (summed re-send counts of the run's studies).
    :param abandoned_orders: orders left behind by re-sends.
    """

    site_id: str
    run_id: str
    studies: int
    instances: int
    bytes_planned: int
    bytes_uploaded: int
    studies_by_state: dict[str, int]
    instances_by_state: dict[str, int]
    reasons: list[ReasonCount]
    studies_already_done: int
    resends: int
    abandoned_orders: int


@dataclass(frozen=True, slots=True)
class SiteSummary(LedgerRecord):
    """Counts over every run of one site.

    :param runs: distinct runs recorded in the history.
    :param last_activity_at: time of the latest event, if any.
    """

    site_id: str
    studies: int
    instances: int
    bytes_total: int
    bytes_uploaded: int
    studies_by_state: dict[str, int]
    instances_by_state: dict[str, int]
    reasons: list[ReasonCount]
    runs: int
    resends: int
    abandoned_orders: int
    last_activity_at: datetime | None
