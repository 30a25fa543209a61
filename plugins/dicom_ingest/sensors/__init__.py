"""Sensors of the DICOM ingest library."""

from __future__ import annotations
