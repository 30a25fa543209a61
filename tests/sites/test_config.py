"""The site configuration models: defaults, every validation rule, and the whole-file model."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest
from pydantic import ValidationError

from dicom_ingest.sites.config import (
    DEFAULT_POOL,
    DEFAULT_REQUIRED_METADATA,
    DEFAULT_START_DATE,
    DEFAULT_TAG_MAPPING,
    SINGLE_PUT_MAX_BYTES,
    SiteConfig,
    SitesFile,
)
from tests.sites.conftest import MINIMAL_ENTRY


def site(**overrides: Any) -> SiteConfig:
    """Validate the minimal entry with ``overrides`` applied."""
    return SiteConfig.model_validate({**MINIMAL_ENTRY, **overrides})


def rejection(**overrides: Any) -> list[dict[str, Any]]:
    """Return pydantic's errors for the minimal entry with ``overrides``, failing if it validates."""
    with pytest.raises(ValidationError) as caught:
        site(**overrides)
    return caught.value.errors()


def error_fields(**overrides: Any) -> set[tuple[str | int, ...]]:
    """Return the locations pydantic reports for the minimal entry with ``overrides``."""
    return {tuple(error["loc"]) for error in rejection(**overrides)}


def test_minimal_entry_gets_the_documented_defaults() -> None:
    config = site()

    assert config.enabled is True
    assert config.timezone == "UTC"
    assert config.start_date == DEFAULT_START_DATE
    assert config.catchup is False
    assert config.required_metadata == DEFAULT_REQUIRED_METADATA
    assert config.metadata.tags == DEFAULT_TAG_MAPPING
    assert config.metadata.sidecar == "metadata.json"
    assert config.metadata.manifest is None
    assert config.metadata.manifest_key == "StudyInstanceUID"
    assert config.upload_concurrency == 8
    assert config.quarantine.policy == "record"
    assert config.invalid_threshold.max_fraction == 0.1
    assert config.invalid_threshold.max_count is None
    assert config.batch.max_instances == 5000
    assert config.batch.max_bytes == 20 * 2**30
    assert config.max_active_batches == 2
    assert config.pool == DEFAULT_POOL
    assert config.retries == 2
    assert config.retry_delay_seconds == 60
    assert config.max_file_size == SINGLE_PUT_MAX_BYTES
    assert config.work_location == "dicom_ingest/lyon/work"
    assert config.reports_location == "dicom_ingest/lyon/reports"
    assert (config.ledger.path, config.ledger.conn_id) == (None, None)
    assert config.default_ledger_path == "dicom_ingest/lyon/ledger.sqlite"
    assert (config.sensor.poke_interval, config.sensor.timeout) == (60, 6 * 3600)
    assert config.dag_id == "dicom_ingest__lyon"


def test_every_key_of_a_full_entry_is_kept() -> None:
    full = {
        "id": "paris_nord",
        "enabled": False,
        "schedule": "30 1 * * 1-5",
        "timezone": "Europe/Paris",
        "start_date": "2024-06-01",
        "catchup": True,
        "staging": "s3://aws_paris@paris-staging/out/{{ ds }}/",
        "conn_id": "vendor_paris",
        "required_metadata": ["patient_age", "referral_code"],
        "metadata": {
            "tags": {"patient_age": "PatientAge"},
            "sidecar": None,
            "manifest": "s3://aws_paris@paris-staging/manifest.csv",
            "manifest_key": "AccessionNumber",
        },
        "upload_concurrency": 20,
        "quarantine": {"policy": "move", "location": "${QUARANTINE_ROOT}/paris"},
        "invalid_threshold": {"max_fraction": None, "max_count": 25},
        "batch": {"max_instances": 100, "max_bytes": "500MB"},
        "max_active_batches": 4,
        "pool": "vendor_eu",
        "retries": 0,
        "retry_delay_seconds": 30,
        "owner": "radiology",
        "tags": ["paris", "nightly"],
        "max_file_size": "1GiB",
        "scan_processes": 4,
        "scan_threads": 8,
        "work_location": "file:///scratch/paris",
        "reports_location": "/reports/paris",
        "ledger": {"conn_id": "ledger_pg"},
        "sensor": {"poke_interval": 5, "timeout": 600},
    }

    dumped = SiteConfig.model_validate(full).model_dump(mode="json")

    assert dumped == {
        **full,
        "batch": {"max_instances": 100, "max_bytes": 500_000_000},
        "max_file_size": 2**30,
        "ledger": {"path": None, "conn_id": "ledger_pg"},
    }


