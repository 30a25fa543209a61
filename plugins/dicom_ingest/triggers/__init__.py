"""Triggers of the DICOM ingest library; they run in Airflow's triggerer, so they live in this package."""

from __future__ import annotations
