"""The Airflow plugin of the DICOM ingest library.

The ``dicom_ingest`` connection type is registered through the provider entry point
(:mod:`dicom_ingest.provider_info`), since Airflow 3 plugins cannot add hooks; the plugin is
where UI views and extra links attach.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin


class DicomIngestPlugin(AirflowPlugin):
    """Register the DICOM ingest library with Airflow."""

    name = "dicom_ingest"
