"""Write small, valid DICOM Part 10 files for tests and benchmarks."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydicom import config as pydicom_config
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_ROOT_UID, ExplicitVRLittleEndian

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PATIENT_NAME = "DOE^JANE"
PATIENT_ID = "PID-4711"


def uid(*parts: int | str) -> str:
    """Return a deterministic UID under pydicom's root.

    :param parts: numbers that make the UID unique.
    """
    return PYDICOM_ROOT_UID + ".".join(str(part) for part in parts)


@contextmanager
def odd_values_allowed() -> Iterator[None]:
    """Let tests write values pydicom would warn about (lower-case codes, bad dates, long texts)."""
    settings = pydicom_config.settings
    previous = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = previous


def make_dataset(
    *,
    study_uid: str,
    sop_uid: str,
    series_uid: str | None = None,
    patient_age: str | None = "045Y",
    patient_sex: str | None = "F",
    accession_number: str | None = "ACC-1",
    pixel_bytes: int = 16,
) -> Dataset:
    """Build a small CT instance with file meta, patient data and a little pixel data.

    :param study_uid: StudyInstanceUID (empty string to leave it out).
    :param sop_uid: SOPInstanceUID (empty string to leave it out).
    :param series_uid: SeriesInstanceUID; derived from the study when ``None``.
    :param patient_age: PatientAge, left out when ``None``.
    :param patient_sex: PatientSex, left out when ``None``.
    :param accession_number: AccessionNumber, left out when ``None``.
    :param pixel_bytes: the size of the pixel data (even).
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid or uid(0)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = CT_IMAGE_STORAGE
    if sop_uid:
        dataset.SOPInstanceUID = sop_uid
    if study_uid:
        dataset.StudyInstanceUID = study_uid
        dataset.SeriesInstanceUID = series_uid or f"{study_uid}.1"
    dataset.PatientName = PATIENT_NAME
    dataset.PatientID = PATIENT_ID
    dataset.PatientBirthDate = "19800101"
    with odd_values_allowed():
        for keyword, value in (
            ("PatientAge", patient_age),
            ("PatientSex", patient_sex),
            ("AccessionNumber", accession_number),
        ):
            if value is not None:
                setattr(dataset, keyword, value)
    dataset.Modality = "CT"
    dataset.Rows = 1
    dataset.Columns = pixel_bytes // 2
    dataset.BitsAllocated = 16
    dataset.BitsStored = 16
    dataset.HighBit = 15
    dataset.PixelRepresentation = 0
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.PixelData = bytes(range(256)) * (pixel_bytes // 256) + bytes(pixel_bytes % 256)
    return dataset


def write_instance(path: Path, **dataset_fields: object) -> Path:
    """Write a generated instance as a Part 10 file (folders are created).

    :param path: the file to write.
    :param dataset_fields: arguments of :func:`make_dataset`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset = make_dataset(**dataset_fields)  # type: ignore[arg-type]
    with odd_values_allowed():
        dataset.save_as(path, enforce_file_format=True)
    return path


def write_study(
    root: Path, folder: str, study_uid: str, instances: int, *, pixel_bytes: int = 16, **fields: object
) -> list[Path]:
    """Write ``instances`` instances of one study into ``root/folder``.

    :param root: the staging root.
    :param folder: the study's folder below the root.
    :param study_uid: the StudyInstanceUID.
    :param instances: how many instances.
    :param pixel_bytes: pixel data size of each instance.
    :param fields: further arguments of :func:`make_dataset`.
    """
    return [
        write_instance(
            root / folder / f"IM{number:05d}.dcm",
            study_uid=study_uid,
            sop_uid=f"{study_uid}.1.{number}",
            pixel_bytes=pixel_bytes,
            **fields,
        )
        for number in range(instances)
    ]


def copy_bundled(name: str, target: Path) -> Path:
    """Copy one of pydicom's bundled test files (never downloaded) to ``target``.

    :param name: the bundled file's name, e.g. ``"CT_small.dcm"``.
    :param target: where to put the copy.
    """
    source = get_testdata_file(name, download=False)
    if source is None:
        raise FileNotFoundError(f"pydicom does not ship {name} offline")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def clone_study(root: Path, folder: str, study_number: int, instances: int) -> int:
    """Write a study quickly: one generated instance, copied with each copy's UIDs patched.

    The SOP Instance UIDs differ only in a fixed-width counter, so the bytes are patched in
    place and every copy stays a valid Part 10 file. Returns the bytes written.

    :param root: the staging root.
    :param folder: the study's folder below the root.
    :param study_number: makes the StudyInstanceUID unique (below 900,000).
    :param instances: how many instances (at most 999,999).
    """
    study_uid = uid(900, 100_000 + study_number)
    template_sop = f"{study_uid}.1.1000000"
    target = root / folder
    target.mkdir(parents=True, exist_ok=True)
    template = target / "IM000000.dcm"
    write_instance(template, study_uid=study_uid, sop_uid=template_sop)
    data = template.read_bytes()
    written = len(data)
    for number in range(1, instances):
        sop = f"{study_uid}.1.{1_000_000 + number}"
        (target / f"IM{number:06d}.dcm").write_bytes(data.replace(template_sop.encode(), sop.encode()))
        written += len(data)
    return written
