"""Scan a staging area into a :class:`~dicom_ingest.staging.catalog.ScanCatalog`.

Every listed file is classified once, as it is listed (in worker processes for a local area, in
threads for an object-store one; see :mod:`dicom_ingest.staging.parallel`), and streamed into the
catalog in listing order. Files whose SOPInstanceUID repeats are then compared by content: only
those are read in full (and hashed), so a normal scan reads headers only.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass

from dicom_ingest.staging.catalog import ScanCatalog
from dicom_ingest.staging.classify import InstanceRecord, Reason
from dicom_ingest.staging.options import StagingOptions
from dicom_ingest.staging.parallel import (
    DEFAULT_SCAN_THREADS,
    ClassifierSettings,
    classify_entries,
    default_scan_processes,
)
from dicom_ingest.staging.source import EntryKind, SourceEntry, StagingSource

log = logging.getLogger(__name__)

HASH_CHUNK_BYTES = 1024 * 1024
PROGRESS_EVERY = 10_000


@dataclass(frozen=True)
class ScanTotals:
    """Counts from one scan.

    :param classified: files given a reason code.
    :param ignored: files left out by the site's ignore patterns or as the manifest.
    :param sidecars: sidecar files found.
    """

    classified: int
    ignored: int
    sidecars: int


def scan_staging(
    source: StagingSource,
    options: StagingOptions,
    catalog: ScanCatalog,
    *,
    excluded_paths: Collection[str] = (),
) -> ScanTotals:
    """Classify every file of ``source`` into ``catalog``, then settle repeated SOPInstanceUIDs.

    :param source: the staging area.
    :param options: the site's staging options.
    :param catalog: an empty catalog to fill.
    :param excluded_paths: relative paths that are not instances (e.g. a manifest in the root).
    """
    settings = ClassifierSettings(
        max_file_size=int(options.max_file_size),
        header_prefix_bytes=int(options.header_prefix_bytes),
        tag_mapping=options.metadata.tag_mapping,
    )
    processes = options.scan_processes or default_scan_processes()
    threads = options.scan_threads or DEFAULT_SCAN_THREADS
    counts = Counter[str]()

    def instance_entries() -> Iterator[SourceEntry]:
        """Yield the entries to classify; note sidecars and ignored files on the way."""
        for entry in source.walk():
            if entry.kind is EntryKind.FILE and entry.name == options.metadata.sidecar_name:
                catalog.add_sidecar(entry.folder, entry.relative_path)
                counts["sidecars"] += 1
            elif entry.relative_path in excluded_paths or _ignored(entry, options.ignore_patterns):
                counts["ignored"] += 1
            else:
                yield entry

    classified = 0
    classifications = classify_entries(
        source, settings, instance_entries(), processes=processes, threads=threads
    )
    for classification in classifications:
        catalog.add(classification)
        classified += 1
        if classified % PROGRESS_EVERY == 0:
            log.info("Classified %d files of %s", classified, source.uri)
    catalog.flush()
    settle_repeated_sops(source, catalog)
    ignored, sidecars = counts["ignored"], counts["sidecars"]
    log.info(
        "Scanned %s: %d files classified, %d ignored, %d sidecars", source.uri, classified, ignored, sidecars
    )
    return ScanTotals(classified=classified, ignored=ignored, sidecars=sidecars)


def _ignored(entry: SourceEntry, patterns: Collection[str]) -> bool:
    return any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in patterns)


def settle_repeated_sops(source: StagingSource, catalog: ScanCatalog) -> None:
    """Mark files that repeat a SOPInstanceUID ``duplicate`` or ``conflict``.

    Files with identical content are duplicates: the first in path order stays valid, the others
    become ``duplicate``. If the content differs anywhere in the group, every file of the group
    becomes ``conflict`` (which holds their studies back): nobody can tell which one is right.

    :param source: the staging area, to read the repeated files.
    :param catalog: the filled catalog.
    """
    for sop_uid in catalog.repeated_sops():
        digests: dict[str, str] = {}
        unreadable: list[tuple[str, Reason, str]] = []
        for record in catalog.files_of_sop(sop_uid):
            try:
                digests[record.relative_path] = _content_digest(source, record)
            except OSError as exc:
                problem = f"could not be read to compare it with other copies ({type(exc).__name__})"
                unreadable.append(
                    (record.relative_path, Reason.UNREADABLE, f"{record.relative_path}: {problem}")
                )
        catalog.reclassify(unreadable)
        if len(digests) < 2:
            continue
        paths = list(digests)
        if len(set(digests.values())) == 1:
            catalog.reclassify(
                (
                    path,
                    Reason.DUPLICATE,
                    f"{path}: same SOPInstanceUID {sop_uid} and bytes as {paths[0]}; kept once",
                )
                for path in paths[1:]
            )
        else:
            catalog.reclassify(
                (
                    path,
                    Reason.CONFLICT,
                    f"{path}: SOPInstanceUID {sop_uid} is also in {len(paths) - 1} other file(s) "
                    "with different bytes; the study is held back",
                )
                for path in paths
            )


def _content_digest(source: StagingSource, record: InstanceRecord) -> str:
    digest = hashlib.sha256()
    with source.open(record.relative_path) as stream:
        while chunk := stream.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
