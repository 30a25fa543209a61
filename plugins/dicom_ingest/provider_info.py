"""Provider metadata read by Airflow's ProvidersManager through the ``apache_airflow_provider`` entry point.

It registers the ``dicom_ingest`` connection type and declares its form the Airflow 3.3 way: extra
fields as JSON-schema ``conn-fields`` and relabelled standard fields in ``ui-field-behaviour``. The
extras' descriptions and placeholders show the defaults of
:class:`~dicom_ingest.hooks.connection.DicomIngestConnectionConfig`, so the form and the code cannot
disagree. Nothing here imports Airflow or the hooks.
"""

from __future__ import annotations

from typing import Any

from dicom_ingest import __version__
from dicom_ingest.hooks.connection import DicomIngestConnectionConfig

CONNECTION_TYPE = "dicom_ingest"
HOOK_CLASS_NAME = "dicom_ingest.hooks.dicom_ingest.DicomIngestHook"

_STRING = ["string", "null"]
_NUMBER = ["number", "null"]
_INTEGER = ["integer", "null"]
_BOOLEAN = ["boolean", "null"]

_EXTRA_FIELDS: dict[str, tuple[str, list[str], str]] = {
    "token_url": ("Token URL", _STRING, "OAuth2 token endpoint; defaults to <API base URL>/oauth2/token."),
    "token_method": (
        "Token method",
        _STRING,
        "GET (the vendor's documented form) or POST (RFC 6749 form body); "
        "credentials always go in an HTTP Basic header.",
    ),
    "scope": (
        "Scope",
        _STRING,
        "Space-separated scopes to request, e.g. 'upload metadata read'; empty for all.",
    ),
    "upload_path": ("Upload path", _STRING, "Path that returns a presigned PUT URL."),
    "metadata_path": ("Add-metadata path", _STRING, "Path that merges JSON metadata into an order."),
    "status_path": ("Status path", _STRING, "Path that returns an order's status."),
    "order_ids_path": ("Order ids path", _STRING, "Path that lists a study's order ids."),
    "test_token_path": ("Test-token path", _STRING, "Path that answers 200 for a valid token."),
    "done_statuses": ("Done statuses", _STRING, "Comma-separated order status words that mean done."),
    "failed_statuses": ("Failed statuses", _STRING, "Comma-separated order status words that mean failed."),
    "verify": ("TLS verification", _STRING, "true, false, or the path of a CA bundle file."),
    "connect_timeout": ("Connect timeout (s)", _NUMBER, "Seconds to wait for a connection."),
    "read_timeout": ("Read timeout (s)", _NUMBER, "Seconds to wait for an answer."),
    "max_retries": (
        "Max retries",
        _INTEGER,
        "Retries of a call after a connection error, timeout, 429 or 5xx.",
    ),
    "backoff_base": ("Backoff base (s)", _NUMBER, "First backoff step; it doubles per retry, with jitter."),
    "backoff_max": ("Backoff max (s)", _NUMBER, "Longest backoff between retries."),
    "retry_after_max": ("Retry-After cap (s)", _NUMBER, "Longest Retry-After wait honoured."),
    "upload_concurrency": (
        "Upload concurrency",
        _INTEGER,
        "Most parallel uploads per client (the vendor asks for no more than 20).",
    ),
    "presign_ahead": (
        "Presign ahead",
        _BOOLEAN,
        "Ask for each upload's presigned URL while the previous upload is still sending.",
    ),
}


def _placeholder(field_name: str) -> str:
    """Show a setting's default as the form's placeholder.

    :param field_name: a field of the connection config model.
    """
    default = DicomIngestConnectionConfig.model_fields[field_name].default
    if default is None:
        return ""
    if isinstance(default, frozenset):
        return ",".join(sorted(default))
    if isinstance(default, bool):
        return str(default).lower()
    return str(default)


def _conn_fields() -> dict[str, dict[str, Any]]:
    """Return the extra fields of the connection form as JSON-schema definitions."""
    fields: dict[str, dict[str, Any]] = {}
    for name, (label, json_type, description) in _EXTRA_FIELDS.items():
        schema: dict[str, Any] = {"type": json_type}
        if name == "token_method":
            schema["enum"] = ["GET", "POST", None]
        default = _placeholder(name)
        text = f"{description} Default: {default}." if default else description
        fields[name] = {"label": label, "description": text, "schema": schema}
    return fields


def get_provider_info() -> dict[str, Any]:
    """Return the provider metadata of ``airflow-dicom-ingest``."""
    placeholders = {name: _placeholder(name) for name in _EXTRA_FIELDS if _placeholder(name)}
    placeholders.update(
        {
            "host": "https://api.vendor.example",
            "login": "client id issued by the vendor",
            "password": "client secret issued by the vendor",
            "token_url": "<API base URL>/oauth2/token",
        }
    )
    return {
        "package-name": "airflow-dicom-ingest",
        "name": "DICOM Ingest",
        "description": "Move staged DICOM instances into a vendor's cloud data lake through its REST API.",
        "versions": [__version__],
        "connection-types": [
            {
                "connection-type": CONNECTION_TYPE,
                "hook-class-name": HOOK_CLASS_NAME,
                "hook-name": "DICOM Ingest",
                "conn-fields": _conn_fields(),
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port"],
                    "relabeling": {"host": "API base URL", "login": "Client ID", "password": "Client secret"},
                    "placeholders": placeholders,
                },
            }
        ],
    }
