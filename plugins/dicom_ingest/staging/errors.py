"""Errors raised while scanning, quarantining and planning a staging area."""

from __future__ import annotations

from collections.abc import Mapping

from dicom_ingest.exceptions import DicomIngestError


class StagingError(DicomIngestError):
    """A staging area cannot be scanned, quarantined or planned."""


class StagingSourceError(StagingError):
    """The staging location does not exist, is not a folder, or cannot be listed."""


class QuarantineError(StagingError):
    """A file could not be copied or moved into the quarantine location."""


class StagingThresholdError(StagingError):
    """Too many staged files are invalid: the run stops before anything is uploaded.

    :param counts: the number of files per reason code, valid ones included.
    :param invalid: how many files count against the threshold.
    :param total: how many files were classified.
    :param limit: which limit was exceeded, in words.
    :param report_uri: where the list of invalid files was written, if it was.
    """

    def __init__(
        self,
        *,
        counts: Mapping[str, int],
        invalid: int,
        total: int,
        limit: str,
        report_uri: str | None = None,
    ) -> None:
        self.counts = dict(counts)
        self.invalid = invalid
        self.total = total
        self.limit = limit
        self.report_uri = report_uri
        per_reason = ", ".join(f"{reason}={count}" for reason, count in sorted(self.counts.items()))
        where = f"; the invalid files are listed in {report_uri}" if report_uri else ""
        super().__init__(
            f"{invalid} of {total} staged files are invalid, exceeding {limit} "
            f"(files per reason: {per_reason}){where}"
        )
