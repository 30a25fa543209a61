"""Halt on too many invalid files, and set invalid files aside with a reason file.

Policies (:class:`~dicom_ingest.staging.options.QuarantinePolicy`):

- ``record``: nothing is touched; the plan's ``invalid.jsonl`` lists every invalid file. For
  read-only archives.
- ``copy``: each invalid file is copied to ``<quarantine>/<relative path>`` with
  ``<relative path>.reason.json`` beside it.
- ``move``: the same, and the file leaves the staging area.

Only file defects are quarantined (:data:`~dicom_ingest.staging.classify.QUARANTINE_REASONS`):
not duplicates (a copy of them is uploaded), DICOMDIRs, studies held back for missing metadata
(their files are fine; fix the metadata and run again), nor links leaving the staging root
(copying one would read outside the staging area).

A reason file holds the reason code, the message, the size and the scan time: no tag values.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from datetime import datetime

from airflow.sdk import ObjectStoragePath

from dicom_ingest.staging.classify import DEFECT_REASONS, InstanceRecord
from dicom_ingest.staging.errors import QuarantineError, StagingThresholdError
from dicom_ingest.staging.options import InvalidThreshold, QuarantinePolicy
from dicom_ingest.staging.source import StagingSource, to_storage_path

log = logging.getLogger(__name__)

REASON_FILE_SUFFIX = ".reason.json"


def check_threshold(
    counts: Mapping[str, int], threshold: InvalidThreshold, *, report_uri: str | None = None
) -> None:
    """Raise when the invalid files exceed the site's threshold.

    :param counts: files per reason code (all reasons, valid included).
    :param threshold: the site's limits.
    :param report_uri: where the invalid files are listed, for the error text.
    :raises StagingThresholdError: a limit is exceeded.
    """
    total = sum(counts.values())
    invalid = sum(count for reason, count in counts.items() if reason in DEFECT_REASONS)
    exceeded = None
    if threshold.max_count is not None and invalid > threshold.max_count:
        exceeded = f"the limit of {threshold.max_count} invalid files"
    elif threshold.max_fraction is not None and total and invalid / total > threshold.max_fraction:
        exceeded = f"the limit of {threshold.max_fraction:.1%} invalid files"
    if exceeded:
        raise StagingThresholdError(
            counts=counts, invalid=invalid, total=total, limit=exceeded, report_uri=report_uri
        )


class Quarantine:
    """Apply a quarantine policy to invalid files.

    :param source: the staging area the files are in.
    :param policy: record, copy or move.
    :param quarantine_uri: where copies and moves go (ignored for ``record``).
    :param scanned_at: the scan time written into reason files.
    """

    def __init__(
        self,
        source: StagingSource,
        policy: QuarantinePolicy,
        quarantine_uri: str | None,
        scanned_at: datetime,
    ) -> None:
        if policy is not QuarantinePolicy.RECORD and not quarantine_uri:
            raise QuarantineError(f"quarantine policy {policy.value!r} needs a quarantine location")
        self._source = source
        self._policy = policy
        self._root = to_storage_path(quarantine_uri) if quarantine_uri else None
        self._scanned_at = scanned_at.isoformat()

    def apply(self, records: Iterable[InstanceRecord]) -> int:
        """Copy or move each record's file with its reason file; return how many were set aside.

        :param records: the invalid files to quarantine.
        :raises QuarantineError: a file could not be copied or moved.
        """
        if self._policy is QuarantinePolicy.RECORD or self._root is None:
            return 0
        handled = 0
        for record in records:
            self._set_aside(record, self._root)
            handled += 1
        log.info("Quarantine (%s): %d files set aside in %s", self._policy.value, handled, self._root)
        return handled

    def _set_aside(self, record: InstanceRecord, root: ObjectStoragePath) -> None:
        source_path = self._source.path(record.relative_path)
        target = root / record.relative_path
        reason_file = root / f"{record.relative_path}{REASON_FILE_SUFFIX}"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if self._policy is QuarantinePolicy.MOVE:
                source_path.move(target)
            else:
                source_path.copy(target)
            reason_file.write_text(json.dumps(self.reason_document(record), indent=2))
        except OSError as exc:
            raise QuarantineError(
                f"could not {self._policy.value} {record.relative_path} to quarantine ({type(exc).__name__})"
            ) from exc

    def reason_document(self, record: InstanceRecord) -> dict[str, object]:
        """Return the content of a file's reason file.

        :param record: the quarantined file's record.
        """
        return {
            "relative_path": record.relative_path,
            "reason": record.reason.value,
            "message": record.message,
            "size": record.size,
            "scanned_at": self._scanned_at,
        }
