"""Audit log: JSON lines in the data directory, mirrored in memory for the admin state.

Callers pass only what may be recorded: client ids, scopes, object keys, sizes, MD5s, order ids,
UIDs, metadata field names and status words. Never tokens, secrets, URL query strings or values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dicom_ingest_sandbox.clock import utc_iso


class AuditLog:
    """Append audit events to a JSON-lines file and keep them for ``/_sandbox/state``.

    :param path: the JSON-lines file; emptied when the log is created.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._events: list[dict[str, Any]] = []
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._path.write_text("")

    def record(self, event: str, **fields: Any) -> None:
        """Record one event.

        :param event: the event's name, e.g. ``token_issued``.
        :param fields: the event's JSON-able details.
        """
        entry = {"time": utc_iso(), "event": event, **fields}
        self._events.append(entry)
        with self._path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(entry, separators=(",", ":")) + "\n")

    def events(self) -> list[dict[str, Any]]:
        """Return a copy of every event recorded since the last clear."""
        return list(self._events)

    def clear(self) -> None:
        """Forget every event and empty the file."""
        self._events.clear()
        self._path.write_text("")