def test_frozen_configuration_refuses_assignment() -> None:
    config = site()
    with pytest.raises(ValidationError):
        config.upload_concurrency = 3


@pytest.mark.parametrize("schedule", ["@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly"])
def test_airflow_presets_are_accepted(schedule: str) -> None:
    assert site(schedule=schedule).schedule == schedule


@pytest.mark.parametrize("schedule", ["0 2 * * *", "*/15 6-18 * * mon-fri", "0 0 1 */3 *", "5 4 L * *"])
def test_cron_expressions_are_accepted(schedule: str) -> None:
    assert site(schedule=schedule).schedule == schedule


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ("61 * * * *", "invalid cron expression"),
        ("0 0 * * 8", "invalid cron expression"),
        ("a b c d e", "invalid cron expression"),
        ("* * * *", "five fields"),
        ("0 0 0 * * *", "five fields"),
        ("daily", "five fields"),
        ("@fortnightly", "unknown preset"),
        ("@once", "unknown preset"),
        ("0 0 30 2 *", "never fires"),
        ("", "at least 1 character"),
    ],
)
def test_bad_schedules_are_rejected(schedule: str, message: str) -> None:
    errors = rejection(schedule=schedule)
    assert [tuple(error["loc"]) for error in errors] == [("schedule",)]
    assert message in errors[0]["msg"]


@pytest.mark.parametrize("timezone", ["UTC", "Europe/Paris", "America/Argentina/Buenos_Aires", "Etc/GMT+5"])
def test_iana_timezones_are_accepted(timezone: str) -> None:
    assert site(timezone=timezone).timezone == timezone


@pytest.mark.parametrize("timezone", ["Mars/Olympus_Mons", "utc", "CEST", "/etc/passwd", "../UTC", ""])
def test_unknown_timezones_are_rejected(timezone: str) -> None:
    assert error_fields(timezone=timezone) == {("timezone",)}


@pytest.mark.parametrize(
    "location",
    [
        "/data/lyon",
        "relative/staging",
        "file:///data/lyon",
        "s3://bucket/prefix/",
        "s3://aws_lyon@bucket/{{ ds }}/",
        "${STAGING_ROOT}/{{ ds_nodash }}",
        "${STAGING_ROOT:-/srv/staging}/lyon",
        "/data/{% if params.full %}all{% else %}{{ ds }}{% endif %}",
    ],
)
def test_well_formed_locations_are_kept_verbatim(location: str) -> None:
    assert site(staging=location).staging == location


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("ftp://host/data", "not supported"),
        ("gs://bucket/data", "not supported"),
        ("s3:///prefix", "needs a bucket"),
        ("s3://conn@/prefix", "needs a bucket"),
        ("/data/{{ ds }", "unbalanced Jinja"),
        ("/data/{% if x }", "unbalanced Jinja"),
        ("${STAGING_ROOT/data", "malformed environment reference"),
        ("${1ROOT}/data", "malformed environment reference"),
        (" /data/lyon", "blanks"),
    ],
)
def test_malformed_locations_are_rejected(location: str, message: str) -> None:
    errors = rejection(staging=location)
    assert [tuple(error["loc"]) for error in errors] == [("staging",)]
    assert message in errors[0]["msg"]


def test_credentials_in_a_location_are_rejected_without_being_repeated() -> None:
    errors = rejection(staging="s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/data")

    assert [tuple(error["loc"]) for error in errors] == [("staging",)]
    assert "credentials" in errors[0]["msg"]
    assert "wJalrXUtnFEMI" not in errors[0]["msg"]


