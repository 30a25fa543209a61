"""Build sample staging areas: generated multi-series studies, real bundled files and bad files.

::

    manifest = build_sample_staging(Path("staging/2025-01-02"), day="2025-01-02")
    manifest.write(Path("sample-manifest.json"))
    problems = manifest.delivery_problems(sandbox.state())

:func:`build_sample_staging` writes a folder that looks like a day's delivery from a hospital
site, and returns a :class:`SampleManifest` saying what a correct ingestion of it must produce:

- ``study-NN/series-NN/instance-NNN.dcm``: generated CT studies with fake patients
  (``DEMO^PATIENT^N``). All but the last two carry PatientAge and PatientSex in their tags. The
  last but one has neither tag and a ``metadata.json`` sidecar in its folder that supplies them.
  The last one has neither tag and no sidecar: it must be held back (``metadata_missing``) and
  never reach the vendor.
- ``bundled/<name>/``: real files that ship with pydicom (no download): ``CT_small.dcm``,
  ``MR_small.dcm`` and ``JPEG2000.dcm`` lack a valid PatientAge or PatientSex in their tags, so
  each has a sidecar naming its StudyInstanceUID; ``SC_rgb_small_odd.dcm`` carries both tags.
  Each is a study of one instance that must be delivered.
- ``bad/``: a text file (``not_dicom``), an empty file (``zero_byte``), a truncated instance of
  a study of its own (``unreadable``) and pydicom's DICOMDIR (``dicomdir``). None may be uploaded;
  the report must list each with its reason.

UIDs of generated studies are derived from ``day``, so the same day always gives the same
sample. The manifest holds UIDs, paths, counts and reason codes, never a tag value.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydicom import dcmread, dcmwrite
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicom_ingest_sandbox.testing import build_instance

MANIFEST_VERSION = 1
DELIVERED = "DELIVERED"
SIDECAR_NAME = "metadata.json"
"""The sidecar file name the product reads by default."""
IMAGE_SIZE = 64
"""Rows and columns of a generated instance's blank image (8 KiB of pixel data)."""
MIN_STUDIES = 3
"""One study with tags, one with a sidecar, one held back."""
TRUNCATED_KEEP_FRACTION = 0.6
"""How much of an instance the truncated bad file keeps: the cut falls inside its pixel data."""


class MetadataSource(StrEnum):
    """Where a sample study's required order metadata comes from."""

    TAGS = "tags"
    SIDECAR = "sidecar"
    NONE = "none"


class Outcome(StrEnum):
    """What a correct run does with a sample study."""

    DELIVERED = "delivered"
    HELD = "held"


@dataclass(frozen=True)
class BundledFile:
    """A file shipped in pydicom's test data, and the sidecar values it needs (if any).

    :param name: its name in pydicom's test data.
    :param folder: the sample folder it goes to, below ``bundled/``.
    :param sidecar: fake age and sex for a sidecar; ``None`` when its tags already carry both.
    """

    name: str
    folder: str
    sidecar: Mapping[str, Any] | None = None


BUNDLED_FILES: tuple[BundledFile, ...] = (
    # PatientAge 000Y, PatientSex O (not a value the vendor accepts).
    BundledFile("CT_small.dcm", "ct-small", {"PatientAge": "052Y", "PatientSex": "F"}),
    # No PatientAge.
    BundledFile("MR_small.dcm", "mr-small", {"PatientAge": 38, "PatientSex": "F"}),
    # Empty PatientAge; JPEG 2000 compressed pixel data.
    BundledFile("JPEG2000.dcm", "jpeg2000", {"patient_age": "90+", "patient_sex": "M"}),
    # PatientAge 024Y, PatientSex F: delivered from its own tags.
    BundledFile("SC_rgb_small_odd.dcm", "sc-rgb"),
)
"""pydicom test files that ship inside the package (``get_testdata_file(..., download=False)``)."""

BUNDLED_DICOMDIR = "DICOMDIR"


@dataclass(frozen=True)
class SampleStudy:
    """A study of the sample and what a correct run does with it.

    :param label: a short name (its folder), safe to print.
    :param study_uid: its StudyInstanceUID.
    :param folder: its folder below the staging root.
    :param sop_uids: the SOPInstanceUIDs of its instances.
    :param bytes: the total size of its instances.
    :param metadata_source: where its required metadata comes from.
    :param outcome: delivered or held back.
    :param reason: the reason code it is held back with (``metadata_missing``), else ``None``.
    """

    label: str
    study_uid: str
    folder: str
    sop_uids: tuple[str, ...]
    bytes: int
    metadata_source: MetadataSource
    outcome: Outcome
    reason: str | None = None

    @property
    def instances(self) -> int:
        """Return the number of instances."""
        return len(self.sop_uids)


