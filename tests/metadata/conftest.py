"""Fixtures shared with the staging tests: planning needs a staging folder."""

from __future__ import annotations

from tests.staging.conftest import staging_root

__all__ = ["staging_root"]
