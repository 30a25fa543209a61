"""Discover, classify, quarantine and plan the DICOM files of a staging area.

Pure Python, no Airflow operators: the site DAGs call :func:`build_plan` in a discovery task
and hand only :attr:`Plan.batches` (ids and counts) to the mapped upload tasks, which read
their batch back with :meth:`Plan.iter_batch`.
"""

from __future__ import annotations

from dicom_ingest.staging.classify import (
    DEFECT_REASONS,
    QUARANTINE_REASONS,
    HeaderClassifier,
    InstanceRecord,
    Reason,
)
from dicom_ingest.staging.errors import (
    QuarantineError,
    StagingError,
    StagingSourceError,
    StagingThresholdError,
)
from dicom_ingest.staging.options import InvalidThreshold, QuarantinePolicy, StagingOptions
from dicom_ingest.staging.plan import BatchSummary, Plan, PlannedInstance, PlannedStudy, build_plan
from dicom_ingest.staging.quarantine import Quarantine, check_threshold
from dicom_ingest.staging.source import EntryKind, SourceEntry, StagingSource

__all__ = [
    "DEFECT_REASONS",
    "QUARANTINE_REASONS",
    "BatchSummary",
    "EntryKind",
    "HeaderClassifier",
    "InstanceRecord",
    "InvalidThreshold",
    "Plan",
    "PlannedInstance",
    "PlannedStudy",
    "Quarantine",
    "QuarantineError",
    "QuarantinePolicy",
    "Reason",
    "SourceEntry",
    "StagingError",
    "StagingOptions",
    "StagingSource",
    "StagingSourceError",
    "StagingThresholdError",
    "build_plan",
    "check_threshold",
]
