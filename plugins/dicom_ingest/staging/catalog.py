"""A scratch SQLite catalog of one scan: every classified file, sidecar and manifest row.

A scan of 100,000 files streams its records into this on-disk database instead of holding
them in memory; duplicates, studies and batches are then found with SQL, and results are read
back through cursors, one row at a time. The database is scratch space: it lives in a local
folder for the duration of one planning run and holds order metadata (patient data), so it is
deleted when the run ends.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from dicom_ingest.metadata.fields import FieldValue
from dicom_ingest.staging.classify import Classification, InstanceRecord, Reason

INSERT_CHUNK = 1_000
"""Rows buffered before one ``executemany``."""

_SCHEMA = """
CREATE TABLE files (
    seq INTEGER PRIMARY KEY,
    relative_path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    study_uid TEXT,
    series_uid TEXT,
    sop_uid TEXT,
    sop_class_uid TEXT,
    transfer_syntax_uid TEXT,
    reason TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX files_by_sop ON files (sop_uid) WHERE reason = 'valid';
CREATE INDEX files_by_study ON files (study_uid, relative_path);
CREATE TABLE study_tags (study_uid TEXT PRIMARY KEY, fields TEXT NOT NULL);
CREATE TABLE sidecars (folder TEXT PRIMARY KEY, relative_path TEXT NOT NULL);
CREATE TABLE manifest (key TEXT PRIMARY KEY, line INTEGER NOT NULL, fields TEXT NOT NULL);
CREATE TABLE studies (
    study_uid TEXT PRIMARY KEY,
    first_path TEXT NOT NULL,
    folder TEXT NOT NULL,
    instances INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
CREATE TABLE decisions (
    study_uid TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    reason TEXT,
    message TEXT,
    fields TEXT
);
"""

_RECORD_COLUMNS = (
    "relative_path",
    "size",
    "study_uid",
    "series_uid",
    "sop_uid",
    "sop_class_uid",
    "transfer_syntax_uid",
    "reason",
    "message",
)
_SELECT_RECORDS = f"SELECT {', '.join(_RECORD_COLUMNS)} FROM files"


class StudyStatus(StrEnum):
    """What planning decided for a study."""

    PLANNED = "planned"
    HELD_BACK = "held_back"
    SKIPPED_DONE = "skipped_done"


@dataclass(frozen=True)
class StudyRow:
    """A study as grouped from its valid instances.

    :param study_uid: StudyInstanceUID.
    :param folder: the deepest folder holding all its instances (``""`` for the root).
    :param instances: number of valid instances.
    :param bytes: their total size.
    :param fields: the resolved order metadata, once decided (patient data).
    """

    study_uid: str
    folder: str
    instances: int
    bytes: int
    fields: dict[str, FieldValue] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class StudyDecision:
    """What planning decided for one study.

    :param study_uid: StudyInstanceUID.
    :param status: the decision.
    :param reason: why it is held back, if it is.
    :param message: the explanation for held-back studies (no tag values).
    :param fields: the resolved order metadata (patient data).
    """

    study_uid: str
    status: StudyStatus
    reason: Reason | None = None
    message: str | None = None
    fields: dict[str, FieldValue] = field(default_factory=dict, repr=False)


def _common_folder(first_path: str, last_path: str) -> str:
    """Return the deepest folder holding both paths; for the sorted extremes, it holds all."""
    common: list[str] = []
    for first, last in zip(first_path.split("/")[:-1], last_path.split("/")[:-1], strict=False):
        if first != last:
            break
        common.append(first)
    return "/".join(common)


def _record_from_row(row: tuple[Any, ...]) -> InstanceRecord:
    values = dict(zip(_RECORD_COLUMNS, row, strict=True))
    values["reason"] = Reason(values["reason"])
    return InstanceRecord(**values)


def _folder_range(folder: str) -> tuple[str, list[str]]:
    """Return a SQL condition (and parameters) selecting the paths below ``folder``."""
    if not folder:
        return "1 = 1", []
    # '0' sorts right after '/', so [folder/, folder0) is exactly what lies below folder.
    return "relative_path >= ? AND relative_path < ?", [f"{folder}/", f"{folder}0"]


class ScanCatalog:
    """The scratch database of one scan.

    :param path: the database file to create (it must not exist yet).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode = OFF")
        self._db.execute("PRAGMA synchronous = OFF")
        self._db.executescript(_SCHEMA)
        self._pending_files: list[tuple[Any, ...]] = []
        self._pending_tags: list[tuple[str, str]] = []
        self._studies_per_folder: dict[str, int] = {}

    def close(self) -> None:
        """Close the database (the caller removes the file)."""
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- the scan ---------------------------------------------------------------------------

    def add(self, classification: Classification) -> None:
        """Buffer one classified file and the order metadata its tags carry.

        :param classification: the classifier's result.
        """
        record = classification.record
        self._pending_files.append(tuple(getattr(record, column) for column in _RECORD_COLUMNS))
        if classification.order_fields and record.study_uid:
            self._pending_tags.append((record.study_uid, json.dumps(classification.order_fields)))
        if len(self._pending_files) >= INSERT_CHUNK:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows."""
        with self._transaction():
            self._db.executemany(
                f"INSERT INTO files ({', '.join(_RECORD_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(_RECORD_COLUMNS))})",
                self._pending_files,
            )
            self._db.executemany("INSERT OR IGNORE INTO study_tags VALUES (?, ?)", self._pending_tags)
        self._pending_files.clear()
        self._pending_tags.clear()

    def add_sidecar(self, folder: str, relative_path: str) -> None:
        """Note the sidecar file of ``folder``.

        :param folder: the folder below the root (``""`` for the root).
        :param relative_path: the sidecar's path below the root.
        """
        self._db.execute("INSERT OR REPLACE INTO sidecars VALUES (?, ?)", (folder, relative_path))

    def add_manifest_row(self, key: str, line: int, fields: dict[str, FieldValue]) -> int | None:
        """Store a manifest row; return the line of an earlier row with the same key, if any.

        :param key: the row's StudyInstanceUID or AccessionNumber.
        :param line: the row's line in the manifest.
        :param fields: the row's normalised fields.
        """
        try:
            self._db.execute("INSERT INTO manifest VALUES (?, ?, ?)", (key, line, json.dumps(fields)))
        except sqlite3.IntegrityError:
            row = self._db.execute("SELECT line FROM manifest WHERE key = ?", (key,)).fetchone()
            return int(row[0])
        return None

    # -- duplicates -------------------------------------------------------------------------

    def repeated_sops(self) -> Iterator[str]:
        """Yield the SOPInstanceUIDs that more than one valid file carries."""
        rows = self._db.execute(
            "SELECT sop_uid FROM files WHERE reason = 'valid' "
            "GROUP BY sop_uid HAVING COUNT(*) > 1 ORDER BY sop_uid"
        ).fetchall()
        for (sop_uid,) in rows:
            yield sop_uid

    def files_of_sop(self, sop_uid: str) -> list[InstanceRecord]:
        """Return the valid files carrying ``sop_uid``, in path order.

        :param sop_uid: a SOPInstanceUID.
        """
        rows = self._db.execute(
            f"{_SELECT_RECORDS} WHERE reason = 'valid' AND sop_uid = ? ORDER BY relative_path", (sop_uid,)
        )
        return [_record_from_row(row) for row in rows]

    def reclassify(self, changes: Iterable[tuple[str, Reason, str]]) -> None:
        """Change files' reasons and messages.

        :param changes: ``(relative_path, reason, message)`` triples.
        """
        with self._transaction():
            self._db.executemany(
                "UPDATE files SET reason = ?, message = ? WHERE relative_path = ?",
                ((reason.value, message, path) for path, reason, message in changes),
            )

    # -- records ----------------------------------------------------------------------------

    def reason_counts(self) -> dict[str, int]:
        """Return the number of files per reason."""
        rows = self._db.execute("SELECT reason, COUNT(*) FROM files GROUP BY reason ORDER BY reason")
        return {reason: count for reason, count in rows}

    def iter_records(self, reasons: Iterable[Reason], *, exclude: bool = False) -> Iterator[InstanceRecord]:
        """Stream the records with (or, with ``exclude``, without) the given reasons, in path order.

        :param reasons: the reasons to select.
        :param exclude: select every other reason instead.
        """
        values = [reason.value for reason in reasons]
        operator = "NOT IN" if exclude else "IN"
        placeholders = ", ".join("?" * len(values))
        rows = self._db.execute(
            f"{_SELECT_RECORDS} WHERE reason {operator} ({placeholders}) ORDER BY relative_path", values
        )
        for row in rows:
            yield _record_from_row(row)

    def valid_instances_of(self, study_uid: str) -> Iterator[InstanceRecord]:
        """Stream a study's valid instances in path order.

        :param study_uid: the StudyInstanceUID.
        """
        rows = self._db.execute(
            f"{_SELECT_RECORDS} WHERE study_uid = ? AND reason = 'valid' ORDER BY relative_path", (study_uid,)
        )
        for row in rows:
            yield _record_from_row(row)

    # -- studies ----------------------------------------------------------------------------

    def group_studies(self) -> None:
        """Group the valid instances into studies."""
        rows = self._db.execute(
            "SELECT study_uid, MIN(relative_path), MAX(relative_path), COUNT(*), SUM(size) "
            "FROM files WHERE reason = 'valid' GROUP BY study_uid"
        ).fetchall()
        with self._transaction():
            self._db.executemany(
                "INSERT INTO studies VALUES (?, ?, ?, ?, ?)",
                ((uid, first, _common_folder(first, last), n, total) for uid, first, last, n, total in rows),
            )

    def grouped_studies(self) -> Iterator[StudyRow]:
        """Stream every grouped study, in the order of its first instance's path."""
        rows = self._db.execute("SELECT study_uid, folder, instances, bytes FROM studies ORDER BY first_path")
        for uid, folder, count, total in rows:
            yield StudyRow(study_uid=uid, folder=folder, instances=count, bytes=total)

    def conflicting_studies(self) -> set[str]:
        """Return the studies that own a file classified ``conflict``."""
        rows = self._db.execute(
            "SELECT DISTINCT study_uid FROM files WHERE reason = 'conflict' AND study_uid IS NOT NULL"
        )
        return {row[0] for row in rows}

    def decide(self, decisions: Iterable[StudyDecision]) -> None:
        """Store what planning decided for studies.

        :param decisions: one decision per study.
        """
        with self._transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO decisions VALUES (?, ?, ?, ?, ?)",
                (
                    (
                        d.study_uid,
                        d.status,
                        d.reason.value if d.reason else None,
                        d.message,
                        json.dumps(d.fields),
                    )
                    for d in decisions
                ),
            )

    def decided_studies(self, status: StudyStatus) -> Iterator[StudyRow]:
        """Stream the studies with ``status``, in the order of their first instance's path.

        :param status: the decision to select.
        """
        rows = self._db.execute(
            "SELECT s.study_uid, s.folder, s.instances, s.bytes, d.fields FROM studies s "
            "JOIN decisions d USING (study_uid) WHERE d.status = ? ORDER BY s.first_path",
            (status.value,),
        )
        for uid, folder, count, total, fields in rows:
            yield StudyRow(
                study_uid=uid, folder=folder, instances=count, bytes=total, fields=json.loads(fields)
            )

    def status_counts(self) -> dict[str, Any]:
        """Return studies and instances per decision; held-back ones also per reason.

        For example ``{"planned": {"studies": 2, "instances": 9}, "held_back": {"conflict":
        {"studies": 1, "instances": 3}}}``.
        """
        rows = self._db.execute(
            "SELECT d.status, d.reason, COUNT(*), SUM(s.instances) FROM studies s "
            "JOIN decisions d USING (study_uid) GROUP BY d.status, d.reason ORDER BY d.status, d.reason"
        )
        counts: dict[str, Any] = {}
        for status, reason, studies, instances in rows:
            entry = {"studies": studies, "instances": instances}
            if reason:
                counts.setdefault(status, {})[reason] = entry
            else:
                counts[status] = entry
        return counts

    def hold_back_instances(self) -> None:
        """Give the valid files of held-back studies their study's reason and message."""
        with self._transaction():
            self._db.execute(
                "UPDATE files SET reason = d.reason, "
                "message = files.relative_path || ': study held back: ' || d.message "
                "FROM decisions d WHERE d.study_uid = files.study_uid "
                "AND files.reason = 'valid' AND d.status = ?",
                (StudyStatus.HELD_BACK.value,),
            )

    # -- metadata sources -------------------------------------------------------------------

    def tag_fields(self, study_uid: str) -> dict[str, FieldValue]:
        """Return the order metadata read from the study's first instance.

        :param study_uid: the StudyInstanceUID.
        """
        row = self._db.execute("SELECT fields FROM study_tags WHERE study_uid = ?", (study_uid,)).fetchone()
        return json.loads(row[0]) if row else {}

    def nearest_sidecar(self, folder: str) -> tuple[str, str] | None:
        """Return ``(sidecar folder, sidecar path)`` of the nearest sidecar at or above ``folder``.

        :param folder: a study's folder.
        """
        parts = folder.split("/") if folder else []
        candidates = ["/".join(parts[:depth]) for depth in range(len(parts), -1, -1)]
        placeholders = ", ".join("?" * len(candidates))
        row = self._db.execute(
            f"SELECT folder, relative_path FROM sidecars WHERE folder IN ({placeholders}) "
            "ORDER BY length(folder) DESC LIMIT 1",
            candidates,
        ).fetchone()
        return (row[0], row[1]) if row else None

    def studies_below(self, folder: str) -> int:
        """Return how many studies own files below ``folder`` (cached per folder).

        :param folder: a folder below the root (``""`` for the root).
        """
        if folder not in self._studies_per_folder:
            condition, parameters = _folder_range(folder)
            row = self._db.execute(
                f"SELECT COUNT(DISTINCT study_uid) FROM files WHERE study_uid IS NOT NULL AND {condition}",
                parameters,
            ).fetchone()
            self._studies_per_folder[folder] = int(row[0])
        return self._studies_per_folder[folder]

    def manifest_fields(self, key: str) -> dict[str, FieldValue] | None:
        """Return the manifest row's fields for ``key``, ``None`` when the manifest has no row.

        :param key: a StudyInstanceUID or AccessionNumber.
        """
        row = self._db.execute("SELECT fields FROM manifest WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None
