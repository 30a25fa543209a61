"""Fixtures for the staging tests: a staging root and a one-call classifier."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dicom_ingest.metadata.fields import DEFAULT_TAG_MAPPING
from dicom_ingest.staging.classify import Classification, HeaderClassifier
from dicom_ingest.staging.source import SourceEntry, StagingSource

Classify = Callable[..., Classification]


@pytest.fixture
def staging_root(tmp_path: Path) -> Path:
    """An empty staging folder."""
    root = tmp_path / "staging"
    root.mkdir()
    return root


@pytest.fixture
def classify(staging_root: Path) -> Classify:
    """Classify one file below ``staging_root`` by its relative path, as a scan would."""

    def run(relative_path: str, *, max_file_size: int = 10**9, header_prefix_bytes: int = 64 * 1024):
        source = StagingSource.from_uri(str(staging_root))
        classifier = HeaderClassifier(
            source,
            max_file_size=max_file_size,
            header_prefix_bytes=header_prefix_bytes,
            tag_mapping=DEFAULT_TAG_MAPPING,
        )
        entries = {entry.relative_path: entry for entry in source.walk()}
        entry: SourceEntry = entries[relative_path]
        return classifier.classify(entry)

    return run
