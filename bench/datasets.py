"""Generated staging areas for the benchmarks: whole studies of same-sized, valid DICOM instances.

Each study is one generated instance (:func:`tests.staging.factory.make_dataset`, with pixel
data sized so the file has the requested size) copied with its SOPInstanceUID patched in
place, so writing 20,000 files costs little more than the bytes. Every instance carries
PatientAge and PatientSex, so every study has the metadata the vendor requires.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.staging.factory import make_dataset, odd_values_allowed, uid

_PROBE_PIXEL_BYTES = 16
_COLUMNS = 512
_MAX_ROWS = 65535
_PIXEL_DATA_LENGTH_BYTES = 4
"""Length field of the PixelData element (explicit VR OW), which ends the generated file."""


@dataclass(frozen=True)
class DatasetSpec:
    """The shape of one generated staging area.

    :param name: short name used in tables, e.g. ``"2000x512KiB"``.
    :param instances: how many instances.
    :param instance_bytes: the size of each file.
    :param studies: how many studies the instances are spread over (evenly).
    """

    name: str
    instances: int
    instance_bytes: int
    studies: int

    @property
    def total_bytes(self) -> int:
        """Return the bytes of every instance together."""
        return self.instances * self.instance_bytes

    def describe(self) -> str:
        """Return a one-line description."""
        return (
            f"{self.instances:,} instances of {format_size(self.instance_bytes)} in {self.studies} studies "
            f"({self.total_bytes / 2**30:.2f} GiB)"
        )


@dataclass(frozen=True)
class StagedFile:
    """One generated instance: where it is and how big it is."""

    path: Path
    size: int


@dataclass(frozen=True)
class StagedDataset:
    """A generated staging area.

    :param spec: its shape.
    :param root: the staging folder (one sub-folder per study).
    :param files: every instance, study by study.
    """

    spec: DatasetSpec
    root: Path
    files: tuple[StagedFile, ...]


def format_size(size: int) -> str:
    """Return ``size`` in the largest binary unit that divides it, e.g. ``512KiB`` or ``8MiB``.

    :param size: bytes.
    """
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def parse_size(text: str) -> int:
    """Read ``512KiB``, ``8MiB``, ``2GiB`` (any case) or a plain number of bytes.

    :param text: the size as written on the command line.
    """
    value = text.strip().lower()
    for unit, factor in (("gib", 2**30), ("mib", 2**20), ("kib", 2**10), ("b", 1)):
        if value.endswith(unit):
            return int(float(value[: -len(unit)]) * factor)
    return int(value)


def instance_bytes(study_uid: str, sop_uid: str, size: int) -> bytes:
    """Return a valid Part 10 CT instance of exactly ``size`` bytes (pixel data fills it up).

    :param study_uid: the StudyInstanceUID.
    :param sop_uid: the SOPInstanceUID.
    :param size: the file size wanted; at least the header's size plus two bytes.
    """
    header = len(_encode(study_uid, sop_uid, _PROBE_PIXEL_BYTES)) - _PROBE_PIXEL_BYTES
    pixel_bytes = size - header
    if pixel_bytes < 2 or pixel_bytes % 2:
        raise ValueError(f"cannot make an instance of {size} bytes (header {header} bytes, pixels even)")
    return _encode(study_uid, sop_uid, pixel_bytes)


def _encode(study_uid: str, sop_uid: str, pixel_bytes: int) -> bytes:
    """Encode one generated instance with ``pixel_bytes`` of 16-bit pixel data, 512 columns wide."""
    dataset = make_dataset(study_uid=study_uid, sop_uid=sop_uid, pixel_bytes=_PROBE_PIXEL_BYTES)
    pixels = pixel_bytes // 2
    dataset.Columns = min(pixels, _COLUMNS)
    dataset.Rows = min(max(1, pixels // _COLUMNS), _MAX_ROWS)
    dataset.PixelData = bytes(pixel_bytes)
    buffer = io.BytesIO()
    with odd_values_allowed():
        dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _study_sizes(spec: DatasetSpec) -> Iterator[int]:
    """Spread the instances over the studies as evenly as possible."""
    base, extra = divmod(spec.instances, spec.studies)
    for number in range(spec.studies):
        yield base + (1 if number < extra else 0)


def write_dataset(spec: DatasetSpec, root: Path, *, namespace: int) -> StagedDataset:
    """Write the staging area of ``spec`` under ``root``.

    :param spec: what to write.
    :param root: the staging folder to create.
    :param namespace: makes this dataset's UIDs differ from every other dataset's.
    """
    files: list[StagedFile] = []
    for number, count in enumerate(_study_sizes(spec)):
        study_uid = uid(950, namespace, 100_000 + number)
        template_sop = f"{study_uid}.1.1000000"
        template = instance_bytes(study_uid, template_sop, spec.instance_bytes)
        folder = root / f"study{number:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            sop = f"{study_uid}.1.{1_000_000 + index}"
            path = folder / f"IM{index:06d}.dcm"
            path.write_bytes(template.replace(template_sop.encode(), sop.encode()))
            files.append(StagedFile(path, spec.instance_bytes))
    return StagedDataset(spec, root, tuple(files))


def write_sparse_instance(path: Path, size: int) -> Path:
    """Write one instance of ``size`` bytes whose pixel data is a hole in a sparse file.

    The header is written, then the PixelData length is set and the file extended to ``size``
    without writing the zeros, so a 2 GiB instance takes a few KiB of disk until it is read.

    :param path: the file to write.
    :param size: the instance's size (below 4 GiB: the length field has 32 bits).
    """
    study_uid = uid(951, size)
    probe = _encode(study_uid, f"{study_uid}.1.1", _PROBE_PIXEL_BYTES)
    header = probe[: len(probe) - _PROBE_PIXEL_BYTES]
    pixel_bytes = size - len(header)
    if pixel_bytes % 2 or not 0 < pixel_bytes < 2**32 - 1:
        raise ValueError(f"cannot make a sparse instance of {size} bytes")
    length_field = pixel_bytes.to_bytes(_PIXEL_DATA_LENGTH_BYTES, "little")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as stream:
        stream.write(header[:-_PIXEL_DATA_LENGTH_BYTES] + length_field)
    os.truncate(path, size)
    return path