@pytest.mark.parametrize("site_id", ["Lyon", "lyon-nord", "lyon nord", "", "x" * 65, "é"])
def test_site_ids_must_be_short_lowercase_slugs(site_id: str) -> None:
    assert error_fields(id=site_id) == {("id",)}


def test_missing_required_keys_are_each_reported() -> None:
    with pytest.raises(ValidationError) as caught:
        SiteConfig.model_validate({"enabled": True})

    missing = {tuple(error["loc"]) for error in caught.value.errors() if error["type"] == "missing"}
    assert missing == {("id",), ("schedule",), ("staging",), ("conn_id",)}


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"upload_concurrency": 0}, ("upload_concurrency",)),
        ({"upload_concurrency": 21}, ("upload_concurrency",)),
        ({"max_active_batches": 0}, ("max_active_batches",)),
        ({"retries": -1}, ("retries",)),
        ({"retry_delay_seconds": -5}, ("retry_delay_seconds",)),
        ({"max_file_size": "6GiB"}, ("max_file_size",)),
        ({"max_file_size": 0}, ("max_file_size",)),
        ({"batch": {"max_instances": 0}}, ("batch", "max_instances")),
        ({"batch": {"max_bytes": "lots"}}, ("batch", "max_bytes")),
        ({"invalid_threshold": {"max_fraction": 1.5}}, ("invalid_threshold", "max_fraction")),
        ({"invalid_threshold": {"max_count": -1}}, ("invalid_threshold", "max_count")),
        ({"sensor": {"poke_interval": 0}}, ("sensor", "poke_interval")),
        ({"sensor": {"timeout": -1}}, ("sensor", "timeout")),
        ({"pool": ""}, ("pool",)),
        ({"owner": ""}, ("owner",)),
        ({"tags": ["ok", ""]}, ("tags", 1)),
        ({"tags": ["dup", "dup"]}, ("tags",)),
        ({"conn_id": "has space"}, ("conn_id",)),
        ({"start_date": "yesterday"}, ("start_date",)),
        ({"catchup": "sometimes"}, ("catchup",)),
        ({"quarantine": {"policy": "delete"}}, ("quarantine", "policy")),
        ({"metadata": {"manifest_key": "PatientID"}}, ("metadata", "manifest_key")),
        ({"metadata": {"sidecar": "meta/data.json"}}, ("metadata", "sidecar")),
        ({"metadata": {"sidecar": ".."}}, ("metadata", "sidecar")),
        ({"metadata": {"tags": {"patient_age": "Patient Age"}}}, ("metadata", "tags", "patient_age")),
        ({"metadata": {"tags": {"PatientAge": "PatientAge"}}}, ("metadata", "tags", "PatientAge", "[key]")),
        ({"required_metadata": ["PatientAge"]}, ("required_metadata", 0)),
        ({"ledger": "ledger_pg"}, ("ledger",)),
    ],
)
def test_out_of_range_values_are_rejected_at_their_field(
    overrides: dict[str, Any], field: tuple[str | int, ...]
) -> None:
    assert error_fields(**overrides) == {field}


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"upload_concurency": 3}, ("upload_concurency",)),
        ({"quarantine": {"policy": "record", "path": "/q"}}, ("quarantine", "path")),
        ({"metadata": {"sidecars": "x.json"}}, ("metadata", "sidecars")),
        ({"batch": {"max_studies": 3}}, ("batch", "max_studies")),
        ({"sensor": {"mode": "poke"}}, ("sensor", "mode")),
        ({"ledger": {"url": "sqlite://"}}, ("ledger", "url")),
    ],
)
def test_unknown_keys_are_errors_in_every_section(
    overrides: dict[str, Any], field: tuple[str | int, ...]
) -> None:
    errors = rejection(**overrides)
    assert [(tuple(error["loc"]), error["type"]) for error in errors] == [(field, "extra_forbidden")]


