"""Airflow DAGs of airflow-dicom-ingest: one DAG, ``dicom_ingest__<site id>``, per enabled site.

The sites are read from ``$DICOM_INGEST_SITES_FILE``, else from ``include/sites.yaml`` beside
this folder. Parsing reads that file and nothing else. A rejected entry gets no DAG here and is
reported as an import error of ``dicom_ingest_site_errors.py``, so the other sites keep running.
"""

from __future__ import annotations

from dicom_ingest.dags.factory import build_dags, sites_file_for

globals().update(build_dags(sites_file_for(__file__)))