@dataclass(frozen=True)
class SampleBadFile:
    """A staged file that must not be uploaded, and the reason code a scan gives it.

    :param relative_path: its path below the staging root.
    :param reason: the expected reason code (``not_dicom``, ``zero_byte``, ``unreadable``, ``dicomdir``).
    :param description: what the file is.
    """

    relative_path: str
    reason: str
    description: str


@dataclass(frozen=True)
class SampleManifest:
    """What a sample staging area holds and what a correct ingestion of it produces.

    :param root: the staging root.
    :param day: the day the sample was built for (``YYYY-MM-DD``).
    :param studies: every study, delivered or held.
    :param bad_files: every file that must not be uploaded.
    """

    root: Path
    day: str
    studies: tuple[SampleStudy, ...]
    bad_files: tuple[SampleBadFile, ...] = field(default=())

    @property
    def delivered_studies(self) -> tuple[SampleStudy, ...]:
        """Return the studies a correct run delivers."""
        return tuple(study for study in self.studies if study.outcome is Outcome.DELIVERED)

    @property
    def held_studies(self) -> tuple[SampleStudy, ...]:
        """Return the studies a correct run holds back."""
        return tuple(study for study in self.studies if study.outcome is Outcome.HELD)

    @property
    def instances_to_deliver(self) -> int:
        """Return how many instances a correct run uploads."""
        return sum(study.instances for study in self.delivered_studies)

    @property
    def staged_files(self) -> int:
        """Return how many files a scan classifies (sidecars are not counted)."""
        return sum(study.instances for study in self.studies) + len(self.bad_files)

    def to_dict(self) -> dict[str, Any]:
        """Return the manifest as a JSON-able dict."""
        document = asdict(self)
        document["root"] = str(self.root)
        return {"version": MANIFEST_VERSION, **document}

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> SampleManifest:
        """Rebuild a manifest from :meth:`to_dict` output.

        :param document: the dict.
        :raises ValueError: it is not a manifest of this version.
        """
        if document.get("version") != MANIFEST_VERSION:
            raise ValueError(f"not a sample manifest of version {MANIFEST_VERSION}")
        studies = tuple(
            SampleStudy(
                **{
                    **study,
                    "sop_uids": tuple(study["sop_uids"]),
                    "metadata_source": MetadataSource(study["metadata_source"]),
                    "outcome": Outcome(study["outcome"]),
                }
            )
            for study in document["studies"]
        )
        return cls(
            root=Path(document["root"]),
            day=document["day"],
            studies=studies,
            bad_files=tuple(SampleBadFile(**bad) for bad in document["bad_files"]),
        )

    def write(self, path: Path) -> None:
        """Write the manifest as JSON (keep it outside the staging root: it is not an instance).

        :param path: the file to write.
        """
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> SampleManifest:
        """Read a manifest written by :meth:`write`.

        :param path: the file to read.
        """
        return cls.from_dict(json.loads(path.read_text()))

    def delivery_problems(self, state: Mapping[str, Any]) -> list[str]:
        """Compare a sandbox's state with the expected outcome; return every difference found.

        A correct run leaves exactly one ``DELIVERED`` order per delivered study, holding every
        one of its instances and complete metadata; no order for a held study or for a study
        outside the sample (such as the truncated file's); and no upload the vendor rejected
        (a bad file sent anyway). A re-sent instance replacing its earlier copy is not a
        problem. Messages name studies by label and UID, never a metadata value.

        :param state: ``GET /_sandbox/state`` of the sandbox the run uploaded to.
        """
        orders_by_study: dict[str, list[Mapping[str, Any]]] = {}
        for order in state.get("orders", []):
            orders_by_study.setdefault(order["study_uid"], []).append(order)
        problems: list[str] = []
        for study in self.delivered_studies:
            problems += _delivered_study_problems(study, orders_by_study.pop(study.study_uid, []))
        for study in self.held_studies:
            if orders_by_study.pop(study.study_uid, []):
                problems.append(f"{study.label} ({study.study_uid}): held back, yet the vendor has an order")
        for study_uid, orders in orders_by_study.items():
            problems.append(
                f"study {study_uid} is not in the sample, yet the vendor has {len(orders)} order(s)"
            )
        rejected = [item for item in state.get("objects", []) if not item.get("accepted")]
        if rejected:
            reasons = sorted({str(item.get("reason")) for item in rejected})
            problems.append(f"the vendor rejected {len(rejected)} uploaded object(s) ({', '.join(reasons)})")
        return problems


