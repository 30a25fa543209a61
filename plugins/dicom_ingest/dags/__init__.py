"""Build the per-site Airflow DAGs from ``sites.yaml`` (see :mod:`dicom_ingest.dags.factory`)."""

from __future__ import annotations
