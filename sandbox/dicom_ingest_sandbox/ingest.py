"""Notice objects landing in the store and read what the vendor reads from them: UIDs and metadata tags.

The store writes each upload to a hidden temporary file and renames it into place when the
PUT completes, so every visible file is a whole object. The watcher polls the bucket folder,
hashes each new or rewritten file, and reads its DICOM header without pixel data.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom.config
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

logger = logging.getLogger(__name__)

_TEMPORARY_PREFIXES = (".",)
_TEMPORARY_SUFFIXES = (".partial",)
_HASH_CHUNK_BYTES = 1 << 20
SETTLE_SECONDS = 1.0
"""A folder modified more recently than this is listed again even if its modification time looks unchanged."""
MAX_REPORTED_AGE = 90
_DICOM_AGE = re.compile(r"^(\d{1,3})([DWMY])$")
_PLAIN_AGE = re.compile(r"^(\d{1,3})\+?$")
_SEXES = frozenset({"M", "F", "O"})

REJECTED_NOT_DICOM = "not_dicom"
REJECTED_MISSING_UID = "missing_uid"
REJECTED_UNREADABLE = "unreadable"


def parse_patient_age(value: str) -> int | None:
    """Turn a DICOM Age String into whole years, capped at 90 (``"045Y"`` → 45, ``"090Y"``/``"90+"`` → 90).

    Ages given in days, weeks or months are under a year and become 0. Anything else is None.

    :param value: the PatientAge value (or a plain number of years).
    """
    text = value.strip().upper()
    dicom_age = _DICOM_AGE.match(text)
    if dicom_age:
        number, unit = int(dicom_age.group(1)), dicom_age.group(2)
        years = number if unit == "Y" else 0
    else:
        plain_age = _PLAIN_AGE.match(text)
        if not plain_age:
            return None
        years = int(plain_age.group(1))
    return min(years, MAX_REPORTED_AGE)


def metadata_from_tags(dataset: Dataset) -> dict[str, Any]:
    """Map DICOM tags to order metadata fields; tags that are absent or unusable give no field.

    ``patient_age`` ← PatientAge, ``patient_sex`` ← PatientSex (M, F or O),
    ``accession_number`` ← AccessionNumber.

    :param dataset: the instance's header.
    """
    metadata: dict[str, Any] = {}
    age = parse_patient_age(str(dataset.get("PatientAge", "") or ""))
    if age is not None:
        metadata["patient_age"] = age
    sex = str(dataset.get("PatientSex", "") or "").strip().upper()
    if sex in _SEXES:
        metadata["patient_sex"] = sex
    accession = str(dataset.get("AccessionNumber", "") or "").strip()
    if accession:
        metadata["accession_number"] = accession
    return metadata


@dataclass(frozen=True)
class InstanceHeader:
    """What the vendor reads from one instance: its UIDs and the metadata its tags carry."""

    study_uid: str
    sop_instance_uid: str
    tag_metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ReceivedObject:
    """One complete object found in the store: its identity and either a header or a rejection reason."""

    key: str
    size: int
    md5: str
    header: InstanceHeader | None
    rejection: str | None = None


def md5_of(path: Path) -> str:
    """Return the hex MD5 of a file, read in chunks.

    :param path: the file.
    """
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as stream:
        while chunk := stream.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def read_header(path: Path) -> tuple[InstanceHeader | None, str | None]:
    """Read an instance's header; return ``(header, None)`` or ``(None, rejection reason)``.

    :param path: the stored object.
    """
    try:
        dataset = dcmread(path, stop_before_pixels=True)
        study_uid = str(dataset.get("StudyInstanceUID", "") or "").strip()
        sop_instance_uid = str(dataset.get("SOPInstanceUID", "") or "").strip()
        metadata = metadata_from_tags(dataset)
    except InvalidDicomError:
        return None, REJECTED_NOT_DICOM
    except Exception:  # a damaged header fails in many ways (NotImplementedError, struct errors, ...)
        logger.warning("object %s has a DICOM header that cannot be read", path.name)
        return None, REJECTED_UNREADABLE
    if not study_uid or not sop_instance_uid:
        return None, REJECTED_MISSING_UID
    return InstanceHeader(study_uid, sop_instance_uid, metadata), None


def quiet_pydicom() -> None:
    """Stop pydicom from reporting invalid values: its warnings quote tag values, which may be PHI."""
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


def _is_temporary(name: str) -> bool:
    """Tell whether a file name is an upload still being written."""
    return name.startswith(_TEMPORARY_PREFIXES) or name.endswith(_TEMPORARY_SUFFIXES)


class StoreWatcher:
    """Find objects that appeared or changed in the bucket folder since the last scan.

    A scan costs little however many objects the bucket holds: a folder whose modification time
    has not moved since the last scan (and moved longer ago than :data:`SETTLE_SECONDS`, so that
    a rename within the file system's timestamp granularity is not missed) is not listed again,
    and in a folder that is listed, only entries whose inode number changed are ``stat``-ed. The
    store renames each complete upload into place, so a new or rewritten object always brings a
    new inode.

    :param bucket_dir: the folder the store keeps the bucket's objects in.
    """

    def __init__(self, bucket_dir: Path) -> None:
        self._bucket_dir = bucket_dir
        self._seen: dict[str, tuple[int, int, int]] = {}
        self._folders: dict[str, tuple[int, list[str]]] = {}

    def _new_files(self) -> list[tuple[str, Path, os.stat_result]]:
        """List the complete files that are new or rewritten since the last scan, oldest first."""
        found: list[tuple[str, Path, os.stat_result]] = []
        self._visit(os.fspath(self._bucket_dir), found, time.time_ns())
        found.sort(key=lambda item: item[2].st_mtime_ns)
        return found

    def _visit(self, folder: str, found: list[tuple[str, Path, os.stat_result]], now_ns: int) -> None:
        """Add a folder's new files to ``found``, then visit its subfolders.

        :param folder: the folder.
        :param found: where new files go.
        :param now_ns: the scan's wall-clock time.
        """
        try:
            modified_ns = os.stat(folder).st_mtime_ns
        except FileNotFoundError:
            self._folders.pop(folder, None)
            return
        known = self._folders.get(folder)
        if known is not None and known[0] == modified_ns and now_ns - modified_ns > SETTLE_SECONDS * 1e9:
            subfolders = known[1]
        else:
            subfolders = self._list(folder, found)
            self._folders[folder] = (modified_ns, subfolders)
        for subfolder in subfolders:
            self._visit(subfolder, found, now_ns)

    def _list(self, folder: str, found: list[tuple[str, Path, os.stat_result]]) -> list[str]:
        """List one folder: add its new files to ``found`` and return its subfolders.

        :param folder: the folder.
        :param found: where new files go.
        """
        subfolders = []
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return subfolders
        relative = os.path.relpath(folder, self._bucket_dir)
        prefix = "" if relative == os.curdir else relative.replace(os.sep, "/") + "/"
        seen_objects = self._seen
        for entry in entries:
            # Cheapest checks first: this loop runs over every object of a folder that changed.
            key = prefix + entry.name
            seen = seen_objects.get(key)
            if seen is not None and seen[0] == entry.inode():
                continue
            if entry.is_dir(follow_symlinks=False):
                subfolders.append(entry.path)
                continue
            if _is_temporary(entry.name):
                continue
            try:
                stat = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if seen is not None and seen == (stat.st_ino, stat.st_size, stat.st_mtime_ns):
                continue
            found.append((key, Path(entry.path), stat))
        return subfolders

    def scan(self) -> list[ReceivedObject]:
        """Return the objects that are new or rewritten since the last scan, oldest first."""
        received = []
        for key, path, stat in self._new_files():
            try:
                md5 = md5_of(path)
            except FileNotFoundError:
                continue
            header, rejection = read_header(path)
            self._seen[key] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
            received.append(ReceivedObject(key, stat.st_size, md5, header, rejection))
        return received

    def forget(self) -> None:
        """Forget every object and folder seen, e.g. after the store was emptied."""
        self._seen.clear()
        self._folders.clear()
