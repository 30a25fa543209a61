"""Scanning into the catalog: duplicates, conflicts, sidecars, ignored files, flat memory."""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

import pytest

from dicom_ingest.staging.catalog import ScanCatalog
from dicom_ingest.staging.classify import Reason
from dicom_ingest.staging.options import StagingOptions
from dicom_ingest.staging.plan import build_plan
from dicom_ingest.staging.scan import scan_staging
from dicom_ingest.staging.source import StagingSource
from tests.staging.factory import clone_study, uid, write_instance


@pytest.fixture
def catalog(tmp_path: Path):
    catalog = ScanCatalog(tmp_path / "scan.sqlite")
    yield catalog
    catalog.close()


def _reasons(catalog: ScanCatalog) -> dict[str, Reason]:
    return {record.relative_path: record.reason for record in catalog.iter_records(set(Reason))}


def test_identical_copies_are_kept_once_and_different_bytes_conflict(
    staging_root: Path, catalog: ScanCatalog
) -> None:
    original = write_instance(staging_root / "a/1.dcm", study_uid=uid(10), sop_uid=uid(10, 1))
    (staging_root / "b").mkdir()
    (staging_root / "b/1-copy.dcm").write_bytes(original.read_bytes())
    (staging_root / "c").mkdir()
    (staging_root / "c/1-again.dcm").write_bytes(original.read_bytes())
    write_instance(staging_root / "a/2.dcm", study_uid=uid(11), sop_uid=uid(11, 1), patient_age="050Y")
    write_instance(staging_root / "b/2-edited.dcm", study_uid=uid(11), sop_uid=uid(11, 1), patient_age="051Y")
    write_instance(staging_root / "a/3.dcm", study_uid=uid(11), sop_uid=uid(11, 2))

    scan_staging(StagingSource.from_uri(str(staging_root)), StagingOptions(), catalog)

    assert _reasons(catalog) == {
        "a/1.dcm": Reason.VALID,
        "b/1-copy.dcm": Reason.DUPLICATE,
        "c/1-again.dcm": Reason.DUPLICATE,
        "a/2.dcm": Reason.CONFLICT,
        "b/2-edited.dcm": Reason.CONFLICT,
        "a/3.dcm": Reason.VALID,
    }
    messages = {record.relative_path: record.message for record in catalog.iter_records(set(Reason))}
    assert messages["b/1-copy.dcm"] == (
        f"b/1-copy.dcm: same SOPInstanceUID {uid(10, 1)} and bytes as a/1.dcm; kept once"
    )
    assert catalog.conflicting_studies() == {uid(11)}


def test_sidecars_are_noted_and_ignored_patterns_skipped(staging_root: Path, catalog: ScanCatalog) -> None:
    write_instance(staging_root / "s/1.dcm", study_uid=uid(12), sop_uid=uid(12, 1))
    (staging_root / "s/metadata.json").write_text("{}")
    (staging_root / ".DS_Store").write_bytes(b"junk")
    (staging_root / "readme.txt").write_text("not an instance, and not ignored")
    options = StagingOptions(ignore_patterns=(".*",))

    totals = scan_staging(StagingSource.from_uri(str(staging_root)), options, catalog)

    assert (totals.classified, totals.ignored, totals.sidecars) == (2, 1, 1)
    assert _reasons(catalog) == {"readme.txt": Reason.NOT_DICOM, "s/1.dcm": Reason.VALID}
    assert catalog.nearest_sidecar("s") == ("s", "s/metadata.json")


def _peak_planning_memory(root: Path, work: Path, studies: int, instances_per_study: int) -> int:
    for study in range(studies):
        clone_study(root, f"study{study:04d}/series1", study, instances_per_study)
    gc.collect()
    tracemalloc.start()
    try:
        # One process: worker processes keep up to a few chunks of results in flight, whose
        # share of the peak depends on timing, not on the number of files.
        options = StagingOptions(max_batch_instances=1_000, scan_processes=1)
        plan = build_plan(str(root), str(work), options)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(batch.instances for batch in plan.batches) == studies * instances_per_study
    return peak


@pytest.mark.slow
def test_planning_memory_does_not_grow_with_the_number_of_files(tmp_path: Path) -> None:
    _peak_planning_memory(tmp_path / "warm-up", tmp_path / "work-warm-up", 1, 10)  # first-use caches
    small = _peak_planning_memory(tmp_path / "small", tmp_path / "work-small", 10, 100)
    large = _peak_planning_memory(tmp_path / "large", tmp_path / "work-large", 40, 100)

    # Four times the files: a plan that kept its records in memory would need about four times
    # the memory; a streaming one needs about the same.
    assert large < small * 1.5, (small, large)
    assert large < 4 * 1024 * 1024, large
