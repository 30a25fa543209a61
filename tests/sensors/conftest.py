"""Fixtures of the order sensor tests: a site with a SQLite ledger, and the sandbox as its vendor."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_ingest.ledger import Ledger
from dicom_ingest_sandbox.testing import Sandbox
from tests.sensors.support import connect_to, site_dict


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    """Give a private temporary folder (a concurrent pytest run may prune the numbered tmp_path ones)."""
    with tempfile.TemporaryDirectory(prefix="dicom-ingest-orders-") as folder:
        yield Path(folder)


@pytest.fixture
def ledger_path(scratch_dir: Path) -> Path:
    """Return where the site's SQLite ledger lives."""
    return scratch_dir / "ledger.sqlite3"


@pytest.fixture
def ledger(ledger_path: Path) -> Iterator[Ledger]:
    """Open the site's ledger, as the upload task would."""
    with Ledger.for_location(ledger_path) as opened:
        yield opened


@pytest.fixture
def site(ledger_path: Path) -> dict[str, Any]:
    """Return the site's configuration dict, polling every 0.2 s with a 30 s timeout."""
    return site_dict(ledger_path)


@pytest.fixture
def vendor(fresh_sandbox_state: Sandbox, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    """Return the emptied session sandbox, with the site's connection pointing at it."""
    connect_to(monkeypatch, fresh_sandbox_state)
    return fresh_sandbox_state
