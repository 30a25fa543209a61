"""Turn a staging area into an upload plan of batches of whole studies, written as files.

:func:`build_plan` scans the staging area into a scratch catalog, settles duplicates, halts on
too many invalid files (before anything is uploaded or moved), quarantines invalid files,
resolves every study's order metadata, holds back studies with a conflicting instance or with
missing required metadata, skips studies already done, and packs the rest into batches.

Batches are bounded by instance count and bytes and never split a study: the vendor overwrites
a study re-sent within 5 minutes, so a study goes out whole, from one task. A study larger than
the limits gets a batch of its own. Studies keep the order of their first file's path, so the
same staging area always gives the same plan.

The plan is written to a work location (a local folder or an object-store prefix):

- ``plan.json``: a small manifest: batch ids with study, instance and byte counts, counts per
  reason and per study outcome. No file paths and no tag values.
- ``batches/<batch id>.jsonl``: one line per study: its UID, its resolved order metadata, and
  its instances (relative path, size, SOP/series/study UIDs, SOP class, transfer syntax).
- ``invalid.jsonl``: every file that will not be uploaded, with its reason and message.

Only :attr:`Plan.batches` (ids and counts) is meant for XCom; a task reads its batch with
:meth:`Plan.iter_batch`, one study at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, TextIO

from airflow.sdk import ObjectStoragePath

from dicom_ingest.metadata.errors import MetadataSourceError
from dicom_ingest.metadata.fields import ACCESSION_NUMBER, FieldValue
from dicom_ingest.metadata.options import ManifestKey, MetadataOptions
from dicom_ingest.metadata.resolve import resolve_metadata
from dicom_ingest.metadata.sources import MAX_SIDECAR_BYTES, ManifestReader, SidecarContent, parse_sidecar
from dicom_ingest.staging.catalog import ScanCatalog, StudyDecision, StudyRow, StudyStatus
from dicom_ingest.staging.classify import QUARANTINE_REASONS, InstanceRecord, Reason
from dicom_ingest.staging.errors import StagingError, StagingThresholdError
from dicom_ingest.staging.options import StagingOptions
from dicom_ingest.staging.quarantine import Quarantine, check_threshold
from dicom_ingest.staging.scan import scan_staging
from dicom_ingest.staging.source import LOCAL_PROTOCOLS, StagingSource, to_storage_path

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
BATCH_FOLDER = "batches"
INVALID_FILE = "invalid.jsonl"
PLAN_FORMAT_VERSION = 1
DECISION_CHUNK = 500

SkipStudy = Callable[[str], bool]
"""Tells whether a study (by StudyInstanceUID) is already done and must not be planned."""


@dataclass(frozen=True)
class BatchSummary:
    """A batch as XCom sees it: an id and counts.

    :param batch_id: the batch's id, also the name of its JSON-lines file.
    :param studies: number of studies.
    :param instances: number of instances.
    :param bytes: total size of the instances.
    """

    batch_id: str
    studies: int
    instances: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        """Return the summary as a JSON-able dict."""
        return asdict(self)


@dataclass(frozen=True)
class PlannedInstance:
    """One instance to upload.

    :param relative_path: the path below the staging root.
    :param size: its size in bytes.
    :param study_uid: StudyInstanceUID.
    :param series_uid: SeriesInstanceUID.
    :param sop_uid: SOPInstanceUID.
    :param sop_class_uid: SOPClassUID.
    :param transfer_syntax_uid: TransferSyntaxUID.
    """

    relative_path: str
    size: int
    study_uid: str
    series_uid: str | None
    sop_uid: str
    sop_class_uid: str | None
    transfer_syntax_uid: str | None


@dataclass(frozen=True)
class PlannedStudy:
    """A study to upload whole.

    :param study_uid: StudyInstanceUID.
    :param metadata: its resolved order metadata (patient data: never log it).
    :param instances: its instances, in path order.
    """

    study_uid: str
    metadata: dict[str, FieldValue] = field(repr=False)
    instances: tuple[PlannedInstance, ...] = field(repr=False)

    @property
    def bytes(self) -> int:
        """Total size of the study's instances."""
        return sum(instance.size for instance in self.instances)

    def to_dict(self) -> dict[str, Any]:
        """Return the study as a JSON-able dict (as stored in its batch file)."""
        return {
            "study_uid": self.study_uid,
            "metadata": self.metadata,
            "instances": [asdict(instance) for instance in self.instances],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlannedStudy:
        """Rebuild a study from :meth:`to_dict` output.

        :param data: the dict.
        """
        return cls(
            study_uid=data["study_uid"],
            metadata=data["metadata"],
            instances=tuple(PlannedInstance(**instance) for instance in data["instances"]),
        )


class Plan:
    """A written plan: its manifest in memory, batches and invalid files streamed from files.

    :param work: the work location holding the plan files.
    :param manifest: the content of ``plan.json``.
    """

    def __init__(self, work: ObjectStoragePath, manifest: dict[str, Any]) -> None:
        self.work = work
        self.manifest = manifest
        self.batches = tuple(BatchSummary(**batch) for batch in manifest["batches"])

    @classmethod
    def load(cls, work_uri: str) -> Plan:
        """Read the plan written to ``work_uri`` by :func:`build_plan`.

        :param work_uri: the work location.
        :raises StagingError: there is no plan there.
        """
        work = to_storage_path(work_uri)
        plan_file = work / PLAN_FILE
        try:
            manifest = json.loads(plan_file.read_text())
        except FileNotFoundError:
            raise StagingError(f"no plan at {work_uri} ({PLAN_FILE} is missing)") from None
        if manifest.get("version") != PLAN_FORMAT_VERSION:
            raise StagingError(
                f"{plan_file} has plan format {manifest.get('version')!r}, not {PLAN_FORMAT_VERSION}"
            )
        return cls(work, manifest)

    @property
    def source_uri(self) -> str:
        """The staging area the plan's relative paths are below."""
        return str(self.manifest["source_uri"])

    @property
    def reason_counts(self) -> dict[str, int]:
        """Files per reason code."""
        return dict(self.manifest["files"]["per_reason"])

    @property
    def batch_ids(self) -> list[str]:
        """The batch ids, in plan order."""
        return [batch.batch_id for batch in self.batches]

    def source(self) -> StagingSource:
        """Open the staging area the plan was made from."""
        return StagingSource.from_uri(self.source_uri)

    def batch(self, batch_id: str) -> BatchSummary:
        """Return one batch's summary.

        :param batch_id: a batch id of this plan.
        :raises KeyError: the plan has no such batch.
        """
        for batch in self.batches:
            if batch.batch_id == batch_id:
                return batch
        raise KeyError(f"plan at {self.work} has no batch {batch_id!r}")

    def iter_batch(self, batch_id: str) -> Iterator[PlannedStudy]:
        """Stream a batch's studies, one at a time.

        :param batch_id: a batch id of this plan.
        """
        self.batch(batch_id)
        with (self.work / BATCH_FOLDER / f"{batch_id}.jsonl").open("r") as lines:
            for line in lines:
                if line.strip():
                    yield PlannedStudy.from_dict(json.loads(line))

    def iter_invalid(self) -> Iterator[InstanceRecord]:
        """Stream every file that is not uploaded, with its reason."""
        with (self.work / INVALID_FILE).open("r") as lines:
            for line in lines:
                if line.strip():
                    yield InstanceRecord.from_dict(json.loads(line))


def build_plan(
    staging_uri: str,
    work_uri: str,
    options: StagingOptions | None = None,
    *,
    skip_study: SkipStudy | None = None,
    scanned_at: datetime | None = None,
    scratch_dir: Path | None = None,
) -> Plan:
    """Scan ``staging_uri`` and write an upload plan to ``work_uri``.

    :param staging_uri: the staging area (plain path, ``file://`` or ``s3://[conn_id@]bucket/prefix``).
    :param work_uri: where the plan files go; a previous plan there is replaced.
    :param options: the site's staging options (defaults when ``None``).
    :param skip_study: tells which studies are already done (e.g. verified in the ledger).
    :param scanned_at: the scan time recorded in reason files; now when ``None``.
    :param scratch_dir: a local folder for the scratch catalog; the work location when it is
        local, else the system's temporary folder.
    :raises StagingThresholdError: too many invalid files; nothing was quarantined or planned,
        and ``invalid.jsonl`` lists them.
    :raises MetadataSourceError: a sidecar or the manifest is malformed.
    """
    options = options or StagingOptions()
    scanned_at = scanned_at or datetime.now(UTC)
    source = StagingSource.from_uri(staging_uri)
    work = to_storage_path(work_uri)
    _remove_previous_plan(work)
    manifest_path, excluded = _manifest_location(source, options.metadata)
    with _scratch_catalog(work, scratch_dir) as catalog:
        manifest_key = _load_manifest(catalog, manifest_path, options.metadata) if manifest_path else None
        totals = scan_staging(source, options, catalog, excluded_paths=excluded)
        invalid_file = work / INVALID_FILE
        try:
            check_threshold(catalog.reason_counts(), options.invalid_threshold, report_uri=str(invalid_file))
        except StagingThresholdError:
            _write_lines(
                invalid_file, (r.to_dict() for r in catalog.iter_records({Reason.VALID}, exclude=True))
            )
            raise
        quarantine = Quarantine(source, options.quarantine_policy, options.quarantine_uri, scanned_at)
        quarantined = quarantine.apply(catalog.iter_records(QUARANTINE_REASONS))
        catalog.group_studies()
        _StudyDecider(source, catalog, options.metadata, manifest_key, skip_study).decide_all()
        catalog.hold_back_instances()
        _write_lines(invalid_file, (r.to_dict() for r in catalog.iter_records({Reason.VALID}, exclude=True)))
        batches = _write_batches(work, catalog, options)
        manifest = {
            "version": PLAN_FORMAT_VERSION,
            "created_at": datetime.now(UTC).isoformat(),
            "scanned_at": scanned_at.isoformat(),
            "source_uri": source.uri,
            "files": {
                "classified": totals.classified,
                "ignored": totals.ignored,
                "sidecars": totals.sidecars,
                "quarantined": quarantined,
                "quarantine_policy": options.quarantine_policy.value,
                "per_reason": catalog.reason_counts(),
            },
            "studies": catalog.status_counts(),
            "limits": {
                "max_batch_instances": options.max_batch_instances,
                "max_batch_bytes": int(options.max_batch_bytes),
            },
            "batches": [batch.to_dict() for batch in batches],
            "invalid_files": INVALID_FILE,
        }
    (work / PLAN_FILE).write_text(json.dumps(manifest, indent=2))
    log.info(
        "Plan written to %s: %d batches, %d instances planned",
        work,
        len(batches),
        sum(batch.instances for batch in batches),
    )
    return Plan(work, manifest)


def _remove_previous_plan(work: ObjectStoragePath) -> None:
    """Delete an earlier plan, ``plan.json`` first, so a half-written plan is never read as whole."""
    work.mkdir(parents=True, exist_ok=True)
    for name in (PLAN_FILE, INVALID_FILE):
        (work / name).unlink(missing_ok=True)
    batches = work / BATCH_FOLDER
    if batches.exists():
        batches.fs.rm(batches.path, recursive=True)


@contextlib.contextmanager
def _scratch_catalog(work: ObjectStoragePath, scratch_dir: Path | None) -> Iterator[ScanCatalog]:
    """Create the scratch catalog in a local folder and delete it afterwards."""
    with contextlib.ExitStack() as stack:
        if scratch_dir is None and work.protocol in LOCAL_PROTOCOLS:
            scratch_dir = Path(work.path)
        if scratch_dir is None:
            scratch_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dicom-ingest-scan-")))
        path = scratch_dir / f".scan-{uuid.uuid4().hex}.sqlite"
        catalog = ScanCatalog(path)
        try:
            yield catalog
        finally:
            catalog.close()
            path.unlink(missing_ok=True)


def _manifest_location(
    source: StagingSource, options: MetadataOptions
) -> tuple[ObjectStoragePath | None, frozenset[str]]:
    """Return the manifest's path and, when it lies in the staging area, its relative path to skip."""
    if options.manifest is None:
        return None, frozenset()
    manifest = options.manifest.strip()
    if "://" in manifest or Path(manifest).is_absolute():
        return to_storage_path(manifest), frozenset()
    relative = manifest.strip("/")
    return source.path(relative), frozenset({relative})


def _load_manifest(catalog: ScanCatalog, path: ObjectStoragePath, options: MetadataOptions) -> ManifestKey:
    """Load the manifest into the catalog, refusing malformed lines and repeated keys; return its key."""
    location = options.manifest or str(path)
    try:
        stream: TextIO = path.open("r", encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise MetadataSourceError(location, 1, "the manifest does not exist") from None
    with stream:
        reader = ManifestReader(stream, location, options.known_fields, options.manifest_key)
        try:
            for row in reader:
                earlier = catalog.add_manifest_row(row.key, row.line, row.fields)
                if earlier is not None:
                    raise MetadataSourceError(location, row.line, f"the same key as line {earlier}")
        except UnicodeDecodeError:
            raise MetadataSourceError(location, 1, "not UTF-8 text") from None
    if reader.key is None:
        raise MetadataSourceError(location, 1, "no header row")
    return reader.key


class _SidecarReader:
    """Read and parse sidecars, remembering the last few (a folder's sidecar may be asked often)."""

    def __init__(self, source: StagingSource, options: MetadataOptions) -> None:
        self._source = source
        self._known_fields = options.known_fields
        self.read = lru_cache(maxsize=64)(self._read)

    def _read(self, relative_path: str) -> SidecarContent:
        with self._source.open(relative_path) as stream:
            raw = stream.read(MAX_SIDECAR_BYTES + 1)
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise MetadataSourceError(relative_path, 1, "not UTF-8 text") from None
        return parse_sidecar(text, relative_path, self._known_fields)


class _StudyDecider:
    """Decide for each study: planned (with its metadata), held back, or skipped as done.

    :param source: the staging area, to read sidecars.
    :param catalog: the filled, grouped catalog.
    :param options: the site's metadata options.
    :param manifest_key: what the loaded manifest is keyed by, ``None`` without a manifest.
    :param skip_study: tells which studies are already done.
    """

    def __init__(
        self,
        source: StagingSource,
        catalog: ScanCatalog,
        options: MetadataOptions,
        manifest_key: ManifestKey | None,
        skip_study: SkipStudy | None,
    ) -> None:
        self._catalog = catalog
        self._options = options
        self._manifest_key = manifest_key
        self._skip_study = skip_study
        self._sidecars = _SidecarReader(source, options) if options.sidecar_name else None
        self._conflicting = catalog.conflicting_studies()

    def decide_all(self) -> None:
        """Decide for every grouped study and store the decisions in the catalog."""
        pending: list[StudyDecision] = []
        for study in self._catalog.grouped_studies():
            pending.append(self.decide(study))
            if len(pending) >= DECISION_CHUNK:
                self._catalog.decide(pending)
                pending = []
        self._catalog.decide(pending)

    def decide(self, study: StudyRow) -> StudyDecision:
        """Decide for one study: a conflict holds it back, then done studies are skipped, then
        a study missing required metadata is held back; the rest is planned.

        :param study: the grouped study.
        """
        uid = study.study_uid
        if uid in self._conflicting:
            return StudyDecision(
                uid,
                StudyStatus.HELD_BACK,
                Reason.CONFLICT,
                "one of its instances exists with different bytes",
            )
        if self._skip_study is not None and self._skip_study(uid):
            return StudyDecision(uid, StudyStatus.SKIPPED_DONE)
        tags = self._catalog.tag_fields(uid)
        sidecar, note = self._sidecar_fields(study)
        resolved = resolve_metadata(
            self._options.required_fields,
            tags=tags,
            sidecar=sidecar,
            manifest=self._manifest_fields(uid, tags, sidecar),
        )
        if resolved.missing:
            message = f"missing required metadata: {', '.join(resolved.missing)}{note}"
            return StudyDecision(uid, StudyStatus.HELD_BACK, Reason.METADATA_MISSING, message)
        return StudyDecision(uid, StudyStatus.PLANNED, fields=resolved.fields)

    def _manifest_fields(
        self, study_uid: str, tags: dict[str, FieldValue], sidecar: dict[str, FieldValue]
    ) -> dict[str, FieldValue] | None:
        """Return the study's manifest row, found by its UID or by its accession number."""
        if self._manifest_key is ManifestKey.STUDY_UID:
            return self._catalog.manifest_fields(study_uid)
        if self._manifest_key is ManifestKey.ACCESSION_NUMBER:
            accession = sidecar.get(ACCESSION_NUMBER, tags.get(ACCESSION_NUMBER))
            return self._catalog.manifest_fields(str(accession)) if accession is not None else None
        return None

    def _sidecar_fields(self, study: StudyRow) -> tuple[dict[str, FieldValue], str]:
        """Return the sidecar fields that apply to ``study``, and a note when a sidecar was not used.

        The nearest sidecar at or above the study's folder applies when it names this study's
        StudyInstanceUID, or names none and its folder holds this study only. A sidecar that
        names another study while its folder holds only this one is misplaced: an error.
        """
        found = self._catalog.nearest_sidecar(study.folder) if self._sidecars else None
        if self._sidecars is None or found is None:
            return {}, ""
        folder, relative_path = found
        content = self._sidecars.read(relative_path)
        alone = self._catalog.studies_below(folder) == 1
        if content.study_uid == study.study_uid or (content.study_uid is None and alone):
            return content.fields, ""
        if content.study_uid is not None and alone:
            raise MetadataSourceError(
                relative_path,
                1,
                f"it names StudyInstanceUID {content.study_uid}, but its folder holds {study.study_uid}",
            )
        if content.study_uid is not None:
            return {}, ""
        return {}, f"; {relative_path} was not used: its folder holds several studies and it names none"


def _write_lines(path: ObjectStoragePath, documents: Iterable[dict[str, Any]]) -> None:
    """Write one JSON document per line."""
    with path.open("w") as lines:
        for document in documents:
            lines.write(json.dumps(document) + "\n")


class _BatchWriter:
    """Pack studies into batches in order, writing each batch's file as it fills.

    :param folder: where the batch files go.
    :param max_instances: the most instances in a batch, unless one study alone has more.
    :param max_bytes: the most bytes in a batch, unless one study alone has more.
    """

    def __init__(self, folder: ObjectStoragePath, max_instances: int, max_bytes: int) -> None:
        self._folder = folder
        self._max_instances = max_instances
        self._max_bytes = max_bytes
        self._lines: TextIO | None = None
        self._current = BatchSummary(batch_id="", studies=0, instances=0, bytes=0)
        self.batches: list[BatchSummary] = []

    def add(self, study: PlannedStudy) -> None:
        """Append a study to the current batch, or start a new batch when it would overflow.

        :param study: the study with its instances.
        """
        current = self._current
        overflows = (
            current.instances + len(study.instances) > self._max_instances
            or current.bytes + study.bytes > self._max_bytes
        )
        lines = self._lines if self._lines is not None and not overflows else self._start_batch()
        lines.write(json.dumps(study.to_dict()) + "\n")
        current = self._current
        self._current = BatchSummary(
            batch_id=current.batch_id,
            studies=current.studies + 1,
            instances=current.instances + len(study.instances),
            bytes=current.bytes + study.bytes,
        )

    def _start_batch(self) -> TextIO:
        self.close()
        batch_id = f"batch-{len(self.batches) + 1:05d}"
        self._current = BatchSummary(batch_id=batch_id, studies=0, instances=0, bytes=0)
        self._lines = (self._folder / f"{batch_id}.jsonl").open("w")
        return self._lines

    def close(self) -> None:
        """Close the current batch's file and record its summary."""
        if self._lines is not None:
            self._lines.close()
            self._lines = None
            self.batches.append(self._current)


def _write_batches(
    work: ObjectStoragePath, catalog: ScanCatalog, options: StagingOptions
) -> list[BatchSummary]:
    """Write every planned study into batch files; return the batches' summaries."""
    folder = work / BATCH_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    writer = _BatchWriter(folder, options.max_batch_instances, int(options.max_batch_bytes))
    try:
        for study in catalog.decided_studies(StudyStatus.PLANNED):
            instances = tuple(
                PlannedInstance(
                    relative_path=record.relative_path,
                    size=record.size,
                    study_uid=study.study_uid,
                    series_uid=record.series_uid,
                    sop_uid=record.sop_uid or "",
                    sop_class_uid=record.sop_class_uid,
                    transfer_syntax_uid=record.transfer_syntax_uid,
                )
                for record in catalog.valid_instances_of(study.study_uid)
            )
            writer.add(PlannedStudy(study_uid=study.study_uid, metadata=study.fields, instances=instances))
    finally:
        writer.close()
    return writer.batches
