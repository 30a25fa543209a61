"""Developer and CI scripts of airflow-dicom-ingest (run as ``python -m scripts.<name>``)."""
