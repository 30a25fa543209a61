"""Fixtures running every ledger test on SQLite and on PostgreSQL.

PostgreSQL tests use a database created for the test session
(``dicom_ingest_test_<random>``) and dropped at its end; each test starts without ledger tables.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import URL, create_engine, make_url

from dicom_ingest.ledger import Ledger
from dicom_ingest.ledger.models import LedgerBase
from tests.ledger.support import FakeClock
from tests.services import require_postgres

POSTGRES_ADMIN_URL = make_url("postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
LEASE = timedelta(minutes=2)

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
]


@pytest.fixture(scope="session")
def postgres_database_url() -> Iterator[URL]:
    """Create a fresh PostgreSQL database for the test session and drop it afterwards."""
    require_postgres()
    name = f"dicom_ingest_test_{secrets.token_hex(6)}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield POSTGRES_ADMIN_URL.set(database=name)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture
def empty_postgres_url(postgres_database_url: URL) -> Iterator[URL]:
    """Yield the session's PostgreSQL database and drop the ledger's tables after the test."""
    yield postgres_database_url
    engine = create_engine(postgres_database_url)
    try:
        LedgerBase.metadata.drop_all(engine)
    finally:
        engine.dispose()


@pytest.fixture(params=BACKENDS)
def ledger_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Return the URL of an empty ledger database, on each backend in turn."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'ledger.sqlite3'}"
    url: URL = request.getfixturevalue("empty_postgres_url")
    return url.render_as_string(hide_password=False)


@pytest.fixture
def clock() -> FakeClock:
    """Return a clock the test moves by hand."""
    return FakeClock()


@pytest.fixture
def ledger(ledger_url: str, clock: FakeClock) -> Iterator[Ledger]:
    """Open a ledger on the test's database with a controllable clock."""
    with Ledger(ledger_url, clock=clock, lease=LEASE) as opened:
        yield opened
