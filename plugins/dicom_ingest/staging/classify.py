"""Classify staged files: read each header once, without pixel data, and give it a reason code.

Headers are parsed with pydicom (:func:`pydicom.filereader.read_partial`, stopping before the
pixel data) from the first ``header_prefix_bytes`` of the file, read in one call; a header that
does not fit is parsed again from the file itself. pydicom's value validation is switched off
while parsing, so that neither its warnings nor its log lines can carry a tag value.

Decisions a user should know about:

- **No Part 10 header.** A file without the 128-byte preamble and ``DICM`` prefix (and so
  without file meta information) is ``not_dicom``, even when pydicom could read it as a bare
  dataset with ``force=True``. Such a file has no declared transfer syntax (the reader has to
  guess the encoding) and is not what ``Content-Type: application/dicom`` promises, so the
  vendor cannot be relied on to file it; uploading it risks an order that fails 15 minutes
  later instead of a clear error now. The message says when the file *is* a readable bare
  dataset with Study and SOP Instance UIDs, so the user knows to rewrite it as a Part 10 file
  (e.g. ``dcmconv`` or pydicom's ``dcmwrite(..., enforce_file_format=True)``) rather than
  discard it.
- **Truncation.** A file is ``unreadable`` when its header asks for bytes past the end of the
  file, or when its pixel data is declared longer than what is left of the file (for
  encapsulated pixel data: when the fragments do not end with a sequence delimiter).
- **DICOMDIR.** Media directory files (Media Storage SOP Class 1.2.840.10008.1.3.10, or named
  ``DICOMDIR``) are ``dicomdir``: recorded, never uploaded.
- **Messages** name the file and may show UIDs, never any other tag value. Exception texts are
  never copied into messages, because pydicom's can quote values.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, BinaryIO

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.uid import DeflatedExplicitVRLittleEndian, MediaStorageDirectoryStorage

from dicom_ingest.metadata.fields import FieldValue
from dicom_ingest.metadata.sources import read_tag_fields
from dicom_ingest.staging.source import EntryKind, SourceEntry, StagingSource


class Reason(StrEnum):
    """Why a staged file is, or is not, uploaded."""

    VALID = "valid"
    NOT_DICOM = "not_dicom"
    UNREADABLE = "unreadable"
    ZERO_BYTE = "zero_byte"
    MISSING_STUDY_UID = "missing_study_uid"
    MISSING_SOP_UID = "missing_sop_uid"
    DICOMDIR = "dicomdir"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"
    TOO_LARGE = "too_large"
    OUTSIDE_ROOT = "outside_root"
    METADATA_MISSING = "metadata_missing"


DEFECT_REASONS = frozenset(
    {
        Reason.NOT_DICOM,
        Reason.UNREADABLE,
        Reason.ZERO_BYTE,
        Reason.MISSING_STUDY_UID,
        Reason.MISSING_SOP_UID,
        Reason.CONFLICT,
        Reason.TOO_LARGE,
        Reason.OUTSIDE_ROOT,
    }
)
"""Reasons that make a file invalid: they count against the site's invalid threshold."""

QUARANTINE_REASONS = DEFECT_REASONS - {Reason.OUTSIDE_ROOT}
"""Reasons whose files are copied or moved to quarantine. A link leaving the root is only
recorded: copying it would read a file outside the staging area."""

STUDY_REASONS = frozenset({Reason.CONFLICT, Reason.METADATA_MISSING})
"""Reasons that hold a whole study back."""

