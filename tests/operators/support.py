"""Constants the operator tests share with their fixtures."""

from __future__ import annotations

DAY = "2025-03-01"
"""The day the sample staging areas are generated for."""
BAD_REASONS = frozenset({"not_dicom", "zero_byte", "unreadable", "dicomdir"})
"""Reason codes of the sample's four bad files."""
