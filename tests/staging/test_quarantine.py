"""Quarantine policies and the invalid-file threshold, through the planning entry point."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dicom_ingest.exceptions import DicomIngestError
from dicom_ingest.staging.errors import StagingThresholdError
from dicom_ingest.staging.options import InvalidThreshold, QuarantinePolicy, StagingOptions
from dicom_ingest.staging.plan import build_plan
from dicom_ingest.staging.quarantine import check_threshold
from tests.staging.factory import uid, write_instance

SCANNED_AT = datetime(2026, 3, 1, 2, 30, tzinfo=UTC)


def _staging_with_defects(root: Path) -> None:
    """Two valid instances and three defects of three kinds, plus a DICOMDIR-free duplicate."""
    first = write_instance(root / "study/1.dcm", study_uid=uid(20), sop_uid=uid(20, 1))
    write_instance(root / "study/2.dcm", study_uid=uid(20), sop_uid=uid(20, 2))
    (root / "study/9-copy.dcm").write_bytes(first.read_bytes())
    (root / "junk").mkdir()
    (root / "junk/empty.dcm").touch()
    (root / "junk/notes.txt").write_text("not dicom")
    write_instance(root / "junk/no-study.dcm", study_uid="", sop_uid=uid(20, 9))


def test_record_policy_touches_nothing_and_lists_the_invalid_files(
    staging_root: Path, tmp_path: Path
) -> None:
    _staging_with_defects(staging_root)
    before = sorted(path.relative_to(staging_root) for path in staging_root.rglob("*"))

    plan = build_plan(str(staging_root), str(tmp_path / "work"), StagingOptions(), scanned_at=SCANNED_AT)

    assert sorted(path.relative_to(staging_root) for path in staging_root.rglob("*")) == before
    assert {(r.relative_path, r.reason.value) for r in plan.iter_invalid()} == {
        ("junk/empty.dcm", "zero_byte"),
        ("junk/no-study.dcm", "missing_study_uid"),
        ("junk/notes.txt", "not_dicom"),
        ("study/9-copy.dcm", "duplicate"),
    }
    assert plan.manifest["files"]["quarantined"] == 0


@pytest.mark.parametrize("policy", [QuarantinePolicy.COPY, QuarantinePolicy.MOVE])
def test_copy_and_move_set_defects_aside_with_a_reason_file(
    staging_root: Path, tmp_path: Path, policy: QuarantinePolicy
) -> None:
    _staging_with_defects(staging_root)
    quarantine = tmp_path / "quarantine"
    options = StagingOptions(quarantine_policy=policy, quarantine_uri=str(quarantine))

    plan = build_plan(str(staging_root), str(tmp_path / "work"), options, scanned_at=SCANNED_AT)

    defects = {
        "junk/empty.dcm": "zero_byte",
        "junk/notes.txt": "not_dicom",
        "junk/no-study.dcm": "missing_study_uid",
    }
    for relative_path, reason in defects.items():
        assert (quarantine / relative_path).exists()
        assert (staging_root / relative_path).exists() is (policy is QuarantinePolicy.COPY)
        document = json.loads((quarantine / f"{relative_path}.reason.json").read_text())
        assert document == {
            "relative_path": relative_path,
            "reason": reason,
            "message": document["message"],
            "size": (quarantine / relative_path).stat().st_size,
            "scanned_at": "2026-03-01T02:30:00+00:00",
        }
        assert document["message"].startswith(f"{relative_path}: ")
    assert (quarantine / "junk/notes.txt").read_text() == "not dicom"
    # duplicates are not defects: the first copy is uploaded, nothing is set aside
    assert not (quarantine / "study").exists()
    assert (staging_root / "study/9-copy.dcm").exists()
    assert plan.manifest["files"]["quarantined"] == 3
    assert plan.batches[0].instances == 2


def test_quarantine_location_is_required_for_copy_and_move() -> None:
    with pytest.raises(ValueError, match="needs a quarantine_uri"):
        StagingOptions(quarantine_policy="move")


def test_count_threshold_halts_before_anything_is_moved(staging_root: Path, tmp_path: Path) -> None:
    _staging_with_defects(staging_root)
    options = StagingOptions(
        quarantine_policy=QuarantinePolicy.MOVE,
        quarantine_uri=str(tmp_path / "quarantine"),
        invalid_threshold=InvalidThreshold(max_count=2),
    )

    with pytest.raises(StagingThresholdError) as raised:
        build_plan(str(staging_root), str(tmp_path / "work"), options)

    text = str(raised.value)
    assert "3 of 6 staged files are invalid, exceeding the limit of 2 invalid files" in text
    assert "duplicate=1, missing_study_uid=1, not_dicom=1, valid=2, zero_byte=1" in text
    assert isinstance(raised.value, DicomIngestError)
    assert not (tmp_path / "quarantine").exists()
    assert (staging_root / "junk/notes.txt").exists()
    assert not (tmp_path / "work/plan.json").exists()
    listed = [
        json.loads(line)["relative_path"]
        for line in (tmp_path / "work/invalid.jsonl").read_text().splitlines()
    ]
    assert listed == ["junk/empty.dcm", "junk/no-study.dcm", "junk/notes.txt", "study/9-copy.dcm"]


@pytest.mark.parametrize(
    ("threshold", "halts"),
    [
        (InvalidThreshold(max_fraction=0.5), False),  # 3 of 6 is not above one half
        (InvalidThreshold(max_fraction=0.49), True),
        (InvalidThreshold(max_count=3), False),
        (InvalidThreshold(max_count=3, max_fraction=0.1), True),
        (InvalidThreshold(), False),
    ],
)
def test_threshold_by_fraction_and_count(threshold: InvalidThreshold, halts: bool) -> None:
    counts = {"valid": 2, "duplicate": 1, "zero_byte": 1, "not_dicom": 1, "missing_study_uid": 1}

    if halts:
        with pytest.raises(StagingThresholdError):
            check_threshold(counts, threshold)
    else:
        check_threshold(counts, threshold)


def test_fraction_threshold_message_names_the_limit() -> None:
    with pytest.raises(StagingThresholdError, match=r"exceeding the limit of 10\.0% invalid files"):
        check_threshold({"valid": 1, "unreadable": 1}, InvalidThreshold(max_fraction=0.1))


def test_an_empty_staging_area_never_halts() -> None:
    check_threshold({}, InvalidThreshold(max_fraction=0.0, max_count=0))