PIXEL_DATA_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
MEDIA_STORAGE_SOP_CLASS_UID_TAG = 0x00020002
TRANSFER_SYNTAX_UID_TAG = 0x00020010
SOP_CLASS_UID_TAG = 0x00080016
SOP_INSTANCE_UID_TAG = 0x00080018
STUDY_INSTANCE_UID_TAG = 0x0020000D
SERIES_INSTANCE_UID_TAG = 0x0020000E
ITEM_TAG = 0xFFFEE000
SEQUENCE_DELIMITER_TAG = 0xFFFEE0DD
UNDEFINED_LENGTH = 0xFFFFFFFF
SEQUENCE_DELIMITER_ITEM = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
"""(FFFE,E0DD) with length 0, little endian: the end of encapsulated pixel data."""
ELEMENT_HEADER_BYTES = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceRecord:
    """What the scan learnt about one staged file; safe for logs and reports.

    :param relative_path: the path below the staging root.
    :param size: the file size in bytes.
    :param study_uid: StudyInstanceUID, when read.
    :param series_uid: SeriesInstanceUID, when read.
    :param sop_uid: SOPInstanceUID, when read.
    :param sop_class_uid: SOPClassUID (or the file meta's MediaStorageSOPClassUID), when read.
    :param transfer_syntax_uid: the file meta's TransferSyntaxUID, when read.
    :param reason: the classification.
    :param message: a sentence naming the file; it shows no tag value other than UIDs.
    """

    relative_path: str
    size: int
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    sop_class_uid: str | None = None
    transfer_syntax_uid: str | None = None
    reason: Reason
    message: str

    def to_dict(self) -> dict[str, Any]:
        """Return the record as a JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InstanceRecord:
        """Rebuild a record from :meth:`to_dict` output.

        :param data: the dict.
        """
        return cls(**{**data, "reason": Reason(data["reason"])})


@dataclass(frozen=True)
class Classification:
    """A classified file and the order metadata fields its tags carry (valid files only).

    :param record: the record, safe to report.
    :param order_fields: normalised metadata read from tags; patient data, never to be logged.
    """

    record: InstanceRecord
    order_fields: dict[str, FieldValue] = field(default_factory=dict, repr=False)


class _QuietPydicom:
    """Switch pydicom's value validation and Python's warnings off while any thread parses a header.

    Both are process-wide, and threads of an object-store scan parse headers at once: the first
    thread to enter saves and switches them off, the last one to leave restores them, so no
    thread ever restores a state another one still relies on.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._previous_mode = pydicom_config.settings.reading_validation_mode
        self._warnings: warnings.catch_warnings | None = None

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._inside == 0:
                settings = pydicom_config.settings
                self._previous_mode = settings.reading_validation_mode
                settings.reading_validation_mode = pydicom_config.IGNORE
                self._warnings = warnings.catch_warnings()
                self._warnings.__enter__()
                warnings.simplefilter("ignore")
            self._inside += 1
        try:
            yield
        finally:
            with self._lock:
                self._inside -= 1
                if self._inside == 0:
                    pydicom_config.settings.reading_validation_mode = self._previous_mode
                    assert self._warnings is not None
                    self._warnings.__exit__(None, None, None)
                    self._warnings = None


quiet_pydicom = _QuietPydicom()
"""Use as ``with quiet_pydicom():`` around parsing: no validation, whose warnings may quote values."""


class _ReadTracker:
    """A binary stream proxy that notes reads asking for bytes the stream or the file lacks.

    :param stream: the stream pydicom parses (a prefix buffer or the file).
    :param available: how many bytes ``stream`` holds.
    :param file_size: the size of the whole file.
    """

    def __init__(self, stream: BinaryIO, available: int, file_size: int) -> None:
        self._read = stream.read
        self.seek = stream.seek
        self.tell = stream.tell
        self._available = available
        self._file_size = file_size
        self.past_end_of_file = False
        self.past_end_of_buffer = False

    def read(self, size: int | None = -1) -> bytes:
        """Read like the wrapped stream, noting a read that asks for more than is left.

        A read starting exactly at the end of the file is how a parser finds a clean end, so only
        reads that start before the end and reach past it count as truncation.

        :param size: how many bytes to read; negative or ``None`` for the rest of the stream.
        """
        start = self.tell()
        if size is None or size < 0:
            self.past_end_of_buffer = self.past_end_of_buffer or self._available < self._file_size
        else:
            end = start + size
            self.past_end_of_file = self.past_end_of_file or (start < self._file_size < end)
            self.past_end_of_buffer = self.past_end_of_buffer or (
                end > self._available and self._available < self._file_size
            )
        return self._read(size)


class _PixelDataStop:
    """A ``stop_when`` callback that stops at the pixel data and remembers where it starts."""

    def __init__(self, stream: _ReadTracker) -> None:
        self._stream = stream
        self.value_offset: int | None = None
        self.length: int | None = None

    def __call__(self, tag: int, vr: str | None, length: int) -> bool:
        """Tell pydicom to stop at a pixel data element, noting its value's offset and length.

        :param tag: the element's tag.
        :param vr: the element's VR (``None`` in implicit VR).
        :param length: the element's declared length.
        """
        if tag not in PIXEL_DATA_TAGS:
            return False
        self.value_offset = self._stream.tell()
        self.length = length
        return True


@dataclass
class _Header:
    """A parsed header and what the parse noticed about the file's end."""

    dataset: FileDataset
    pixel_value_offset: int | None
    pixel_length: int | None
    past_end_of_file: bool
    needs_whole_file: bool


