"""Tests of the ``dicom_ingest`` connection settings (DicomIngestConnectionConfig)."""

from __future__ import annotations

import json

import pytest
from airflow.sdk import Connection

from dicom_ingest.exceptions import DicomIngestConfigError
from dicom_ingest.hooks.connection import DicomIngestConnectionConfig
from dicom_ingest.hooks.dicom_ingest import DicomIngestHook
from tests.hooks.support import CLIENT_SECRET, set_connection


def connection(conn_id: str = "vendor_eu", **fields) -> Connection:
    """Build an SDK connection; extras go in as the JSON string the SDK expects."""
    extra = fields.pop("extra", None)
    values = {"host": "https://api.vendor.test", "login": "client", "password": CLIENT_SECRET, **fields}
    return Connection(conn_id=conn_id, conn_type="dicom_ingest", extra=json.dumps(extra or {}), **values)


def test_host_login_password_alone_give_the_sandbox_defaults():
    config = DicomIngestConnectionConfig.from_connection(connection(host="http://127.0.0.1:8765/"))

    assert config.base_url == "http://127.0.0.1:8765"
    assert config.token_endpoint == "http://127.0.0.1:8765/oauth2/token"
    assert config.token_method == "GET"
    assert config.scope is None
    assert [config.url_for(path) for path in (config.upload_path, config.metadata_path)] == [
        "http://127.0.0.1:8765/upload",
        "http://127.0.0.1:8765/add-metadata",
    ]
    assert (config.status_path, config.order_ids_path, config.test_token_path) == (
        "/status",
        "/orderId",
        "/test-token",
    )
    assert config.done_statuses == {"DELIVERED"}
    assert config.failed_statuses == {"FAILED", "EXPIRED"}
    assert config.verify is True
    assert config.upload_concurrency == 20
    assert config.client_secret.get_secret_value() == CLIENT_SECRET


def test_host_without_scheme_defaults_to_https_and_keeps_the_port():
    config = DicomIngestConnectionConfig.from_connection(connection(host="api.vendor.test", port=8443))

    assert config.base_url == "https://api.vendor.test:8443"


def test_extras_override_defaults_and_accept_strings():
    extra = {
        "token_url": "https://auth.vendor.test/auth/token",
        "token_method": "post",
        "done_statuses": "delivered, complete",
        "failed_statuses": ["failed"],
        "verify": "false",
        "connect_timeout": "2.5",
        "max_retries": 0,
        "upload_concurrency": "8",
        "scope": "",
        "status_path": None,
    }
    config = DicomIngestConnectionConfig.from_connection(connection(extra=extra))

    assert config.token_endpoint == "https://auth.vendor.test/auth/token"
    assert config.token_method == "POST"
    assert config.done_statuses == {"DELIVERED", "COMPLETE"}
    assert config.failed_statuses == {"FAILED"}
    assert config.verify is False
    assert config.timeout == (2.5, 60.0)
    assert config.max_retries == 0
    assert config.upload_concurrency == 8
    assert config.scope is None  # empty form fields mean "default"
    assert config.status_path == "/status"


def test_verify_accepts_an_existing_ca_bundle(tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")

    config = DicomIngestConnectionConfig.from_connection(connection(extra={"verify": str(bundle)}))

    assert config.verify == str(bundle)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"extra": {"token_method": "PUT"}}, "token_method"),
        ({"extra": {"upload_concurrency": 0}}, "upload_concurrency"),
        ({"extra": {"read_timeout": "soon"}}, "read_timeout"),
        ({"extra": {"max_retries": -1}}, "max_retries"),
        ({"extra": {"verify": "/no/such/ca.pem"}}, "verify"),
        ({"extra": {"done_statuses": " , "}}, "done_statuses"),
        ({"extra": {"upload_pth": "/upload"}}, "upload_pth"),
        ({"extra": {"backoff_base": 10, "backoff_max": 1}}, "backoff_max"),
        ({"login": None}, "login"),
        ({"password": None}, "password"),
        ({"host": None}, "host"),
        ({"host": "ftp://files.vendor.test"}, "host"),
    ],
)
def test_bad_settings_name_the_connection_and_field(fields, named):
    with pytest.raises(DicomIngestConfigError) as caught:
        DicomIngestConnectionConfig.from_connection(connection(**fields))

    message = str(caught.value)
    assert "'vendor_eu'" in message
    assert named in message
    assert CLIENT_SECRET not in message
    assert caught.value.__cause__ is None  # pydantic's error would quote the input values


def test_invalid_secret_type_never_appears_in_the_error():
    conn = connection(extra={"connect_timeout": CLIENT_SECRET})

    with pytest.raises(DicomIngestConfigError) as caught:
        DicomIngestConnectionConfig.from_connection(conn)

    assert CLIENT_SECRET not in str(caught.value)


def test_hook_reads_an_airflow_conn_environment_variable(monkeypatch):
    set_connection(monkeypatch, "vendor_us", host="https://us.vendor.test", upload_concurrency=5)

    hook = DicomIngestHook(dicom_ingest_conn_id="vendor_us")

    assert hook.config.base_url == "https://us.vendor.test"
    assert hook.config.upload_concurrency == 5
    hook.close()


def test_hook_reports_bad_extras_as_config_error(monkeypatch):
    set_connection(monkeypatch, "vendor_bad", token_method="DELETE")

    with pytest.raises(DicomIngestConfigError, match=r"'vendor_bad'.*token_method"):
        DicomIngestHook(dicom_ingest_conn_id="vendor_bad").get_conn()


def test_test_connection_reports_bad_extras(monkeypatch):
    set_connection(monkeypatch, "vendor_bad", read_timeout=-3)

    ok, message = DicomIngestHook(dicom_ingest_conn_id="vendor_bad").test_connection()

    assert not ok
    assert "read_timeout" in message
