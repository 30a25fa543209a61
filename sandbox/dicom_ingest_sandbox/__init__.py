"""A local, faithful stand-in for the vendor's DICOM ingestion REST API."""
