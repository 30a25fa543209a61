"""Reachability checks for the local services some tests need (PostgreSQL, Redis).

Outside CI a missing service skips the test with the reason; under ``CI=true``
it fails the test, because CI machines are expected to run these services.
"""

from __future__ import annotations

import os
import socket

import pytest

POSTGRES_ADDR = ("127.0.0.1", 5432)
REDIS_ADDR = ("127.0.0.1", 6379)


def _reachable(addr: tuple[str, int], timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection(addr, timeout=timeout):
            return True
    except OSError:
        return False


def require_service(name: str, addr: tuple[str, int]) -> None:
    """Skip (or, under ``CI=true``, fail) the calling test when ``addr`` does not answer."""
    if _reachable(addr):
        return
    reason = f"{name} is not reachable at {addr[0]}:{addr[1]}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI must provide it", pytrace=False)
    pytest.skip(reason)


def require_postgres() -> None:
    require_service("PostgreSQL", POSTGRES_ADDR)


def require_redis() -> None:
    require_service("Redis", REDIS_ADDR)
