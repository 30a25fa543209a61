"""Airflow operators of the DICOM ingest library: plan a run, upload a batch, report on a run."""
