"""Report rejected entries of the sites file as one Airflow DAG import error; defines no DAG.

Airflow marks every DAG of a file that fails to import as stale, so the valid sites' DAGs live
in ``dicom_ingest_sites.py`` and the errors are raised from this file instead: the import error
names each rejected entry's file, line, site and field, and the other sites keep running.
"""

from __future__ import annotations

from dicom_ingest.dags.factory import check_sites, sites_file_for

check_sites(sites_file_for(__file__))
