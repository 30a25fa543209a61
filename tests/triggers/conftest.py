"""Fixtures of the trigger tests: the same sandbox-backed vendor as the sensor tests."""

from __future__ import annotations

from tests.sensors.conftest import vendor  # noqa: F401  (re-exported fixture)