def test_copy_and_move_need_a_quarantine_location() -> None:
    assert site(quarantine={"policy": "record"}).quarantine.location is None
    assert site(quarantine={"policy": "copy", "location": "/q"}).quarantine.location == "/q"
    for policy in ("copy", "move"):
        errors = rejection(quarantine={"policy": policy})
        assert [tuple(error["loc"]) for error in errors] == [("quarantine",)]
        assert "needs a location" in errors[0]["msg"]


def test_ledger_takes_a_file_or_a_connection_but_not_both() -> None:
    assert site(ledger={"path": "/var/lib/ledger.sqlite"}).ledger.path == "/var/lib/ledger.sqlite"
    assert site(ledger={"conn_id": "ledger_pg"}).ledger.conn_id == "ledger_pg"
    errors = rejection(ledger={"path": "/var/lib/ledger.sqlite", "conn_id": "ledger_pg"})
    assert [tuple(error["loc"]) for error in errors] == [("ledger",)]
    assert "not both" in errors[0]["msg"]


def test_byte_sizes_accept_units_and_plain_numbers() -> None:
    config = site(batch={"max_bytes": "1.5GiB"}, max_file_size=4096)
    assert config.batch.max_bytes == int(1.5 * 2**30)
    assert config.max_file_size == 4096


def test_tag_mapping_replaces_the_default_as_a_whole() -> None:
    config = site(metadata={"tags": {"patient_age": "PatientAge"}}, required_metadata=["patient_age"])
    assert config.metadata.tags == {"patient_age": "PatientAge"}


def test_required_metadata_may_be_empty() -> None:
    assert site(required_metadata=[]).required_metadata == ()


def test_required_metadata_must_not_repeat_a_field() -> None:
    errors = rejection(required_metadata=["patient_age", "patient_age"])
    assert [tuple(error["loc"]) for error in errors] == [("required_metadata",)]
    assert "patient_age" in errors[0]["msg"]


def test_required_field_without_any_source_is_rejected() -> None:
    no_files = {"tags": {"patient_age": "PatientAge"}, "sidecar": None}

    errors = rejection(metadata=no_files, required_metadata=["patient_age", "patient_weight"])

    assert [tuple(error["loc"]) for error in errors] == [("required_metadata",)]
    assert "no metadata source provides patient_weight:" in errors[0]["msg"]


@pytest.mark.parametrize(
    "metadata",
    [
        {"tags": {"patient_weight": "PatientWeight"}, "sidecar": None},
        {"tags": {}, "sidecar": "order.json"},
        {"tags": {}, "sidecar": None, "manifest": "/data/manifest.csv"},
    ],
)
def test_any_configured_source_may_supply_a_required_field(metadata: dict[str, Any]) -> None:
    assert site(metadata=metadata, required_metadata=["patient_weight"]).required_metadata == (
        "patient_weight",
    )


def test_start_date_is_a_date() -> None:
    assert site(start_date="2024-02-29").start_date == date(2024, 2, 29)


def test_sites_file_model_accepts_unique_ids_and_x_keys() -> None:
    document = SitesFile.model_validate(
        {
            "x-defaults": {"conn_id": "dicom_ingest_default"},
            "sites": [MINIMAL_ENTRY, {**MINIMAL_ENTRY, "id": "paris", "enabled": False}],
        }
    )
    assert [entry.id for entry in document.sites] == ["lyon", "paris"]
    assert [entry.id for entry in document.enabled_sites] == ["lyon"]


def test_sites_file_model_rejects_repeated_ids() -> None:
    with pytest.raises(ValidationError, match="lyon appear more than once"):
        SitesFile.model_validate({"sites": [MINIMAL_ENTRY, {**MINIMAL_ENTRY, "staging": "/other"}]})


def test_sites_file_model_rejects_other_top_level_keys() -> None:
    with pytest.raises(ValidationError, match="unknown top-level keys defaults"):
        SitesFile.model_validate({"defaults": {}, "sites": [MINIMAL_ENTRY]})


def test_sites_file_model_needs_a_sites_list() -> None:
    with pytest.raises(ValidationError) as caught:
        SitesFile.model_validate({})
    assert [tuple(error["loc"]) for error in caught.value.errors()] == [("sites",)]
