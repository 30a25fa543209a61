"""Classifying a staging area in worker processes or threads: same results, same order, nothing lost."""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
import warnings
from pathlib import Path

import pytest
from pydicom import config as pydicom_config

from dicom_ingest.metadata.fields import DEFAULT_TAG_MAPPING
from dicom_ingest.sites.config import SiteConfig
from dicom_ingest.sites.runtime import SiteRuntime
from dicom_ingest.staging import parallel
from dicom_ingest.staging.catalog import ScanCatalog
from dicom_ingest.staging.classify import Classification, HeaderClassifier, Reason, quiet_pydicom
from dicom_ingest.staging.options import StagingOptions
from dicom_ingest.staging.parallel import ClassifierSettings, classify_entries
from dicom_ingest.staging.scan import scan_staging
from dicom_ingest.staging.source import StagingSource
from tests.sites.conftest import MINIMAL_ENTRY
from tests.staging.factory import uid, write_instance

pytestmark = pytest.mark.skipif(
    not parallel.sys.platform.startswith("linux"), reason="workers fork: Linux only"
)

SETTINGS = ClassifierSettings(
    max_file_size=10**9, header_prefix_bytes=64 * 1024, tag_mapping=DEFAULT_TAG_MAPPING
)
CHUNK = 4


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of four files, so that a small area spans many chunks and studies cross them."""
    monkeypatch.setattr(parallel, "CHUNK_ENTRIES", CHUNK)
    monkeypatch.setattr(parallel, "THREAD_CHUNK_ENTRIES", CHUNK)


@pytest.fixture
def mixed_area(staging_root: Path) -> StagingSource:
    """Twenty-odd files: studies that cross chunks, each instance with its own PatientAge, and bad files."""
    for study in range(3):
        for number in range(7):
            write_instance(
                staging_root / f"s{study}/{number:02d}.dcm",
                study_uid=uid(40, study),
                sop_uid=uid(40, study, number),
                patient_age=f"{30 + number:03d}Y",
            )
    (staging_root / "s1/03-notes.txt").write_text("not an instance")
    (staging_root / "s1/04-empty.dcm").write_bytes(b"")
    (staging_root / "s2/00-cut.dcm").write_bytes((staging_root / "s2/01.dcm").read_bytes()[:300])
    return StagingSource.from_uri(str(staging_root))


def _one_pass(source: StagingSource) -> list[Classification]:
    classifier = HeaderClassifier(
        source,
        max_file_size=SETTINGS.max_file_size,
        header_prefix_bytes=SETTINGS.header_prefix_bytes,
        tag_mapping=SETTINGS.tag_mapping,
    )
    return [classifier.classify(entry) for entry in source.walk()]


def _in_workers(source: StagingSource, processes: int = 3) -> list[Classification]:
    return list(classify_entries(source, SETTINGS, source.walk(), processes=processes))


def test_workers_give_what_one_pass_gives_in_listing_order(mixed_area: StagingSource) -> None:
    expected = _one_pass(mixed_area)
    assert len(expected) > 4 * CHUNK
    assert {c.record.reason for c in expected} >= {Reason.VALID, Reason.NOT_DICOM, Reason.ZERO_BYTE}

    assert _in_workers(mixed_area) == expected


def test_a_study_continuing_into_the_next_chunk_keeps_the_first_files_metadata_only(
    mixed_area: StagingSource,
) -> None:
    results = _in_workers(mixed_area)

    with_metadata = [c.record.relative_path for c in results if c.order_fields]
    assert with_metadata == ["s0/00.dcm", "s1/00.dcm", "s2/00.dcm"]
    assert results[0].order_fields["patient_age"] == 30


def test_a_worker_that_dies_loses_no_file(
    mixed_area: StagingSource, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    expected = _one_pass(mixed_area)
    scanning_process = os.getpid()
    classify = HeaderClassifier.classify

    def die_in_a_worker(self: HeaderClassifier, entry):  # type: ignore[no-untyped-def]
        if entry.relative_path == "s1/05.dcm" and os.getpid() != scanning_process:
            os._exit(1)
        return classify(self, entry)

    monkeypatch.setattr(HeaderClassifier, "classify", die_in_a_worker)

    with caplog.at_level(logging.WARNING, logger=parallel.__name__):
        results = _in_workers(mixed_area)

    assert results == expected
    assert "A scan worker process stopped unexpectedly" in caplog.text
    assert multiprocessing.active_children() == []


def test_workers_are_gone_after_a_scan(mixed_area: StagingSource) -> None:
    _in_workers(mixed_area)

    assert multiprocessing.active_children() == []


def _no_pool(*args: object, **kwargs: object) -> None:
    raise AssertionError("no worker process should be started")


def _remote(staging_root: Path) -> StagingSource:
    """The area read through ObjectStoragePath, as an s3:// area is."""
    remote = StagingSource.from_uri(str(staging_root))
    remote.is_local = False
    return remote