def _delivered_study_problems(study: SampleStudy, orders: Sequence[Mapping[str, Any]]) -> list[str]:
    """Return what is wrong with the orders of a study that must be delivered."""
    name = f"{study.label} ({study.study_uid})"
    if len(orders) != 1:
        return [f"{name}: expected exactly one order, the vendor has {len(orders)}"]
    order = orders[0]
    problems = []
    if order["status"] != DELIVERED:
        problems.append(f"{name}: order is {order['status']} (reason {order.get('reason')}), not {DELIVERED}")
    received = {instance["sop_instance_uid"] for instance in order.get("instances", [])}
    expected = set(study.sop_uids)
    if received != expected:
        problems.append(
            f"{name}: order holds {len(received & expected)} of {len(expected)} instances"
            + (f" and {len(received - expected)} unexpected one(s)" if received - expected else "")
        )
    if not order.get("metadata_complete"):
        problems.append(f"{name}: order metadata is incomplete")
    return problems


class _SampleWriter:
    """Write the files of one sample staging area.

    :param root: the staging root (created if missing).
    :param day: the sample's day, used in study dates and to derive UIDs.
    """

    def __init__(self, root: Path, day: date) -> None:
        self.root = root
        self.day = day
        self.studies: list[SampleStudy] = []
        self.bad_files: list[SampleBadFile] = []

    def uid(self, *parts: object) -> str:
        """Return a UID derived from the day and ``parts`` (the same inputs give the same UID)."""
        return generate_uid(entropy_srcs=[self.day.isoformat(), *map(str, parts)])

    def generated_instance(
        self,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        *,
        patient_number: int,
        series_number: int,
        instance_number: int,
        patient_age: str | None,
        patient_sex: str | None,
        accession_number: str | None,
    ) -> bytes:
        """Return one generated CT instance of a fake patient, dated on the sample's day."""
        body = build_instance(
            study_uid,
            sop_uid,
            series_uid=series_uid,
            patient_age=patient_age,
            patient_sex=patient_sex,
            accession_number=accession_number,
            patient_name=f"DEMO^PATIENT^{patient_number}",
            patient_id=f"DEMO-{patient_number:04d}",
            patient_birth_date="19700101",
            size=IMAGE_SIZE,
        )
        dataset = dcmread(io.BytesIO(body))
        day = self.day.strftime("%Y%m%d")
        dataset.StudyDate = dataset.SeriesDate = dataset.ContentDate = day
        dataset.SeriesNumber = series_number
        dataset.InstanceNumber = instance_number
        dataset.SeriesDescription = f"DEMO SERIES {series_number}"
        buffer = io.BytesIO()
        dcmwrite(buffer, dataset, enforce_file_format=True)
        return buffer.getvalue()

    def add_generated_study(
        self, number: int, source: MetadataSource, series_per_study: int, instances_per_series: int
    ) -> None:
        """Write one generated study; its tags carry age and sex only when ``source`` is tags."""
        label = f"study-{number:02d}"
        study_uid = self.uid("study", number)
        with_tags = source is MetadataSource.TAGS
        sop_uids: list[str] = []
        size = 0
        for series_number in range(1, series_per_study + 1):
            series_uid = self.uid("series", number, series_number)
            for instance_number in range(1, instances_per_series + 1):
                sop_uid = self.uid("instance", number, series_number, instance_number)
                body = self.generated_instance(
                    study_uid,
                    series_uid,
                    sop_uid,
                    patient_number=number,
                    series_number=series_number,
                    instance_number=instance_number,
                    patient_age=f"{30 + 9 * number:03d}Y" if with_tags else None,
                    patient_sex=("F", "M")[number % 2] if with_tags else None,
                    accession_number=f"DEMO-ACC-{number:04d}",
                )
                path = f"{label}/series-{series_number:02d}/instance-{instance_number:03d}.dcm"
                self.write(path, body)
                sop_uids.append(sop_uid)
                size += len(body)
        if source is MetadataSource.SIDECAR:
            fake = {"PatientAge": f"{40 + number:03d}Y", "PatientSex": ("F", "M")[number % 2]}
            self.write(f"{label}/{SIDECAR_NAME}", json.dumps(fake, indent=2).encode())
        held = source is MetadataSource.NONE
        self.studies.append(
            SampleStudy(
                label=label,
                study_uid=study_uid,
                folder=label,
                sop_uids=tuple(sop_uids),
                bytes=size,
                metadata_source=source,
                outcome=Outcome.HELD if held else Outcome.DELIVERED,
                reason="metadata_missing" if held else None,
            )
        )

    def add_bundled(self, bundled: BundledFile) -> None:
        """Copy one of pydicom's bundled files, with a sidecar naming its study when it needs one."""
        source = _bundled_path(bundled.name)
        folder = f"bundled/{bundled.folder}"
        target = self.root / folder / bundled.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        header = dcmread(source, stop_before_pixels=True)
        study_uid, sop_uid = str(header.StudyInstanceUID), str(header.SOPInstanceUID)
        if bundled.sidecar is not None:
            sidecar = {"StudyInstanceUID": study_uid, **bundled.sidecar}
            self.write(f"{folder}/{SIDECAR_NAME}", json.dumps(sidecar, indent=2).encode())
        self.studies.append(
            SampleStudy(
                label=folder,
                study_uid=study_uid,
                folder=folder,
                sop_uids=(sop_uid,),
                bytes=target.stat().st_size,
                metadata_source=MetadataSource.TAGS if bundled.sidecar is None else MetadataSource.SIDECAR,
                outcome=Outcome.DELIVERED,
            )
        )

    def add_bad_files(self) -> None:
        """Write one file of each kind a scan refuses."""
        self.bad(
            "bad/notes.txt",
            b"Shipment notes: 4 studies, scanner room 2.\n",
            "not_dicom",
            "a text file",
        )
        self.bad("bad/empty.dcm", b"", "zero_byte", "an empty file")
        # A study of its own, so that the delivered studies stay whole.
        whole = self.generated_instance(
            self.uid("truncated", "study"),
            self.uid("truncated", "series"),
            self.uid("truncated", "instance"),
            patient_number=99,
            series_number=1,
            instance_number=1,
            patient_age="050Y",
            patient_sex="F",
            accession_number=None,
        )
        self.bad(
            "bad/truncated.dcm",
            whole[: int(len(whole) * TRUNCATED_KEEP_FRACTION)],
            "unreadable",
            "a DICOM instance cut short inside its pixel data",
        )
        self.bad(
            "bad/DICOMDIR",
            _bundled_path(BUNDLED_DICOMDIR).read_bytes(),
            "dicomdir",
            "a DICOMDIR media directory",
        )

    def bad(self, relative_path: str, body: bytes, reason: str, description: str) -> None:
        """Write a bad file and note its expected reason."""
        self.write(relative_path, body)
        self.bad_files.append(SampleBadFile(relative_path, reason, description))

    def write(self, relative_path: str, body: bytes) -> None:
        """Write a file below the root, creating its folders."""
        path = self.root / relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)


