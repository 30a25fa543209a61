"""Progress of a batch upload: counts, rates and an ETA, logged as one line at a steady pace.

The line carries counts, sizes, rates and the batch id only: never file paths (a folder name
may hold a patient's name), tag values or URLs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

BYTES_PER_MB = 1_000_000
UNKNOWN_ETA = "unknown"


class ProgressMeter:
    """Count what a batch upload did and describe it as one log line.

    Not thread-safe: the uploader's coordinating thread is its only user.

    :param batch_id: the batch, named in every line.
    :param studies: studies in the batch.
    :param instances: instances in the batch.
    :param total_bytes: bytes of the batch's instances.
    :param clock: a monotonic clock in seconds.
    """

    def __init__(
        self, batch_id: str, *, studies: int, instances: int, total_bytes: int, clock: Callable[[], float]
    ) -> None:
        self.batch_id = batch_id
        self.studies = studies
        self.instances = instances
        self.total_bytes = total_bytes
        self._clock = clock
        self.started_at = clock()
        self.uploaded_instances = 0
        self.uploaded_bytes = 0
        self.settled_instances = 0
        self.settled_bytes = 0
        self.studies_finished = 0

    def instance_uploaded(self, size: int) -> None:
        """Count one instance sent.

        :param size: its size in bytes.
        """
        self.uploaded_instances += 1
        self.uploaded_bytes += size
        self.instances_settled(1, size)

    def instances_settled(self, count: int, size: int) -> None:
        """Count instances that need no more work (sent, skipped, or given up with their study).

        :param count: how many instances.
        :param size: their bytes.
        """
        self.settled_instances += count
        self.settled_bytes += size

    def study_finished(self) -> None:
        """Count one study whose fate in this batch is decided."""
        self.studies_finished += 1

    @property
    def elapsed(self) -> float:
        """Seconds since the batch started."""
        return max(0.0, self._clock() - self.started_at)

    def eta_seconds(self) -> float | None:
        """Estimate the seconds left from the byte rate so far; ``None`` before anything was sent."""
        elapsed = self.elapsed
        if self.uploaded_bytes <= 0 or elapsed <= 0:
            return None
        remaining = max(0, self.total_bytes - self.settled_bytes)
        return remaining / (self.uploaded_bytes / elapsed)

    def log(self, logger: logging.Logger) -> None:
        """Log the progress line.

        :param logger: where the line goes (at INFO).
        """
        elapsed = self.elapsed
        eta = self.eta_seconds()
        logger.info(
            "Batch %s: %d/%d instances, %.1f/%.1f MB, %.2f MB/s, %.1f instances/s, ETA %s, "
            "%d/%d studies finished",
            self.batch_id,
            self.settled_instances,
            self.instances,
            self.settled_bytes / BYTES_PER_MB,
            self.total_bytes / BYTES_PER_MB,
            self.uploaded_bytes / BYTES_PER_MB / elapsed if elapsed else 0.0,
            self.uploaded_instances / elapsed if elapsed else 0.0,
            UNKNOWN_ETA if eta is None else timedelta(seconds=round(eta)),
            self.studies_finished,
            self.studies,
        )
