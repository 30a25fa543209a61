"""Settings of a ``dicom_ingest`` connection, validated once and shared by the sync and async hooks.

A connection holds the API base URL in ``host``, the OAuth2 client id in ``login`` and the client
secret in ``password``; everything else is an optional extra whose default matches the vendor's
documents (and the sandbox), so host, login and password alone are enough.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from dicom_ingest.exceptions import DicomIngestConfigError

if TYPE_CHECKING:
    from airflow.sdk import Connection

DEFAULT_TOKEN_PATH = "/oauth2/token"
DEFAULT_SCHEME = "https"

_TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
_FALSE_WORDS = frozenset({"false", "no", "off", "0"})

_CONNECTION_FIELD_NAMES = {"base_url": "host", "client_id": "login", "client_secret": "password"}
"""How model fields map back to the connection attribute a user edits, for error messages."""


class DicomIngestConnectionConfig(BaseModel):
    """Validated settings of one ``dicom_ingest`` connection.

    Build it with :meth:`from_connection`; extras that are missing, ``null`` or empty take
    their defaults, and unknown extras are refused so that a misspelt key is not silently ignored.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    conn_id: str
    base_url: str = Field(min_length=1)
    client_id: str = Field(min_length=1)
    client_secret: SecretStr
    token_url: str | None = None
    token_method: Literal["GET", "POST"] = "GET"
    scope: str | None = None
    upload_path: str = "/upload"
    metadata_path: str = "/add-metadata"
    status_path: str = "/status"
    order_ids_path: str = "/orderId"
    test_token_path: str = "/test-token"
    done_statuses: frozenset[str] = frozenset({"DELIVERED"})
    failed_statuses: frozenset[str] = frozenset({"FAILED", "EXPIRED"})
    verify: bool | str = True
    connect_timeout: PositiveFloat = 10.0
    read_timeout: PositiveFloat = 60.0
    max_retries: NonNegativeInt = 5
    backoff_base: PositiveFloat = 0.5
    backoff_max: PositiveFloat = 30.0
    retry_after_max: PositiveFloat = 60.0
    upload_concurrency: PositiveInt = 20
    presign_ahead: bool = True

    @model_validator(mode="before")
    @classmethod
    def _drop_unset_values(cls, data: Any) -> Any:
        """Treat ``null`` and empty-string extras (what a cleared form field stores) as unset."""
        if isinstance(data, Mapping):
            return {key: value for key, value in data.items() if value is not None and value != ""}
        return data

    @field_validator("base_url")
    @classmethod
    def _normalise_base_url(cls, value: str) -> str:
        """Default the scheme to https and drop a trailing slash."""
        value = value.strip()
        if "://" not in value:
            value = f"{DEFAULT_SCHEME}://{value}"
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("token_method", mode="before")
    @classmethod
    def _upper_case_method(cls, value: Any) -> Any:
        """Accept ``get`` / ``post`` in any case."""
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("done_statuses", "failed_statuses", mode="before")
    @classmethod
    def _split_status_words(cls, value: Any) -> Any:
        """Accept a list or a comma-separated string; compare status words upper-case."""
        words = value.split(",") if isinstance(value, str) else value
        if not isinstance(words, list | tuple | set | frozenset):
            raise ValueError("must be a list of status words or a comma-separated string")
        cleaned = frozenset(str(word).strip().upper() for word in words if str(word).strip())
        if not cleaned:
            raise ValueError("must name at least one status word")
        return cleaned

    @field_validator("verify", mode="before")
    @classmethod
    def _parse_verify(cls, value: Any) -> Any:
        """Read ``"true"`` / ``"false"`` strings as booleans; anything else must be a CA bundle path."""
        if isinstance(value, str):
            word = value.strip().lower()
            if word in _TRUE_WORDS:
                return True
            if word in _FALSE_WORDS:
                return False
            if not Path(value).exists():
                raise ValueError("must be true, false or the path of an existing CA bundle")
        return value

    @model_validator(mode="after")
    def _check_backoff_bounds(self) -> DicomIngestConnectionConfig:
        """Refuse a backoff cap below the first backoff step."""
        if self.backoff_max < self.backoff_base:
            raise ValueError("backoff_max must not be smaller than backoff_base")
        return self

    @classmethod
    def from_connection(
        cls, connection: Connection, extras: Mapping[str, Any] | None = None
    ) -> DicomIngestConnectionConfig:
        """Validate an Airflow connection.

        :param connection: the Airflow connection (host, login, password, extras).
        :param extras: the connection's extras when already deserialised (the async hook reads them
            with ``aextra_dejson``); defaults to ``connection.extra_dejson``.
        :raises DicomIngestConfigError: naming the connection id and the offending field.
        """
        host = connection.host or ""
        if host and connection.port and "://" not in host:
            host = f"{host}:{connection.port}"
        values: dict[str, Any] = dict(connection.extra_dejson if extras is None else extras)
        values.update(
            conn_id=connection.conn_id,
            base_url=host,
            client_id=connection.login,
            client_secret=connection.password,
        )
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise _config_error(connection.conn_id, exc) from None

    @property
    def token_endpoint(self) -> str:
        """The token URL: the ``token_url`` extra, else ``<host>/oauth2/token``."""
        return self.token_url or self.base_url + DEFAULT_TOKEN_PATH

    @property
    def timeout(self) -> tuple[float, float]:
        """The ``(connect, read)`` timeout pair in seconds."""
        return (self.connect_timeout, self.read_timeout)

    def url_for(self, path: str) -> str:
        """Return the absolute URL of an API path (a path that is already a full URL is kept).

        :param path: one of the ``*_path`` settings.
        """
        if "://" in path:
            return path
        return f"{self.base_url}/{path.lstrip('/')}"


def _config_error(conn_id: str, exc: ValidationError) -> DicomIngestConfigError:
    """Turn a pydantic error into one that names the connection and fields, never the values.

    :param conn_id: the connection id.
    :param exc: the validation error; only its locations and messages are used, because its
        input values may include the client secret.
    """
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(part) for part in error["loc"]) or "connection"
        field = _CONNECTION_FIELD_NAMES.get(field, field)
        message = (
            "unknown extra, not a dicom_ingest setting"
            if error["type"] == "extra_forbidden"
            else error["msg"]
        )
        problems.append(f"{field}: {message}")
    return DicomIngestConfigError(f"Connection {conn_id!r} is invalid: {'; '.join(problems)}")
