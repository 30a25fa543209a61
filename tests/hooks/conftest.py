"""Fixtures for the hook tests: hooks on environment connections, a settable clock, recorded sleeps."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_ingest.hooks.dicom_ingest import DicomIngestHook
from tests.hooks.support import FakeClock, RecordedSleeps, set_connection


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    """Give a private temporary folder (a concurrent pytest run may prune the numbered tmp_path ones)."""
    with tempfile.TemporaryDirectory(prefix="dicom-ingest-hooks-") as folder:
        yield Path(folder)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sleeps() -> RecordedSleeps:
    return RecordedSleeps()


@pytest.fixture
def make_hook(
    monkeypatch: pytest.MonkeyPatch, clock: FakeClock, sleeps: RecordedSleeps
) -> Iterator[Callable[..., DicomIngestHook]]:
    """Build hooks on an environment connection with the given extras, a fake clock and no real sleeps."""
    hooks: list[DicomIngestHook] = []

    def build(**extra: Any) -> DicomIngestHook:
        set_connection(monkeypatch, **extra)
        hook = DicomIngestHook(sleep=sleeps, clock=clock)
        hooks.append(hook)
        return hook

    yield build
    for hook in hooks:
        hook.close()
