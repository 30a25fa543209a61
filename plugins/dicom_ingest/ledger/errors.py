"""Errors raised by the ledger.

Their text names sites, runs and UIDs only: never a database password, a file's content or a
DICOM tag value other than UIDs.
"""

from __future__ import annotations

from dicom_ingest.exceptions import DicomIngestConfigError, DicomIngestError


class LedgerError(DicomIngestError):
    """Base class of the ledger's errors."""


class LedgerConfigError(LedgerError, DicomIngestConfigError):
    """The ledger location or the Airflow connection given for it cannot be used."""


class UnknownStudyError(LedgerError):
    """The study (or the instance) was never planned for this site."""


class LedgerStateError(LedgerError):
    """The requested transition is not allowed from the row's current state."""


class ClaimLostError(LedgerError):
    """The caller's claim on a study was taken over by another worker after its lease ran out."""