def _bundled_path(name: str) -> Path:
    """Return the path of a pydicom test file that ships with the package (never downloaded).

    :raises FileNotFoundError: this pydicom installation does not ship it.
    """
    found = get_testdata_file(name, download=False)
    if not isinstance(found, str):
        raise FileNotFoundError(f"pydicom's test data has no {name} (it is not downloaded here)")
    return Path(found)


def build_sample_staging(
    root: Path,
    *,
    studies: int = 4,
    series_per_study: int = 2,
    instances_per_series: int = 3,
    include_bundled: bool = True,
    include_bad: bool = True,
    day: str | None = None,
) -> SampleManifest:
    """Write a sample staging area into ``root`` and return what a correct run must produce.

    Of the ``studies`` generated studies, the last one lacks age and sex (held back) and the
    one before it takes them from a sidecar; the others carry them in their tags.

    :param root: the staging folder; it must be empty or not exist yet.
    :param studies: how many studies to generate (at least 3).
    :param series_per_study: series per generated study.
    :param instances_per_series: instances per series.
    :param include_bundled: also copy pydicom's bundled real files (one study each).
    :param include_bad: also write files that must not be uploaded.
    :param day: the delivery day, ``YYYY-MM-DD``; today (UTC) when ``None``.
    :raises ValueError: an argument is out of range or ``root`` is not empty.
    """
    if studies < MIN_STUDIES:
        raise ValueError(f"studies must be at least {MIN_STUDIES} (tags, sidecar and held back)")
    if series_per_study < 1 or instances_per_series < 1:
        raise ValueError("series_per_study and instances_per_series must be at least 1")
    sample_day = date.fromisoformat(day) if day is not None else datetime.now(UTC).date()
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"{root} is not empty")
    root.mkdir(parents=True, exist_ok=True)
    writer = _SampleWriter(root, sample_day)
    sources = [MetadataSource.TAGS] * (studies - 2) + [MetadataSource.SIDECAR, MetadataSource.NONE]
    for number, source in enumerate(sources, start=1):
        writer.add_generated_study(number, source, series_per_study, instances_per_series)
    if include_bundled:
        for bundled in BUNDLED_FILES:
            writer.add_bundled(bundled)
    if include_bad:
        writer.add_bad_files()
    return SampleManifest(
        root=root,
        day=sample_day.isoformat(),
        studies=tuple(writer.studies),
        bad_files=tuple(writer.bad_files),
    )
