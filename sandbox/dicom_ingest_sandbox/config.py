"""Settings of a sandbox run: network, credentials and the clocks of the vendor's rules."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator

from dicom_ingest_sandbox.latency import LatencyModel

DEMO_CLIENT_ID = "demo-client"
DEMO_CLIENT_SECRET = "demo-secret"
DEMO_ADMIN_TOKEN = "demo-admin"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_DATA_DIR = Path(".sandbox-data")
DEFAULT_REQUIRED_METADATA = ("patient_age", "patient_sex")
READY_PREFIX = "sandbox ready:"
UPLOAD_CONTENT_TYPE = "application/dicom"
CLIENT_SECRET_ENV = "DICOM_INGEST_SANDBOX_CLIENT_SECRET"
ADMIN_TOKEN_ENV = "DICOM_INGEST_SANDBOX_ADMIN_TOKEN"

_FIELD_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){_HOST_LABEL}(?:\.{_HOST_LABEL})*$")
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})
LOOPBACK_HOST = "127.0.0.1"

Seconds = Annotated[float, Field(ge=0)]
Port = Annotated[int, Field(ge=0, le=65535)]


def bracketed(host: str) -> str:
    """Return ``host`` as written before ``:port`` (IPv6 addresses in brackets).

    :param host: a host name or IP address.
    """
    return f"[{host}]" if ":" in host else host


def reachable_host(host: str) -> str:
    """Return the address to connect to for a listening address (loopback for a wildcard bind).

    :param host: the address a server listens on.
    """
    return LOOPBACK_HOST if host in _WILDCARD_HOSTS else host


def url_host(host: str) -> str:
    """Return the host to put in URLs for a listening address (loopback for a wildcard bind).

    :param host: the address a server listens on.
    """
    return bracketed(reachable_host(host))


class Clocks(BaseModel):
    """Hold the rule clocks and the required metadata, all changeable while the sandbox runs.

    Times are seconds. ``token_ttl`` and ``url_ttl`` are whole seconds because a SigV4
    presigned URL can only carry whole seconds.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    token_ttl: PositiveInt = 3600
    url_ttl: PositiveInt = 900
    metadata_deadline: PositiveFloat = 900.0
    overwrite_window: Seconds = 300.0
    quiet_period: Seconds = 60.0
    processing_time: Seconds = 5.0
    required_metadata: tuple[str, ...] = DEFAULT_REQUIRED_METADATA

    @field_validator("required_metadata", mode="before")
    @classmethod
    def _split_field_list(cls, value: Any) -> Any:
        """Accept ``"a,b"`` as well as a list; an empty string means no required field."""
        if isinstance(value, str):
            return tuple(name.strip() for name in value.split(",") if name.strip())
        return value

    @field_validator("required_metadata")
    @classmethod
    def _check_field_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        """Reject names that are not lower-case identifiers, and drop repeats."""
        for name in value:
            if not _FIELD_NAME.match(name):
                raise ValueError(f"metadata field names are lower-case identifiers, got {name!r}")
        return tuple(dict.fromkeys(value))

    def updated(self, changes: dict[str, Any]) -> Clocks:
        """Return a validated copy with ``changes`` applied.

        :param changes: field names and new values; unknown names are rejected.
        """
        return Clocks.model_validate({**self.model_dump(), **changes})


class SandboxSettings(BaseModel):
    """Hold everything a sandbox run needs; built from the command line."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = DEFAULT_HOST
    port: Port = DEFAULT_PORT
    store_port: Port = 0
    public_host: str | None = None
    latency_ms: Annotated[float, Field(ge=0, le=10_000)] = 0.0
    latency_model: LatencyModel = "tcp"
    data_dir: Path = DEFAULT_DATA_DIR
    client_id: Annotated[str, Field(min_length=1)] = DEMO_CLIENT_ID
    client_secret: Annotated[str, Field(min_length=1)] = DEMO_CLIENT_SECRET
    admin_token: Annotated[str, Field(min_length=1)] = DEMO_ADMIN_TOKEN
    clocks: Clocks = Clocks()
    scan_interval: PositiveFloat = 0.1
    tick_interval: PositiveFloat = 0.1

    @field_validator("public_host")
    @classmethod
    def _check_public_host(cls, value: str | None) -> str | None:
        """Accept a host name or an IP address, without scheme, port or path."""
        if value is None:
            return None
        if ":" in value:
            try:
                return str(ipaddress.IPv6Address(value.strip("[]")))
            except ValueError:
                raise ValueError("must be a host name or an IP address, without a port") from None
        if not _HOST_NAME.match(value):
            raise ValueError("must be a host name or an IP address, without scheme, port or path")
        return value

    @property
    def advertised_host(self) -> str:
        """Return the host put in presigned URLs and the ready line, as written in a URL.

        The public host when given, else the listening address (loopback for a wildcard bind).
        """
        return bracketed(self.public_host) if self.public_host else url_host(self.host)

    @property
    def uses_demo_credentials(self) -> bool:
        """Tell whether the credentials are the published demo ones (safe to print)."""
        return (self.client_id, self.client_secret, self.admin_token) == (
            DEMO_CLIENT_ID,
            DEMO_CLIENT_SECRET,
            DEMO_ADMIN_TOKEN,
        )

    @property
    def audit_path(self) -> Path:
        """Return the JSON-lines audit log's path."""
        return self.data_dir / "audit.jsonl"

    @property
    def store_root(self) -> Path:
        """Return the folder the object store serves; each sub-folder is a bucket."""
        return self.data_dir / "store"
