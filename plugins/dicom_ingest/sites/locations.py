"""Turn the location strings of a site's configuration into concrete paths and URIs at run time.

The sites file keeps locations exactly as written, so parsing a DAG file never depends on the
environment of the process that parses it. Two kinds of placeholder may appear in a location:

* Jinja, such as ``{{ ds }}``: rendered by Airflow in templated operator fields, as usual.
* ``${NAME}`` and ``${NAME:-default}``: replaced by the environment variable ``NAME`` (or by
  ``default`` when it is unset or empty) when a task runs, by :func:`resolve_location`. A
  reference without a default to an unset variable is an error, never an empty string.

After expansion, a location without a URI scheme is a local path; a relative one is taken
relative to ``$AIRFLOW_HOME`` (``~/airflow`` when unset, as Airflow itself does), so every
Airflow component of a deployment agrees on it whatever its working directory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_ingest.exceptions import DicomIngestConfigError

if TYPE_CHECKING:
    from dicom_ingest.sites.config import SiteConfig

ENV_REFERENCE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")
"""``${NAME}`` or ``${NAME:-default}``; the default cannot contain ``}``."""

URI_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")

LEDGER_CONN_ID_ENV = "DICOM_INGEST_LEDGER_CONN_ID"
"""Environment variable naming the PostgreSQL connection of sites that do not set ``ledger``."""

DEFAULT_AIRFLOW_HOME = "~/airflow"


class UnsetVariableError(DicomIngestConfigError):
    """A location refers to an environment variable that is not set and has no default."""


def expand_env(text: str, environ: Mapping[str, str] | None = None) -> str:
    """Replace every ``${NAME}`` and ``${NAME:-default}`` in ``text`` from the environment.

    :param text: a location as written in the sites file (or after Jinja rendering).
    :param environ: the variables to use; the process environment when omitted.
    :raises UnsetVariableError: a ``${NAME}`` without default refers to an unset variable.
    """
    variables = os.environ if environ is None else environ

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group("name"), match.group("default")
        value = variables.get(name, "")
        if value:
            return value
        if default is not None:
            return default
        raise UnsetVariableError(f"environment variable {name} is not set (write ${{{name}:-default}})")

    return ENV_REFERENCE.sub(substitute, text)


def airflow_home(environ: Mapping[str, str] | None = None) -> Path:
    """Return ``$AIRFLOW_HOME``, or ``~/airflow`` when it is unset, as an absolute path.

    :param environ: the variables to use; the process environment when omitted.
    """
    variables = os.environ if environ is None else environ
    return Path(variables.get("AIRFLOW_HOME") or DEFAULT_AIRFLOW_HOME).expanduser().absolute()


def uri_scheme(location: str) -> str | None:
    """Return the lower-case URI scheme of ``location`` (``"s3"``, ``"file"``), or ``None`` for a path.

    :param location: a path or URI.
    """
    match = URI_SCHEME.match(location)
    return match.group("scheme").lower() if match else None


def resolve_location(location: str, environ: Mapping[str, str] | None = None) -> str:
    """Expand environment references and anchor a relative local path at ``$AIRFLOW_HOME``.

    URIs (``s3://...``, ``file://...``) are returned expanded but otherwise unchanged; local
    paths come back absolute, with ``~`` expanded. Jinja must have been rendered already.

    :param location: a location from the sites file.
    :param environ: the variables to use; the process environment when omitted.
    :raises UnsetVariableError: a ``${NAME}`` without default refers to an unset variable.
    """
    expanded = expand_env(location, environ)
    if uri_scheme(expanded) is not None:
        return expanded
    path = Path(expanded).expanduser()
    if not path.is_absolute():
        path = airflow_home(environ) / path
    return str(path)


@dataclass(frozen=True)
class LedgerTarget:
    """Where a site's ledger lives: exactly one of a SQLite file and an Airflow connection.

    :param path: absolute path of the SQLite file, or ``None``.
    :param conn_id: id of the Airflow connection to the PostgreSQL database, or ``None``.
    """

    path: str | None = None
    conn_id: str | None = None


def resolve_ledger(site: SiteConfig, environ: Mapping[str, str] | None = None) -> LedgerTarget:
    """Return the ledger a site uses at run time.

    In order: the site's ``ledger.conn_id``; its ``ledger.path``; the connection named by
    ``$DICOM_INGEST_LEDGER_CONN_ID`` (how a distributed deployment puts every site's ledger on
    PostgreSQL without editing the sites file); a SQLite file under the site's data folder.

    :param site: the site's validated configuration.
    :param environ: the variables to use; the process environment when omitted.
    """
    variables = os.environ if environ is None else environ
    if site.ledger.conn_id:
        return LedgerTarget(conn_id=site.ledger.conn_id)
    if site.ledger.path:
        return LedgerTarget(path=resolve_location(site.ledger.path, variables))
    if variables.get(LEDGER_CONN_ID_ENV):
        return LedgerTarget(conn_id=variables[LEDGER_CONN_ID_ENV])
    return LedgerTarget(path=resolve_location(site.default_ledger_path, variables))
