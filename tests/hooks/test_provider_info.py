"""The ``dicom_ingest`` connection type as Airflow sees it: provider info, providers manager, UI form."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from importlib.metadata import entry_points

import pytest
from packaging.utils import canonicalize_name

from dicom_ingest.hooks.connection import DicomIngestConnectionConfig
from dicom_ingest.hooks.dicom_ingest import DicomIngestHook
from dicom_ingest.plugin import DicomIngestPlugin
from dicom_ingest.provider_info import get_provider_info

STANDARD_SETTINGS = {"conn_id", "base_url", "client_id", "client_secret"}
LABELS = {"host": "API base URL", "login": "Client ID", "password": "Client secret"}


@pytest.fixture(scope="module")
def connection_type() -> dict:
    (only,) = get_provider_info()["connection-types"]
    return only


def test_provider_info_names_the_distribution():
    info = get_provider_info()

    assert info["package-name"] == canonicalize_name("airflow-dicom-ingest")
    assert info["name"] and info["description"]
    (provider_entry_point,) = [
        entry
        for entry in entry_points(group="apache_airflow_provider")
        if entry.value.startswith("dicom_ingest")
    ]
    assert provider_entry_point.load() is get_provider_info


def test_connection_type_points_at_the_hook(connection_type):
    module_name, class_name = connection_type["hook-class-name"].rsplit(".", 1)
    hook_class = getattr(importlib.import_module(module_name), class_name)

    assert hook_class is DicomIngestHook
    assert connection_type["connection-type"] == hook_class.conn_type == "dicom_ingest"
    assert connection_type["hook-name"] == hook_class.hook_name == "DICOM Ingest"
    assert hook_class.conn_name_attr == "dicom_ingest_conn_id"
    assert hook_class.default_conn_name == "dicom_ingest_default"


def test_form_offers_every_extra_setting(connection_type):
    extras = set(DicomIngestConnectionConfig.model_fields) - STANDARD_SETTINGS

    assert set(connection_type["conn-fields"]) == extras
    for name, definition in connection_type["conn-fields"].items():
        assert definition["label"], name
        assert "null" in definition["schema"]["type"], name


def test_form_placeholders_are_the_real_defaults(connection_type):
    defaults = DicomIngestConnectionConfig(
        conn_id="c", base_url="https://x", client_id="i", client_secret="s"
    )
    placeholders = connection_type["ui-field-behaviour"]["placeholders"]

    assert placeholders["upload_path"] == defaults.upload_path
    assert placeholders["token_method"] == defaults.token_method
    assert placeholders["done_statuses"].split(",") == sorted(defaults.done_statuses)
    assert placeholders["failed_statuses"].split(",") == sorted(defaults.failed_statuses)
    assert int(placeholders["upload_concurrency"]) == defaults.upload_concurrency
    assert float(placeholders["read_timeout"]) == defaults.read_timeout


def test_form_relabels_and_hides_standard_fields(connection_type):
    behaviour = connection_type["ui-field-behaviour"]

    assert behaviour["relabeling"] == LABELS
    assert set(behaviour["hidden-fields"]) == {"schema", "port"}


def test_providers_manager_registers_the_connection_type():
    from airflow.providers_manager import ProvidersManager
    from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

    hook_info = ProvidersManagerTaskRuntime().hooks["dicom_ingest"]
    assert hook_info.hook_class_name == "dicom_ingest.hooks.dicom_ingest.DicomIngestHook"
    assert hook_info.connection_testable
    manager = ProvidersManager()
    assert "airflow-dicom-ingest" in manager.providers
    assert manager.field_behaviours["dicom_ingest"]["relabeling"] == LABELS
    assert "extra__dicom_ingest__token_method" in manager.connection_form_widgets


def test_plugin_is_registered_by_entry_point():
    (plugin_entry_point,) = [
        entry for entry in entry_points(group="airflow.plugins") if entry.name == "dicom_ingest"
    ]

    assert plugin_entry_point.load() is DicomIngestPlugin
    assert DicomIngestPlugin.name == "dicom_ingest"


@pytest.fixture(scope="module")
def ui_client() -> Iterator:
    """Airflow's API app in-process, with the user dependency answered as an admin (no database)."""
    from airflow.api_fastapi.app import create_app
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from airflow.api_fastapi.core_api.security import get_user
    from fastapi.testclient import TestClient

    app = create_app(apps="core")
    app.dependency_overrides[get_user] = lambda: SimpleAuthManagerUser(username="admin", role="admin")
    with TestClient(app) as client:
        yield client


@pytest.mark.slow
def test_ui_hook_metadata_lists_the_connection_form(ui_client):
    response = ui_client.get("/ui/connections/hook_meta")

    assert response.status_code == 200
    (meta,) = [entry for entry in response.json() if entry["connection_type"] == "dicom_ingest"]
    assert meta["hook_name"] == "DICOM Ingest"
    assert meta["hook_class_name"] == "dicom_ingest.hooks.dicom_ingest.DicomIngestHook"
    standard = meta["standard_fields"]
    assert {name: standard[name]["title"] for name in LABELS} == LABELS
    assert standard["host"]["placeholder"] == "https://api.vendor.example"
    assert standard["port"]["hidden"] and standard["url_schema"]["hidden"]
    extra = meta["extra_fields"]
    assert extra["token_method"]["schema"]["title"] == "Token method"
    assert extra["token_method"]["schema"]["enum"] == ["GET", "POST", None]
    assert "Default: /upload." in extra["upload_path"]["description"]
    assert set(extra) == set(DicomIngestConnectionConfig.model_fields) - STANDARD_SETTINGS