@pytest.mark.parametrize("processes", [1, 4])
def test_one_process_object_stores_and_small_areas_start_no_process(
    mixed_area: StagingSource, staging_root: Path, monkeypatch: pytest.MonkeyPatch, processes: int
) -> None:
    monkeypatch.setattr(parallel, "ProcessPoolExecutor", _no_pool)
    monkeypatch.setattr(parallel, "ThreadPoolExecutor", _no_pool)
    expected = _one_pass(mixed_area)
    remote = _remote(staging_root)
    small = list(mixed_area.walk())[: CHUNK - 1]

    assert list(classify_entries(remote, SETTINGS, remote.walk(), processes=processes, threads=1)) == expected
    assert list(classify_entries(mixed_area, SETTINGS, small, processes=processes)) == expected[: CHUNK - 1]
    assert _in_workers(mixed_area, 1) == expected


class _OverlapMeter:
    """Wraps StagingSource.read_prefix to count the header reads under way at once (each made slow)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.most = 0
        self._now = 0
        self._lock = threading.Lock()
        real_read_prefix = StagingSource.read_prefix

        def slow_read_prefix(source: StagingSource, relative_path: str, size: int) -> bytes:
            with self._lock:
                self._now += 1
                self.most = max(self.most, self._now)
            try:
                time.sleep(0.01)  # a round trip to the store
                return real_read_prefix(source, relative_path, size)
            finally:
                with self._lock:
                    self._now -= 1

        monkeypatch.setattr(StagingSource, "read_prefix", slow_read_prefix)


def test_an_object_store_area_is_read_in_threads_with_one_pass_results_in_order(
    mixed_area: StagingSource, staging_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = _one_pass(mixed_area)
    monkeypatch.setattr(parallel, "ProcessPoolExecutor", _no_pool)
    meter = _OverlapMeter(monkeypatch)
    remote = _remote(staging_root)

    results = list(classify_entries(remote, SETTINGS, remote.walk(), processes=3, threads=4))

    assert results == expected
    with_metadata = [c.record.relative_path for c in results if c.order_fields]
    assert with_metadata == ["s0/00.dcm", "s1/00.dcm", "s2/00.dcm"]
    assert 1 < meter.most <= 4
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("dicom-ingest-scan")]


def test_one_thread_reads_an_object_store_area_one_file_at_a_time(
    mixed_area: StagingSource, staging_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    meter = _OverlapMeter(monkeypatch)
    remote = _remote(staging_root)

    list(classify_entries(remote, SETTINGS, remote.walk(), processes=3, threads=1))

    assert meter.most == 1


def test_pydicom_stays_quiet_until_the_last_thread_parsing_leaves() -> None:
    mode_before = pydicom_config.settings.reading_validation_mode
    filters_before = list(warnings.filters)
    first_inside, second_inside, first_left = threading.Event(), threading.Event(), threading.Event()
    seen_by_second: list[int] = []

    def first() -> None:
        with quiet_pydicom():
            first_inside.set()
            second_inside.wait(5)
        first_left.set()

    def second() -> None:
        first_inside.wait(5)
        with quiet_pydicom():
            second_inside.set()
            first_left.wait(5)
            seen_by_second.append(pydicom_config.settings.reading_validation_mode)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert seen_by_second == [pydicom_config.IGNORE]  # the first thread's leaving did not end it
    assert pydicom_config.settings.reading_validation_mode == mode_before
    assert warnings.filters == filters_before


def test_scan_staging_uses_the_sites_processes_and_fills_the_catalog_alike(
    mixed_area: StagingSource, tmp_path: Path
) -> None:
    catalogs = {}
    for processes in (1, 3):
        catalog = ScanCatalog(tmp_path / f"scan-{processes}.sqlite")
        scan_staging(mixed_area, StagingOptions(scan_processes=processes), catalog)
        catalogs[processes] = (
            [record for record in catalog.iter_records(set(Reason))],
            {study: catalog.tag_fields(study) for study in (uid(40, 0), uid(40, 1), uid(40, 2))},
        )
        catalog.close()

    assert catalogs[3] == catalogs[1]


def test_default_processes_follow_the_cpus_the_task_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: set(range(32)))
    assert parallel.default_scan_processes() == parallel.MAX_SCAN_PROCESSES
    monkeypatch.setattr(parallel.os, "sched_getaffinity", lambda pid: {0, 1})
    assert parallel.default_scan_processes() == 2


@pytest.mark.parametrize("key", ["scan_processes", "scan_threads"])
def test_a_sites_scan_processes_and_threads_reach_the_scan_and_must_be_positive(key: str) -> None:
    assert getattr(SiteRuntime(SiteConfig.model_validate(MINIMAL_ENTRY)).staging_options(), key) is None
    site = SiteConfig.model_validate({**MINIMAL_ENTRY, key: 3})
    assert getattr(SiteRuntime(site).staging_options(), key) == 3
    with pytest.raises(ValueError, match=key):
        SiteConfig.model_validate({**MINIMAL_ENTRY, key: 0})


def test_scan_staging_passes_the_sites_threads_for_an_object_store_area(
    mixed_area: StagingSource, staging_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    meter = _OverlapMeter(monkeypatch)
    catalog = ScanCatalog(tmp_path / "scan.sqlite")
    scan_staging(_remote(staging_root), StagingOptions(scan_threads=2), catalog)
    catalog.close()

    assert meter.most == 2
