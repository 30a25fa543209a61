"""Per-site settings for scanning, quarantining and batching a staging area."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ByteSize, ConfigDict, Field, model_validator

from dicom_ingest.metadata.options import MetadataOptions


class QuarantinePolicy(StrEnum):
    """What happens to an invalid file.

    ``record``: list it in the plan's report only (for read-only archives); ``copy``: also copy it
    into the quarantine location; ``move``: move it there, out of the staging area. Copies and
    moves get a ``<file>.reason.json`` beside them.
    """

    RECORD = "record"
    COPY = "copy"
    MOVE = "move"


class InvalidThreshold(BaseModel):
    """How many invalid files a run tolerates before it halts without uploading anything.

    Exceeding either limit halts the run; ``None`` disables that limit.

    :param max_fraction: the largest tolerated share of invalid files among all classified ones.
    :param max_count: the largest tolerated number of invalid files.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_fraction: float | None = Field(default=None, ge=0.0, le=1.0)
    max_count: int | None = Field(default=None, ge=0)


DEFAULT_MAX_FILE_SIZE = ByteSize(2 * 1024**3)
DEFAULT_MAX_BATCH_BYTES = ByteSize(20 * 1024**3)
DEFAULT_MAX_BATCH_INSTANCES = 5_000
DEFAULT_HEADER_PREFIX = ByteSize(64 * 1024)


class StagingOptions(BaseModel):
    """A site's staging settings. Sizes accept numbers of bytes or strings such as ``"2GiB"``.

    :param max_file_size: files larger than this are classified ``too_large`` without being read.
    :param quarantine_policy: what to do with invalid files.
    :param quarantine_uri: where copies and moves go (required for ``copy`` and ``move``); a local
        path or an ``s3://[conn_id@]bucket/prefix`` URI.
    :param invalid_threshold: when to halt the run because too many files are invalid.
    :param max_batch_instances: the most instances in one batch (a larger study gets its own).
    :param max_batch_bytes: the most bytes in one batch (a larger study gets its own).
    :param ignore_patterns: file-name patterns (``fnmatch``, e.g. ``".*"``, ``"*.txt"``) that are
        not instances and are left out of the scan and the report.
    :param header_prefix_bytes: how much of each file is read at once to parse its header; larger
        headers are read from the file itself.
    :param metadata: where order metadata comes from and which fields are required.
    :param scan_processes: processes that parse headers of a local staging area (on Linux);
        ``None`` uses the CPUs the task may run on, at most 8; 1 parses in the task's process.
    :param scan_threads: threads reading headers of an object-store area at once; ``None`` uses
        16; 1 reads one file at a time.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_file_size: ByteSize = Field(default=DEFAULT_MAX_FILE_SIZE, gt=0)
    quarantine_policy: QuarantinePolicy = QuarantinePolicy.RECORD
    quarantine_uri: str | None = None
    invalid_threshold: InvalidThreshold = Field(default_factory=InvalidThreshold)
    max_batch_instances: int = Field(default=DEFAULT_MAX_BATCH_INSTANCES, gt=0)
    max_batch_bytes: ByteSize = Field(default=DEFAULT_MAX_BATCH_BYTES, gt=0)
    ignore_patterns: tuple[str, ...] = ()
    header_prefix_bytes: ByteSize = Field(default=DEFAULT_HEADER_PREFIX, ge=1024)
    metadata: MetadataOptions = Field(default_factory=MetadataOptions)
    scan_processes: int | None = Field(default=None, ge=1)
    scan_threads: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _check_quarantine_location(self) -> StagingOptions:
        if self.quarantine_policy is not QuarantinePolicy.RECORD and not self.quarantine_uri:
            raise ValueError(f"quarantine_policy {self.quarantine_policy.value!r} needs a quarantine_uri")
        return self
