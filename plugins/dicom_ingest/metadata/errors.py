"""Errors raised while reading order metadata sources."""

from __future__ import annotations

from dicom_ingest.exceptions import DicomIngestError


class MetadataSourceError(DicomIngestError):
    """A sidecar or manifest is malformed; the text names the file and the line, never a value.

    :param location: the file, as shown to users (relative path or URI without credentials).
    :param line: the 1-based line the problem was found on.
    :param problem: what is wrong, without any field value.
    """

    def __init__(self, location: str, line: int, problem: str) -> None:
        self.location = location
        self.line = line
        self.problem = problem
        super().__init__(f"{location}, line {line}: {problem}")
