"""Helpers shared by the site configuration tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

MINIMAL_ENTRY = {
    "id": "lyon",
    "schedule": "@daily",
    "staging": "/data/lyon",
    "conn_id": "dicom_ingest_default",
}


@pytest.fixture
def write_sites(tmp_path: Path) -> Callable[[str], Path]:
    """Return a function that writes a sites file with the given text and returns its path."""

    def write(text: str, name: str = "sites.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write
