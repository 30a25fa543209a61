"""Every sandbox test starts from an empty sandbox with the session's clocks."""

from __future__ import annotations

import pytest

from dicom_ingest_sandbox.testing import Sandbox


@pytest.fixture(autouse=True)
def _empty_sandbox(fresh_sandbox_state: Sandbox) -> None:
    """Reset the session's sandbox before each test of this folder."""


@pytest.fixture
def token(sandbox: Sandbox) -> str:
    """Return a token with every scope."""
    return sandbox.token()
