"""What uploading one batch achieved: failure reason codes and the batch's small result."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

FAILURES_NAMED_IN_MESSAGES = 20
"""At most this many failed studies are named in an error message; the ledger lists them all."""


class FailureReason(enum.StrEnum):
    """Why a study of a batch failed; recorded in the ledger and named in the task's error."""

    UPLOAD_FAILED = "upload_failed"
    """An instance could not be sent: the vendor or the store kept refusing it after the hook's retries."""
    INTEGRITY_MISMATCH = "integrity_mismatch"
    """The store's ETag was not the MD5 of the bytes sent, or the file was shorter than planned."""
    SOURCE_UNREADABLE = "source_unreadable"
    """A staged file could not be opened or read (moved, deleted or unreadable since planning)."""
    SOURCE_CHANGED = "source_changed"
    """A staged file's size changed since planning; it is not sent, because it is not what was checked."""
    ORDER_LOOKUP_FAILED = "order_lookup_failed"
    """The study's orders could not be listed before or after the upload."""
    ORDER_NOT_FOUND = "order_not_found"
    """The vendor filed no order for the study within the waiting time."""
    METADATA_REJECTED = "metadata_rejected"
    """The vendor refused the metadata because the order had moved on without it being complete."""
    METADATA_FAILED = "metadata_failed"
    """The metadata could not be sent (the vendor kept failing or refused the request)."""
    UNEXPECTED_ERROR = "unexpected_error"
    """A failure of the uploader itself; the task log names the error type."""


@dataclass(frozen=True)
class BatchResult:
    """What one batch upload did: counts, bytes and time, small enough for XCom.

    Study counts add up to ``studies`` only when every study was reached; instance counts are
    of this task's work.

    :param batch_id: the batch's id in the plan.
    :param index: the batch's position in the plan.
    :param studies: studies in the batch.
    :param instances: instances in the batch.
    :param uploaded: instances sent to the vendor by this task.
    :param skipped_done: studies left alone because the vendor already has them (verified, or
        their metadata was already sent).
    :param failed: studies that failed (see ``failures``).
    :param held: studies the ledger holds back (e.g. missing metadata, conflicting files).
    :param busy: studies another live worker was uploading, left to it.
    :param bytes: bytes sent by this task.
    :param seconds: wall time of the batch.
    :param orders: orders that received their study's metadata from this task (orders to wait for).
    :param failures: failed study UID → reason code; kept out of XCom (its size is unbounded).
    """

    batch_id: str
    index: int
    studies: int
    instances: int
    uploaded: int
    skipped_done: int
    failed: int
    held: int
    busy: int
    bytes: int
    seconds: float
    orders: int
    failures: Mapping[str, str] = field(default_factory=dict, repr=False)

    def to_xcom(self) -> dict[str, Any]:
        """Return the result as the task's small XCom value: ids and counts, no UID lists."""
        return {
            "batch_id": self.batch_id,
            "index": self.index,
            "studies": self.studies,
            "instances": self.instances,
            "uploaded": self.uploaded,
            "skipped_done": self.skipped_done,
            "failed": self.failed,
            "held": self.held,
            "busy": self.busy,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "orders": self.orders,
        }

    def failure_summary(self, limit: int = FAILURES_NAMED_IN_MESSAGES) -> str:
        """Name the failed studies with their reason codes, at most ``limit`` of them.

        :param limit: how many studies to name before summarising the rest as a count.
        """
        named = [f"{study_uid} ({reason})" for study_uid, reason in list(self.failures.items())[:limit]]
        rest = len(self.failures) - len(named)
        return ", ".join(named) + (f" and {rest} more" if rest > 0 else "")
