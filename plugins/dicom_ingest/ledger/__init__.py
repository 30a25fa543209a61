"""Durable per-instance and per-study state of the ingestion (SQLite by default, PostgreSQL when distributed).

Instances go ``planned → uploaded → metadata_sent → verified`` (or ``failed`` / ``quarantined``);
studies go ``planned → uploading → uploaded → metadata_sent → verified`` (or ``failed`` / ``held``).
:class:`Ledger` takes plain values (site ids, UIDs, paths, sizes) and returns plain records.
"""

from __future__ import annotations

from dicom_ingest.ledger.errors import (
    ClaimLostError,
    LedgerConfigError,
    LedgerError,
    LedgerStateError,
    UnknownStudyError,
)
from dicom_ingest.ledger.ledger import DEFAULT_LEASE, Ledger, default_claim_owner
from dicom_ingest.ledger.models import EventReason, InstanceState, StudyState
from dicom_ingest.ledger.records import (
    BatchStudy,
    ClaimAction,
    EventRecord,
    InstanceRecord,
    InstanceUpload,
    PlannedInstance,
    PlannedStudy,
    PlanResult,
    ReasonCount,
    RunSummary,
    SiteSummary,
    StudyClaim,
    StudyDetail,
)

__all__ = [
    "DEFAULT_LEASE",
    "BatchStudy",
    "ClaimAction",
    "ClaimLostError",
    "EventReason",
    "EventRecord",
    "InstanceRecord",
    "InstanceState",
    "InstanceUpload",
    "Ledger",
    "LedgerConfigError",
    "LedgerError",
    "LedgerStateError",
    "PlanResult",
    "PlannedInstance",
    "PlannedStudy",
    "ReasonCount",
    "RunSummary",
    "SiteSummary",
    "StudyClaim",
    "StudyDetail",
    "StudyState",
    "UnknownStudyError",
    "default_claim_owner",
]
