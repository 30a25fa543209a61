"""Benchmarks of airflow-dicom-ingest against the vendor sandbox: ``python -m bench`` (``make bench``)."""