def _parse_header(stream: BinaryIO, available: int, file_size: int) -> _Header:
    """Parse a header from ``stream`` (which holds ``available`` bytes of the file)."""
    tracker = _ReadTracker(stream, available, file_size)
    stop = _PixelDataStop(tracker)
    dataset = read_partial(tracker, stop_when=stop, force=False)  # type: ignore[arg-type]
    stopped_inside_buffer = stop.value_offset is not None and stop.value_offset <= available
    return _Header(
        dataset=dataset,
        pixel_value_offset=stop.value_offset,
        pixel_length=stop.length,
        past_end_of_file=tracker.past_end_of_file,
        needs_whole_file=available < file_size and (tracker.past_end_of_buffer or not stopped_inside_buffer),
    )


def _encapsulated_pixel_data_complete(stream: BinaryIO, value_offset: int, file_size: int) -> bool:
    """Tell whether encapsulated pixel data at ``value_offset`` ends with a sequence delimiter.

    The common case is answered from the last 8 bytes; otherwise the fragments are walked (which
    tolerates elements after the pixel data, such as trailing padding).
    """
    if file_size - value_offset >= ELEMENT_HEADER_BYTES:
        stream.seek(file_size - ELEMENT_HEADER_BYTES)
        if stream.read(ELEMENT_HEADER_BYTES) == SEQUENCE_DELIMITER_ITEM:
            return True
    position = value_offset
    while position + ELEMENT_HEADER_BYTES <= file_size:
        stream.seek(position)
        header = stream.read(ELEMENT_HEADER_BYTES)
        group = int.from_bytes(header[0:2], "little")
        element = int.from_bytes(header[2:4], "little")
        length = int.from_bytes(header[4:8], "little")
        tag = group << 16 | element
        if tag == SEQUENCE_DELIMITER_TAG:
            return True
        if tag != ITEM_TAG or length == UNDEFINED_LENGTH:
            return False
        position += ELEMENT_HEADER_BYTES + length
    return False


def _uid(dataset: Dataset, tag: int) -> str | None:
    """Return a UID element's value, ``None`` when absent or empty.

    UIDs are ASCII in every transfer syntax, so the raw bytes are decoded directly instead of
    through pydicom's element conversion, which costs more than the rest of the header read.
    """
    element = dataset.get_item(tag)
    if element is None:
        return None
    value = element.value
    text = value.decode("ascii", errors="replace") if isinstance(value, bytes) else str(value or "")
    return text.strip("\x00 ") or None


