"""Fixtures for the uploader's unit tests: a SQLite ledger, a staging folder, the stand-in vendor."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_ingest.ledger import Ledger
from dicom_ingest.staging.source import StagingSource
from dicom_ingest.upload import BatchUploader
from tests.dags.support import private_folder
from tests.upload.support import BATCH, OWNER, RUN, SITE, FakeClock, FakeSleep, FakeVendor


@pytest.fixture
def folder() -> Iterator[Path]:
    """Give a folder of this test alone.

    pytest's numbered ``tmp_path`` folders may be pruned by another pytest run started meanwhile.
    """
    with private_folder() as path:
        yield path


@pytest.fixture
def ledger(folder: Path) -> Iterator[Ledger]:
    """Open a SQLite ledger in the test's folder."""
    with Ledger(f"sqlite:///{folder / 'ledger.sqlite3'}") as opened:
        yield opened


@pytest.fixture
def staging_root(folder: Path) -> Path:
    """Return an empty staging folder."""
    root = folder / "staging"
    root.mkdir()
    return root


@pytest.fixture
def vendor() -> FakeVendor:
    """Return the stand-in vendor."""
    return FakeVendor()


@pytest.fixture
def clock() -> FakeClock:
    """Return a clock the test (or the fake sleep) moves."""
    return FakeClock()


@pytest.fixture
def sleep(clock: FakeClock) -> FakeSleep:
    """Return a sleep that moves the fake clock instead of waiting."""
    return FakeSleep(clock)


@pytest.fixture
def make_uploader(
    vendor: FakeVendor, ledger: Ledger, staging_root: Path, clock: FakeClock, sleep: FakeSleep
) -> Callable[..., BatchUploader]:
    """Build uploaders of the test batch over the stand-in vendor, the ledger and the staging folder."""

    def build(
        concurrency: int = 2, *, client: FakeVendor | None = None, ledger: Ledger = ledger, **options: Any
    ) -> BatchUploader:
        settings: dict[str, Any] = {
            "claim_owner": OWNER,
            "metadata_wait": 30.0,
            "progress_interval": 3600.0,
            "clock": clock,
            "sleep": sleep,
            **options,
        }
        source = StagingSource.from_uri(str(staging_root))
        return BatchUploader(client or vendor, ledger, source, SITE, RUN, BATCH, concurrency, **settings)

    return build
