"""Clients of the vendor's ingestion API (import them from :mod:`dicom_ingest.hooks.dicom_ingest`).

Kept free of imports so that reading the connection settings (``provider_info``) stays cheap.
"""

from __future__ import annotations