class HeaderClassifier:
    """Give each staged file its reason code, reading at most its header.

    :param source: the staging area the entries come from.
    :param max_file_size: files larger than this many bytes are ``too_large`` and not read.
    :param header_prefix_bytes: how many bytes to read at once for the header.
    :param tag_mapping: field name → DICOM keyword for the order metadata read from tags.
    """

    def __init__(
        self,
        source: StagingSource,
        *,
        max_file_size: int,
        header_prefix_bytes: int,
        tag_mapping: Mapping[str, str],
    ) -> None:
        self._source = source
        self._max_file_size = max_file_size
        self._prefix_bytes = header_prefix_bytes
        self._tag_mapping = dict(tag_mapping)
        self._previous_study_uid: str | None = None

    def classify(self, entry: SourceEntry) -> Classification:
        """Classify one listed entry.

        Order metadata is read from tags only for the first file of a run of files of the same
        study; later files of that run carry none (the first one's are used).

        :param entry: an entry from :meth:`StagingSource.walk`.
        """
        path = entry.relative_path
        if entry.kind is EntryKind.OUTSIDE_ROOT:
            return self._rejected(
                entry, Reason.OUTSIDE_ROOT, "symbolic link leaving the staging root; not read"
            )
        if entry.kind is EntryKind.BROKEN_LINK:
            return self._rejected(entry, Reason.UNREADABLE, "broken symbolic link")
        if entry.kind is EntryKind.SPECIAL:
            return self._rejected(entry, Reason.UNREADABLE, "not a regular file")
        if entry.size == 0:
            return self._rejected(entry, Reason.ZERO_BYTE, "empty file (0 bytes)")
        if entry.size > self._max_file_size:
            return self._rejected(
                entry, Reason.TOO_LARGE, f"{entry.size} bytes, over the limit of {self._max_file_size} bytes"
            )
        try:
            head = self._source.read_prefix(path, self._prefix_bytes)
        except OSError as exc:
            return self._rejected(entry, Reason.UNREADABLE, f"could not be read ({type(exc).__name__})")
        with quiet_pydicom():
            return self._classify_header(entry, head)

    def _classify_header(self, entry: SourceEntry, head: bytes) -> Classification:
        try:
            header = self._read_header(entry, head)
        except InvalidDicomError:
            return self._rejected(entry, Reason.NOT_DICOM, self._not_dicom_message(head))
        except Exception as exc:  # pydicom raises many types on corrupt input; each file is judged alone
            return self._rejected(
                entry, Reason.UNREADABLE, f"could not be parsed as DICOM ({type(exc).__name__})"
            )
        dataset = header.dataset
        file_meta = dataset.file_meta
        media_class = _uid(file_meta, MEDIA_STORAGE_SOP_CLASS_UID_TAG)
        transfer_syntax = _uid(file_meta, TRANSFER_SYNTAX_UID_TAG)
        uids = {
            "study_uid": _uid(dataset, STUDY_INSTANCE_UID_TAG),
            "series_uid": _uid(dataset, SERIES_INSTANCE_UID_TAG),
            "sop_uid": _uid(dataset, SOP_INSTANCE_UID_TAG),
            "sop_class_uid": _uid(dataset, SOP_CLASS_UID_TAG) or media_class,
            "transfer_syntax_uid": transfer_syntax,
        }
        if media_class == MediaStorageDirectoryStorage or entry.name.upper() == "DICOMDIR":
            return self._rejected(entry, Reason.DICOMDIR, "DICOMDIR media directory; not an instance", **uids)
        truncation = self._truncation(entry, head, header, transfer_syntax)
        if truncation:
            return self._rejected(entry, Reason.UNREADABLE, f"truncated: {truncation}", **uids)
        if uids["study_uid"] is None:
            return self._rejected(entry, Reason.MISSING_STUDY_UID, "no StudyInstanceUID", **uids)
        if uids["sop_uid"] is None:
            return self._rejected(entry, Reason.MISSING_SOP_UID, "no SOPInstanceUID", **uids)
        order_fields: dict[str, FieldValue] = {}
        if uids["study_uid"] != self._previous_study_uid:
            order_fields = read_tag_fields(dataset, self._tag_mapping)
            self._previous_study_uid = uids["study_uid"]
        record = InstanceRecord(
            relative_path=entry.relative_path,
            size=entry.size,
            reason=Reason.VALID,
            message=f"{entry.relative_path}: valid DICOM instance",
            **uids,
        )
        return Classification(record=record, order_fields=order_fields)

    def _read_header(self, entry: SourceEntry, head: bytes) -> _Header:
        """Parse from the prefix; parse again from the file when the header does not fit."""
        header: _Header | None
        try:
            header = _parse_header(io.BytesIO(head), len(head), entry.size)
        except InvalidDicomError:
            raise
        except Exception:
            if len(head) >= entry.size:
                raise
            header = None
        if header is None or header.needs_whole_file:
            with self._source.open(entry.relative_path) as stream:
                header = _parse_header(stream, entry.size, entry.size)
        return header

    def _truncation(
        self, entry: SourceEntry, head: bytes, header: _Header, transfer_syntax: str | None
    ) -> str:
        """Describe how the file is truncated, or return ``""`` when it is complete."""
        if header.past_end_of_file:
            return "the header needs more bytes than the file holds"
        offset, length = header.pixel_value_offset, header.pixel_length
        if offset is None or length is None or transfer_syntax == DeflatedExplicitVRLittleEndian:
            return ""
        if length != UNDEFINED_LENGTH:
            return "" if offset + length <= entry.size else "the pixel data is declared longer than the file"
        if len(head) >= entry.size:
            complete = _encapsulated_pixel_data_complete(io.BytesIO(head), offset, entry.size)
        else:
            with self._source.open(entry.relative_path) as stream:
                complete = _encapsulated_pixel_data_complete(stream, offset, entry.size)
        return "" if complete else "the encapsulated pixel data does not end with a sequence delimiter"

    @staticmethod
    def _not_dicom_message(head: bytes) -> str:
        """Explain a missing Part 10 header, telling apart bare datasets from other files."""
        try:
            bare = read_partial(
                io.BytesIO(head), stop_when=lambda tag, vr, length: tag in PIXEL_DATA_TAGS, force=True
            )
            readable = "StudyInstanceUID" in bare and "SOPInstanceUID" in bare
        except Exception:  # any failure means it is not a readable bare dataset either
            readable = False
        if readable:
            return (
                "a bare DICOM dataset without the Part 10 header (no preamble, 'DICM' prefix or file "
                "meta); not uploaded: rewrite it as a Part 10 file"
            )
        return "not a DICOM file (no 'DICM' prefix after the 128-byte preamble)"

    @staticmethod
    def _rejected(entry: SourceEntry, reason: Reason, problem: str, **uids: str | None) -> Classification:
        record = InstanceRecord(
            relative_path=entry.relative_path,
            size=entry.size,
            reason=reason,
            message=f"{entry.relative_path}: {problem}",
            **uids,
        )
        return Classification(record=record)
