"""The report of one run of a site: what was planned, uploaded, delivered, held back and why.

Built from the run's plan files and the site's ledger by :class:`RunReportBuilder`, rendered as
text by :func:`render_text` and written next to the other runs' reports by :func:`write_report`.
"""

from __future__ import annotations

from dicom_ingest.report.build import (
    NotUploadedFile,
    RunReport,
    RunReportBuilder,
    RunStatus,
    StudyOutcome,
    UploadTiming,
    Volume,
)
from dicom_ingest.report.store import ReportFiles, write_report
from dicom_ingest.report.text import render_text

__all__ = [
    "NotUploadedFile",
    "ReportFiles",
    "RunReport",
    "RunReportBuilder",
    "RunStatus",
    "StudyOutcome",
    "UploadTiming",
    "Volume",
    "render_text",
    "write_report",
]
