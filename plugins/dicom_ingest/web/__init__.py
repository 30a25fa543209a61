"""The plugin's pages in Airflow's API server: a site's ledger and a batch's orders (``/dicom-ingest``)."""

from __future__ import annotations
