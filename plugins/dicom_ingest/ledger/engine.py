"""Database engines for the ledger and the places its URL comes from.

SQLite (the default, one file per work location) is set up for several writer processes: WAL
journal, a busy timeout, and ``BEGIN IMMEDIATE`` for write transactions so writers queue for the
lock up front instead of failing when a read transaction tries to become a write transaction.
Commits are ``synchronous = NORMAL``: in WAL mode a commit survives a crash of the application
(the usual way a task dies), but not a power cut or an operating-system crash, which can undo the
last transactions before it. The ledger then knows less than happened, never more: at worst a
study is sent again whole (and an order left partial by the lost attempt goes unrecorded). In
return a commit does not wait for the disk (an ``fsync`` per transaction).
PostgreSQL (for distributed workers) comes from an Airflow connection.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session

from dicom_ingest.ledger.errors import LedgerConfigError

SQLITE_FILE_NAME = "ledger.sqlite3"
"""File name used when the ledger location is a directory."""

SUPPORTED_BACKENDS = ("sqlite", "postgresql")
POSTGRES_CONN_TYPES = ("postgres", "postgresql")
POSTGRES_DRIVER = "postgresql+psycopg2"

SQLITE_SYNCHRONOUS = "NORMAL"
"""SQLite's syncing under WAL: durable across application crashes, not across power cuts."""

PSYCOPG2_EXECUTEMANY_MODE = "values_plus_batch"
"""Multi-row ``UPDATE`` statements go to the server in pages, not one round trip per row."""

WRITE_OPTION = "dicom_ingest_ledger_write"
"""Execution option marking an engine whose transactions write (``BEGIN IMMEDIATE`` on SQLite)."""

LIBPQ_EXTRA_KEYS = (
    "sslmode",
    "sslcert",
    "sslkey",
    "sslrootcert",
    "sslcrl",
    "connect_timeout",
    "application_name",
    "options",
    "target_session_attrs",
    "keepalives",
    "keepalives_idle",
)
"""Keys of a postgres connection's extra that are passed on to libpq."""

_SQLITE_LOCK_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})
_SQLITE_PRIMARY_CODE_MASK = 0xFF
_POSTGRES_TRANSIENT_SQLSTATES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "55P03",  # lock_not_available
    }
)


def create_ledger_engine(url: URL, *, busy_timeout: float) -> Engine:
    """Create the engine for a ledger URL, tuned for parallel writers.

    :param url: a SQLite or PostgreSQL SQLAlchemy URL.
    :param busy_timeout: seconds a SQLite writer waits for the lock before the attempt fails.
    """
    backend = url.get_backend_name()
    if backend not in SUPPORTED_BACKENDS:
        raise LedgerConfigError(
            f"the ledger needs SQLite or PostgreSQL, not {backend!r}; "
            "use a local path or a postgres connection"
        )
    if backend == "sqlite":
        engine = create_engine(url, hide_parameters=True, connect_args={"timeout": busy_timeout})
        _serialise_sqlite_writers(engine, busy_timeout)
        return engine
    options = {"executemany_mode": PSYCOPG2_EXECUTEMANY_MODE} if url.get_driver_name() == "psycopg2" else {}
    return create_engine(url, hide_parameters=True, pool_pre_ping=True, **options)


def _serialise_sqlite_writers(engine: Engine, busy_timeout: float) -> None:
    """Take over transaction control from ``sqlite3`` so writes begin with ``BEGIN IMMEDIATE``."""

    @event.listens_for(engine, "connect")
    def _configure_connection(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        """Leave BEGIN to SQLAlchemy, set the busy timeout, switch to the WAL journal and its syncing."""
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute(f"PRAGMA synchronous = {SQLITE_SYNCHRONOUS}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: object) -> None:
        """Begin write transactions with ``BEGIN IMMEDIATE``, read transactions deferred."""
        writes = connection.get_execution_options().get(WRITE_OPTION, False)  # type: ignore[attr-defined]
        connection.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN DEFERRED")  # type: ignore[attr-defined]


def dialect_insert(session: Session) -> Callable[..., sqlite.Insert | postgresql.Insert]:
    """Return the ``insert`` construct (with ``ON CONFLICT`` support) of the session's database.

    :param session: a session bound to a ledger engine.
    """
    return sqlite.insert if session.get_bind().dialect.name == "sqlite" else postgresql.insert


def is_transient(exc: BaseException) -> bool:
    """Tell whether a database error goes away by running the same transaction again.

    SQLite's busy or locked database, PostgreSQL's deadlock, serialization and lock-timeout
    failures, and dropped connections qualify; anything else is a real error.

    :param exc: the exception raised by SQLAlchemy.
    """
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    sqlite_code = getattr(exc.orig, "sqlite_errorcode", None)
    if sqlite_code is not None:
        return sqlite_code & _SQLITE_PRIMARY_CODE_MASK in _SQLITE_LOCK_CODES
    sqlstate = getattr(exc.orig, "pgcode", None) or getattr(exc.orig, "sqlstate", None)
    return sqlstate in _POSTGRES_TRANSIENT_SQLSTATES


def url_for_location(location: str | os.PathLike[str]) -> URL:
    """Turn a work location into a ledger URL.

    A directory (existing, or written with a trailing slash) holds ``ledger.sqlite3``; another
    local path or ``file://`` URI names the SQLite file itself; a ``sqlite://`` or
    ``postgresql://`` URL is used as given. Object-store URIs are refused: SQLite needs a local
    file system.

    :param location: a path, ``file://`` URI or SQLAlchemy URL.
    """
    text = os.fspath(location)
    scheme, separator, _ = text.partition("://")
    if separator and scheme != "file":
        try:
            url = make_url(text)
        except ArgumentError as exc:
            raise LedgerConfigError(f"the ledger location {scheme}://... is not a database URL") from exc
        if url.get_backend_name() not in SUPPORTED_BACKENDS:
            raise LedgerConfigError(
                f"the ledger cannot live at a {scheme}:// location; use a local path or a PostgreSQL URL"
            )
        return url
    path = Path(unquote(urlsplit(text).path) if separator else text).expanduser()
    if path.is_dir() or text.endswith(("/", os.sep)):
        path = path / SQLITE_FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    return URL.create("sqlite", database=str(path.resolve()))


def url_from_airflow_connection(conn_id: str) -> URL:
    """Build a PostgreSQL URL from an Airflow connection of type ``postgres``.

    The connection's ``schema`` is the database; SSL and other libpq settings come from its
    extra. The password stays inside the returned URL, which renders it masked.

    :param conn_id: id of the Airflow connection.
    """
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        connection = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException as exc:
        raise LedgerConfigError(f"the Airflow connection {conn_id!r} for the ledger does not exist") from exc
    if connection.conn_type not in POSTGRES_CONN_TYPES:
        raise LedgerConfigError(
            f"the Airflow connection {conn_id!r} has type {connection.conn_type!r}; "
            "the ledger needs a postgres connection"
        )
    extra = connection.extra_dejson
    query = {key: str(extra[key]) for key in LIBPQ_EXTRA_KEYS if extra.get(key) not in (None, "")}
    return URL.create(
        POSTGRES_DRIVER,
        username=connection.login or None,
        password=connection.password or None,
        host=connection.host or None,
        port=connection.port or None,
        database=connection.schema or None,
        query=query,
    )
