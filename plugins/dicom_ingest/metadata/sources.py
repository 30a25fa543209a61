"""Read order metadata from its three sources: DICOM tags, sidecar JSON files, CSV manifests.

Values read here are patient data needed for the vendor's order; they are returned to the
caller and never logged or put into exception text. Errors name the file, the line and the key
or column, never the value.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TextIO

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from dicom_ingest.metadata.errors import MetadataSourceError
from dicom_ingest.metadata.fields import (
    ACCESSION_NUMBER,
    FieldValue,
    InvalidFieldValueError,
    canonical_key,
    normalise,
)
from dicom_ingest.metadata.options import ManifestKey

MAX_SIDECAR_BYTES = 1024 * 1024
"""A sidecar larger than this is refused rather than parsed."""

_STUDY_UID_KEYS = frozenset({"studyinstanceuid", "studyuid"})
_ACCESSION_KEYS = frozenset({canonical_key(ACCESSION_NUMBER)})


def read_tag_fields(dataset: Dataset, tag_mapping: Mapping[str, str]) -> dict[str, FieldValue]:
    """Return the fields that ``dataset`` carries valid values for.

    A tag that is absent, empty, undecodable or invalid for its field is left out: the study's
    required-field check then reports the field as missing.

    :param dataset: a dataset read without pixel data.
    :param tag_mapping: field name → DICOM keyword.
    """
    fields: dict[str, FieldValue] = {}
    for field_name, keyword in tag_mapping.items():
        try:
            value = normalise(field_name, _tag_value(dataset.get(keyword)))
        except (ValueError, TypeError, LookupError):
            continue
        if value is not None:
            fields[field_name] = value
    return fields


def _tag_value(value: object) -> object:
    """Return a DICOM element value as text or a number, ``None`` for absent or binary values."""
    if isinstance(value, MultiValue):
        return "\\".join(str(item) for item in value)
    if isinstance(value, PersonName):
        return str(value)
    if isinstance(value, str | int | float):
        return value
    return None


def _field_lookup(known_fields: Iterable[str]) -> dict[str, str]:
    """Map the canonical form of every accepted key to its field name."""
    return {canonical_key(name): name for name in known_fields}


@dataclass(frozen=True)
class SidecarContent:
    """What a sidecar says about its study.

    :param fields: normalised field values.
    :param study_uid: the StudyInstanceUID the sidecar declares itself for, if it does.
    """

    fields: dict[str, FieldValue] = field(repr=False)
    study_uid: str | None = None


def parse_sidecar(text: str, location: str, known_fields: Iterable[str]) -> SidecarContent:
    """Parse a sidecar JSON object whose keys name fields in any spelling.

    Keys that name no known field are ignored, except ``StudyInstanceUID`` (any spelling), which
    the caller checks against the study.

    :param text: the file's content.
    :param location: the file as shown in errors.
    :param known_fields: the field names a sidecar may set.
    :raises MetadataSourceError: the text is not a JSON object or a value is invalid.
    """
    if len(text) > MAX_SIDECAR_BYTES:
        raise MetadataSourceError(location, 1, f"larger than {MAX_SIDECAR_BYTES} bytes; not a sidecar")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MetadataSourceError(location, exc.lineno, f"not valid JSON ({exc.msg})") from None
    if not isinstance(document, dict):
        raise MetadataSourceError(location, 1, "expected a JSON object of field names and values")
    lookup = _field_lookup(known_fields)
    fields: dict[str, FieldValue] = {}
    study_uid: str | None = None
    for key, raw_value in document.items():
        canonical = canonical_key(key)
        if canonical in _STUDY_UID_KEYS:
            if not isinstance(raw_value, str):
                raise MetadataSourceError(location, _line_of_key(text, key), f"{key}: expected a UID string")
            study_uid = raw_value.strip() or None
            continue
        field_name = lookup.get(canonical)
        if field_name is None:
            continue
        if field_name in fields:
            raise MetadataSourceError(location, _line_of_key(text, key), f"{key}: {field_name} given twice")
        try:
            value = normalise(field_name, raw_value)
        except InvalidFieldValueError as exc:
            raise MetadataSourceError(location, _line_of_key(text, key), f"{key}: {exc}") from None
        if value is not None:
            fields[field_name] = value
    return SidecarContent(fields=fields, study_uid=study_uid)


def _line_of_key(text: str, key: str) -> int:
    """Return the 1-based line on which ``key`` first appears as a JSON string, else 1."""
    quoted = json.dumps(key)
    for number, line in enumerate(text.splitlines(), start=1):
        if quoted in line:
            return number
    return 1


@dataclass(frozen=True)
class ManifestRow:
    """One data row of a CSV manifest.

    :param line: the 1-based line the row ends on.
    :param key: the StudyInstanceUID or AccessionNumber the row is for.
    :param fields: normalised field values.
    """

    line: int
    key: str
    fields: dict[str, FieldValue] = field(repr=False)


class ManifestReader:
    """Stream the rows of a CSV manifest, checking each against the header.

    The header names the key column (``StudyInstanceUID``/``study_uid`` or
    ``AccessionNumber``/``accession_number``, any spelling) and field columns; columns naming no
    known field are ignored. Blank lines are skipped. A UTF-8 byte order mark is tolerated.

    :param stream: the manifest opened as text.
    :param location: the file as shown in errors.
    :param known_fields: the field names a manifest may set.
    :param key: the key column to use; ``None`` prefers StudyInstanceUID when present.
    :raises MetadataSourceError: while iterating, at the first malformed line.
    """

    def __init__(
        self, stream: TextIO, location: str, known_fields: Iterable[str], key: ManifestKey | None = None
    ) -> None:
        self._reader = csv.reader(stream, strict=True)
        self.location = location
        self._known_fields = tuple(known_fields)
        self._requested_key = key
        self.key: ManifestKey | None = None

    def __iter__(self) -> Iterator[ManifestRow]:
        """Yield the manifest's rows in file order."""
        header = self._read_header()
        key_column = self._key_column(header)
        lookup = _field_lookup(self._known_fields)
        field_columns = {
            index: lookup[canonical_key(name)]
            for index, name in enumerate(header)
            if index != key_column and canonical_key(name) in lookup
        }
        for row in self._rows():
            line = self._reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise MetadataSourceError(
                    self.location, line, f"expected {len(header)} columns as in the header, found {len(row)}"
                )
            row_key = row[key_column].strip()
            if not row_key:
                raise MetadataSourceError(self.location, line, f"{header[key_column]} is empty")
            yield ManifestRow(
                line=line, key=row_key, fields=self._row_fields(row, header, field_columns, line)
            )

    def _rows(self) -> Iterator[list[str]]:
        try:
            yield from self._reader
        except csv.Error as exc:
            raise MetadataSourceError(
                self.location, self._reader.line_num, f"not valid CSV ({exc})"
            ) from None

    def _read_header(self) -> list[str]:
        for row in self._rows():
            if any(cell.strip() for cell in row):
                return [cell.strip().lstrip("\ufeff") for cell in row]
        raise MetadataSourceError(self.location, 1, "no header row")

    def _key_column(self, header: list[str]) -> int:
        canonical = [canonical_key(name) for name in header]
        candidates = {
            ManifestKey.STUDY_UID: next((i for i, c in enumerate(canonical) if c in _STUDY_UID_KEYS), None),
            ManifestKey.ACCESSION_NUMBER: next(
                (i for i, c in enumerate(canonical) if c in _ACCESSION_KEYS), None
            ),
        }
        order = (
            [self._requested_key]
            if self._requested_key
            else [ManifestKey.STUDY_UID, ManifestKey.ACCESSION_NUMBER]
        )
        for key in order:
            if candidates[key] is not None:
                self.key = key
                return candidates[key]
        wanted = " or ".join(
            "StudyInstanceUID" if k is ManifestKey.STUDY_UID else "AccessionNumber" for k in order
        )
        raise MetadataSourceError(self.location, self._reader.line_num, f"the header has no {wanted} column")

    def _row_fields(
        self, row: list[str], header: list[str], field_columns: dict[int, str], line: int
    ) -> dict[str, FieldValue]:
        fields: dict[str, FieldValue] = {}
        for index, field_name in field_columns.items():
            try:
                value = normalise(field_name, row[index])
            except InvalidFieldValueError as exc:
                raise MetadataSourceError(self.location, line, f"column {header[index]}: {exc}") from None
            if value is not None:
                fields[field_name] = value
        return fields
