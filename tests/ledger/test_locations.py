"""Where the ledger lives: locations, Airflow connections, schema creation on first use."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import URL, create_engine, inspect, make_url, text

from dicom_ingest.ledger import Ledger, LedgerConfigError
from dicom_ingest.ledger.models import TABLE_PREFIX
from tests.ledger.support import BATCH, RUN, SITE, planned_study

LEDGER_TABLES = {f"{TABLE_PREFIX}instances", f"{TABLE_PREFIX}studies", f"{TABLE_PREFIX}events"}
CONN_ID = "dicom_ingest_ledger_test"
PASSWORD = "Pa55-not-for-logs"


def test_tables_are_created_on_first_use(ledger_url: str) -> None:
    inspector_engine = create_engine(ledger_url)
    try:
        with Ledger(ledger_url) as ledger:
            assert not LEDGER_TABLES & set(inspect(inspector_engine).get_table_names())
            ledger.record_plan(SITE, RUN, BATCH, [planned_study(1)])
            assert set(inspect(inspector_engine).get_table_names()) >= LEDGER_TABLES
        with Ledger(ledger_url) as reopened:
            assert reopened.site_summary(SITE).studies == 1
    finally:
        inspector_engine.dispose()


def test_sqlite_ledgers_use_the_wal_journal(tmp_path: Path) -> None:
    with Ledger.for_location(tmp_path) as ledger:
        ledger.done_studies(SITE, [])
        with ledger.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000


def test_a_directory_location_holds_the_ledger_file(tmp_path: Path) -> None:
    with Ledger.for_location(tmp_path) as ledger:
        ledger.record_plan(SITE, RUN, BATCH, [planned_study(1)])

    assert (tmp_path / "ledger.sqlite3").is_file()
    with Ledger.for_location(f"file://{tmp_path}/ledger.sqlite3") as reopened:
        assert reopened.site_summary(SITE).studies == 1


def test_a_new_directory_location_is_created(tmp_path: Path) -> None:
    with Ledger.for_location(f"{tmp_path}/work/paris/") as ledger:
        ledger.done_studies(SITE, [])

    assert (tmp_path / "work" / "paris" / "ledger.sqlite3").is_file()


def test_a_file_location_names_the_sqlite_file(tmp_path: Path) -> None:
    with Ledger.for_location(tmp_path / "state" / "paris.db") as ledger:
        ledger.done_studies(SITE, [])

    assert ledger.url.database == str(tmp_path / "state" / "paris.db")
    assert (tmp_path / "state" / "paris.db").is_file()


def test_a_database_url_location_is_used_as_given(ledger_url: str) -> None:
    with Ledger.for_location(ledger_url) as ledger:
        assert ledger.url == make_url(ledger_url)


@pytest.mark.parametrize("location", ["s3://bucket/work/", "mysql://user:pw@db/ledger", "not a url://at all"])
def test_locations_that_cannot_hold_the_ledger_are_refused(location: str) -> None:
    with pytest.raises(LedgerConfigError) as raised:
        Ledger.for_location(location)

    assert "pw" not in str(raised.value)


def test_a_non_positive_lease_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LedgerConfigError, match="lease"):
        Ledger(f"sqlite:///{tmp_path}/l.db", lease=timedelta(0))


@pytest.fixture
def postgres_connection(monkeypatch: pytest.MonkeyPatch, empty_postgres_url: URL) -> str:
    """Define an Airflow postgres connection to the test database, with a password, in the environment."""
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{CONN_ID.upper()}",
        json.dumps(
            {
                "conn_type": "postgres",
                "host": empty_postgres_url.host,
                "port": empty_postgres_url.port,
                "login": empty_postgres_url.username,
                "password": PASSWORD,
                "schema": empty_postgres_url.database,
                "extra": {"application_name": "dicom_ingest_ledger_test", "cursor": "dictcursor"},
            }
        ),
    )
    return CONN_ID


@pytest.mark.postgres
def test_a_ledger_opens_from_an_airflow_postgres_connection(
    postgres_connection: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG), Ledger.from_airflow_connection(postgres_connection) as ledger:
        ledger.record_plan(SITE, RUN, BATCH, [planned_study(1)])
        with ledger.engine.connect() as connection:
            application = connection.execute(text("SELECT current_setting('application_name')")).scalar()
        described = repr(ledger)

    assert ledger.url.drivername == "postgresql+psycopg2"
    assert ledger.url.password == PASSWORD
    assert application == "dicom_ingest_ledger_test"
    assert "cursor" not in ledger.url.query
    assert PASSWORD not in described
    assert PASSWORD not in caplog.text


def test_a_connection_of_another_type_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{CONN_ID.upper()}",
        json.dumps({"conn_type": "http", "host": "example.org", "password": PASSWORD}),
    )

    with pytest.raises(LedgerConfigError, match="type 'http'") as raised:
        Ledger.from_airflow_connection(CONN_ID)
    assert PASSWORD not in str(raised.value)


def test_a_missing_connection_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", raising=False)

    with pytest.raises(LedgerConfigError, match="does not exist"):
        Ledger.from_airflow_connection(CONN_ID)
