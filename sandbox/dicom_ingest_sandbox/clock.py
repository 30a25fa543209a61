"""Time sources of the sandbox: one monotonic clock for the rules, wall time for documents."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def utc_iso(epoch_seconds: float | None = None) -> str:
    """Format a wall-clock time as ISO-8601 UTC with milliseconds and a ``Z`` suffix.

    :param epoch_seconds: seconds since the epoch; now when omitted.
    """
    moment = datetime.fromtimestamp(time.time() if epoch_seconds is None else epoch_seconds, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def monotonic() -> float:
    """Return seconds on the clock the rules are measured with (never jumps back)."""
    return time.monotonic()
