"""Move staged DICOM instances into the vendor's cloud data lake from Apache Airflow."""

from __future__ import annotations

__version__ = "0.1.0"
