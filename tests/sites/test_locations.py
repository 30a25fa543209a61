"""Run-time resolution of locations: ``${NAME}`` expansion, ``$AIRFLOW_HOME`` anchoring, the ledger."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_ingest.exceptions import DicomIngestConfigError
from dicom_ingest.sites import SiteConfig, expand_env, resolve_ledger, resolve_location
from dicom_ingest.sites.locations import LEDGER_CONN_ID_ENV, LedgerTarget, UnsetVariableError
from tests.sites.conftest import MINIMAL_ENTRY


@pytest.mark.parametrize(
    ("text", "environ", "expected"),
    [
        ("/data/${SITE}/in", {"SITE": "lyon"}, "/data/lyon/in"),
        ("${ROOT}/${SITE}", {"ROOT": "/srv", "SITE": "lyon"}, "/srv/lyon"),
        ("${ROOT:-/default}/x", {}, "/default/x"),
        ("${ROOT:-/default}/x", {"ROOT": ""}, "/default/x"),
        ("${ROOT:-/default}/x", {"ROOT": "/set"}, "/set/x"),
        ("${ROOT:-}/x", {}, "/x"),
        ("s3://bucket/{{ ds }}/$HOME", {}, "s3://bucket/{{ ds }}/$HOME"),
    ],
)
def test_environment_references_are_expanded(text: str, environ: dict[str, str], expected: str) -> None:
    assert expand_env(text, environ) == expected


def test_unset_variable_without_default_is_an_error_naming_it() -> None:
    with pytest.raises(UnsetVariableError, match="STAGING_ROOT is not set") as caught:
        expand_env("${STAGING_ROOT}/lyon", {})
    assert isinstance(caught.value, DicomIngestConfigError)


def test_expansion_reads_the_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOM_INGEST_TEST_ROOT", "/from/env")
    assert expand_env("${DICOM_INGEST_TEST_ROOT}/x") == "/from/env/x"


def test_relative_path_is_anchored_at_airflow_home() -> None:
    environ = {"AIRFLOW_HOME": "/opt/airflow", "SITE": "lyon"}
    assert resolve_location("dicom_ingest/${SITE}/work", environ) == "/opt/airflow/dicom_ingest/lyon/work"


def test_airflow_home_defaults_like_airflow_does(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_location("reports", {}) == str(tmp_path / "airflow" / "reports")


def test_absolute_and_home_paths_are_kept_absolute(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    environ = {"AIRFLOW_HOME": "/opt/airflow"}
    assert resolve_location("/data/lyon", environ) == "/data/lyon"
    assert resolve_location("~/staging", environ) == str(tmp_path / "staging")


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("s3://conn@bucket/${SITE}/", "s3://conn@bucket/lyon/"),
        ("file:///data/${SITE}", "file:///data/lyon"),
        ("${SCHEME_ROOT}/x", "s3://bucket/x"),
    ],
)
def test_uris_are_expanded_but_not_anchored(location: str, expected: str) -> None:
    environ = {"AIRFLOW_HOME": "/opt/airflow", "SITE": "lyon", "SCHEME_ROOT": "s3://bucket"}
    assert resolve_location(location, environ) == expected


def site(**overrides: object) -> SiteConfig:
    """Validate the minimal entry with ``overrides`` applied."""
    return SiteConfig.model_validate({**MINIMAL_ENTRY, **overrides})


def test_ledger_connection_of_the_site_wins_over_the_environment() -> None:
    environ = {LEDGER_CONN_ID_ENV: "deployment_pg"}
    assert resolve_ledger(site(ledger={"conn_id": "site_pg"}), environ) == LedgerTarget(conn_id="site_pg")


def test_ledger_file_of_the_site_wins_over_the_environment() -> None:
    environ = {LEDGER_CONN_ID_ENV: "deployment_pg", "AIRFLOW_HOME": "/opt/airflow"}
    target = resolve_ledger(site(ledger={"path": "ledgers/lyon.sqlite"}), environ)
    assert target == LedgerTarget(path="/opt/airflow/ledgers/lyon.sqlite")


def test_ledger_defaults_to_the_deployment_connection_when_set() -> None:
    assert resolve_ledger(site(), {LEDGER_CONN_ID_ENV: "deployment_pg"}) == LedgerTarget(
        conn_id="deployment_pg"
    )


def test_ledger_defaults_to_a_sqlite_file_per_site() -> None:
    target = resolve_ledger(site(), {"AIRFLOW_HOME": "/opt/airflow"})
    assert target == LedgerTarget(path="/opt/airflow/dicom_ingest/lyon/ledger.sqlite")
