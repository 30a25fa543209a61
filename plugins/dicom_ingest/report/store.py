"""Write a run report as ``<reports location>/<run folder>.json`` and ``.txt``."""

from __future__ import annotations

from dataclasses import dataclass

from dicom_ingest.report.build import RunReport
from dicom_ingest.report.text import render_text
from dicom_ingest.sites.runtime import run_folder_name
from dicom_ingest.staging.source import to_storage_path


@dataclass(frozen=True)
class ReportFiles:
    """Where a run's report was written.

    :param json: the JSON report.
    :param text: the readable summary.
    """

    json: str
    text: str


def write_report(report: RunReport, reports_uri: str) -> ReportFiles:
    """Write the report's JSON and text files into the reports location, replacing earlier ones.

    :param report: the run's report.
    :param reports_uri: the site's reports location (local path, ``file://`` or ``s3://``).
    """
    folder = to_storage_path(reports_uri)
    folder.mkdir(parents=True, exist_ok=True)
    name = run_folder_name(report.run_id)
    json_file = folder / f"{name}.json"
    text_file = folder / f"{name}.txt"
    json_file.write_text(report.to_json())
    text_file.write_text(render_text(report))
    return ReportFiles(json=str(json_file), text=str(text_file))
