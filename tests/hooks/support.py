"""Shared helpers of the hook tests: fake vendor addresses and credentials, env connections, a clock."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

API = "https://api.vendor.test"
STORE = "https://store.vendor.test"
CLIENT_ID = "site-paris-client"
CLIENT_SECRET = "Sup3r-Secret-Client-Value-91f3"
SIGNATURE = "f00dbabe5ec12e7deadbeef0c0ffee5160a7e2"
CONN_ID = "dicom_ingest_default"


def presigned_url(key: str = "incoming/obj-1.dcm") -> str:
    """Return a realistic presigned PUT URL whose query carries :data:`SIGNATURE`."""
    return (
        f"{STORE}/bucket/{key}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20261128"
        f"&X-Amz-Date=20261128T000000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=content-type%3Bhost"
        f"&X-Amz-Signature={SIGNATURE}"
    )


def set_connection(
    monkeypatch: pytest.MonkeyPatch,
    conn_id: str = CONN_ID,
    *,
    host: str = API,
    login: str | None = CLIENT_ID,
    password: str | None = CLIENT_SECRET,
    **extra: Any,
) -> None:
    """Define a ``dicom_ingest`` connection through ``AIRFLOW_CONN_<ID>`` (no database).

    :param monkeypatch: pytest's monkeypatch.
    :param conn_id: the connection id.
    :param host: the API base URL.
    :param login: the client id.
    :param password: the client secret.
    :param extra: the connection's extras.
    """
    connection = {
        "conn_type": "dicom_ingest",
        "host": host,
        "login": login,
        "password": password,
        "extra": extra,
    }
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(connection))


@dataclass
class FakeClock:
    """A monotonic clock the test moves by hand."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class RecordedSleeps:
    """A sleep function that records the requested delays instead of waiting."""

    delays: list[float] = field(default_factory=list)

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
