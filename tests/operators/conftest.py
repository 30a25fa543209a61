"""Fixtures shared by the operator tests: a private folder, a sample staging area, the site's ledger.

Each test module defines its own ``entry`` fixture (the site's sites-file entry); ``ledger``
opens the ledger of whichever entry the module defines.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_ingest.ledger import Ledger
from dicom_ingest_sandbox.samples import SampleManifest, build_sample_staging
from tests.dags.support import open_ledger, private_folder
from tests.operators.support import DAY


@pytest.fixture
def folder() -> Iterator[Path]:
    with private_folder() as path:
        yield path


@pytest.fixture
def sample(folder: Path) -> SampleManifest:
    """Three generated studies (tags, sidecar, no metadata) and four bad files."""
    return build_sample_staging(folder / "staging", studies=3, include_bundled=False, day=DAY)


@pytest.fixture
def ledger(entry: dict[str, Any]) -> Iterator[Ledger]:
    with open_ledger(entry) as opened:
        yield opened
