"""Upload a batch of whole studies to the vendor and attach each study's metadata right after it.

Pure Python over the hook, the staging plan and the ledger (no Airflow operator here):
:class:`BatchUploader` does the work, :class:`BatchResult` is what the upload task returns.
"""

from __future__ import annotations

from dicom_ingest.upload.engine import (
    DEFAULT_METADATA_WAIT,
    DEFAULT_PROGRESS_INTERVAL,
    DEFAULT_RESUME_WINDOW,
    BatchUploader,
)
from dicom_ingest.upload.orders import FinalisedStudy, OrderFinaliser, StudyOrderRequest
from dicom_ingest.upload.progress import ProgressMeter
from dicom_ingest.upload.protocols import StagedFiles, VendorClient
from dicom_ingest.upload.results import BatchResult, FailureReason

__all__ = [
    "DEFAULT_METADATA_WAIT",
    "DEFAULT_PROGRESS_INTERVAL",
    "DEFAULT_RESUME_WINDOW",
    "BatchResult",
    "BatchUploader",
    "FailureReason",
    "FinalisedStudy",
    "OrderFinaliser",
    "ProgressMeter",
    "StagedFiles",
    "StudyOrderRequest",
    "VendorClient",
]
