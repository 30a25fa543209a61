"""Grouping into studies, batching, holding back, skipping, and the written plan."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from dicom_ingest.staging.errors import StagingError
from dicom_ingest.staging.options import StagingOptions
from dicom_ingest.staging.plan import Plan, PlannedStudy, build_plan
from tests.staging.factory import PATIENT_ID, PATIENT_NAME, uid, write_instance, write_study


def _studies(root: Path, sizes: list[int], pixel_bytes: int = 16) -> list[str]:
    """Write one study per size (instances), in folders that sort in the given order."""
    study_uids = []
    for number, size in enumerate(sizes):
        study_uid = uid(30, number)
        write_study(root, f"s{number:02d}/series", study_uid, size, pixel_bytes=pixel_bytes)
        study_uids.append(study_uid)
    return study_uids


def _batch_layout(plan: Plan) -> list[list[str]]:
    return [[study.study_uid for study in plan.iter_batch(batch_id)] for batch_id in plan.batch_ids]


def test_batches_are_bounded_by_instances_and_keep_study_order(staging_root: Path, tmp_path: Path) -> None:
    s0, s1, s2, s3 = _studies(staging_root, [3, 2, 4, 1])

    plan = build_plan(str(staging_root), str(tmp_path / "work"), StagingOptions(max_batch_instances=5))

    assert _batch_layout(plan) == [[s0, s1], [s2, s3]]
    assert [(b.batch_id, b.studies, b.instances) for b in plan.batches] == [
        ("batch-00001", 2, 5),
        ("batch-00002", 2, 5),
    ]


def test_a_study_over_the_limit_gets_a_batch_of_its_own_and_is_never_split(
    staging_root: Path, tmp_path: Path
) -> None:
    s0, s1, s2 = _studies(staging_root, [2, 7, 2])

    plan = build_plan(str(staging_root), str(tmp_path / "work"), StagingOptions(max_batch_instances=5))

    assert _batch_layout(plan) == [[s0], [s1], [s2]]
    big = next(plan.iter_batch(plan.batch_ids[1]))
    assert len(big.instances) == 7
    assert {instance.study_uid for instance in big.instances} == {s1}


def test_batches_are_bounded_by_bytes(staging_root: Path, tmp_path: Path) -> None:
    s0, s1, s2 = _studies(staging_root, [2, 2, 2], pixel_bytes=1000)
    study_bytes = sum(path.stat().st_size for path in (staging_root / "s00").rglob("*.dcm"))

    plan = build_plan(
        str(staging_root), str(tmp_path / "work"), StagingOptions(max_batch_bytes=2 * study_bytes + 1)
    )

    assert _batch_layout(plan) == [[s0, s1], [s2]]
    assert [b.bytes for b in plan.batches] == [2 * study_bytes, study_bytes]


def test_plan_round_trips_through_its_files(staging_root: Path, tmp_path: Path) -> None:
    paths = write_study(staging_root, "study/series", uid(31), 3, patient_age="045Y", patient_sex="F")
    work = tmp_path / "work"

    built = build_plan(str(staging_root), str(work), StagingOptions())
    loaded = Plan.load(str(work))

    assert loaded.batches == built.batches
    assert loaded.source_uri == f"file://{staging_root}"
    [study] = list(loaded.iter_batch("batch-00001"))
    assert study == PlannedStudy.from_dict(json.loads((work / "batches/batch-00001.jsonl").read_text()))
    assert study.study_uid == uid(31)
    assert study.metadata == {"patient_age": 45, "patient_sex": "F", "accession_number": "ACC-1"}
    assert [(i.relative_path, i.size, i.sop_uid) for i in study.instances] == [
        (str(path.relative_to(staging_root)), path.stat().st_size, f"{uid(31)}.1.{n}")
        for n, path in enumerate(paths)
    ]
    assert {i.series_uid for i in study.instances} == {f"{uid(31)}.1"}
    with loaded.source().open(study.instances[0].relative_path) as stream:
        assert stream.read() == paths[0].read_bytes()
    assert json.loads(json.dumps([batch.to_dict() for batch in loaded.batches])) == [
        {"batch_id": "batch-00001", "studies": 1, "instances": 3, "bytes": study.bytes}
    ]


def test_plan_manifest_holds_no_paths_and_no_patient_data(staging_root: Path, tmp_path: Path) -> None:
    write_study(staging_root, "PATIENT-FOLDER", uid(32), 2, patient_age="077Y", accession_number="ACC-SECRET")
    (staging_root / "bad.txt").write_text("x")

    build_plan(str(staging_root), str(tmp_path / "work"), StagingOptions())

    text = (tmp_path / "work/plan.json").read_text()
    forbidden_texts = (
        "PATIENT-FOLDER",
        "IM0",
        ".dcm",
        "bad.txt",
        "patient_age",
        "ACC-SECRET",
        PATIENT_NAME,
        PATIENT_ID,
    )
    for forbidden in forbidden_texts:
        assert forbidden not in text, forbidden
    manifest = json.loads(text)
    assert manifest["files"]["per_reason"] == {"not_dicom": 1, "valid": 2}
    assert manifest["studies"] == {"planned": {"studies": 1, "instances": 2}}


def test_conflict_and_missing_metadata_hold_studies_back(staging_root: Path, tmp_path: Path) -> None:
    write_instance(staging_root / "a/1.dcm", study_uid=uid(33), sop_uid=uid(33, 1))
    write_instance(staging_root / "a/2.dcm", study_uid=uid(33), sop_uid=uid(33, 2))
    write_instance(staging_root / "a/2-rewritten.dcm", study_uid=uid(33), sop_uid=uid(33, 2), pixel_bytes=32)
    write_instance(staging_root / "b/1.dcm", study_uid=uid(34), sop_uid=uid(34, 1), patient_age=None)
    write_instance(staging_root / "c/1.dcm", study_uid=uid(35), sop_uid=uid(35, 1))

    plan = build_plan(str(staging_root), str(tmp_path / "work"), StagingOptions())

    assert _batch_layout(plan) == [[uid(35)]]
    invalid = {record.relative_path: record for record in plan.iter_invalid()}
    assert {path: record.reason.value for path, record in invalid.items()} == {
        "a/1.dcm": "conflict",
        "a/2-rewritten.dcm": "conflict",
        "a/2.dcm": "conflict",
        "b/1.dcm": "metadata_missing",
    }
    assert invalid["a/1.dcm"].message.startswith("a/1.dcm: study held back: ")
    assert invalid["b/1.dcm"].message == "b/1.dcm: study held back: missing required metadata: patient_age"
    assert plan.manifest["studies"] == {
        "planned": {"studies": 1, "instances": 1},
        "held_back": {
            "conflict": {"studies": 1, "instances": 1},
            "metadata_missing": {"studies": 1, "instances": 1},
        },
    }


def test_studies_already_done_are_skipped(staging_root: Path, tmp_path: Path) -> None:
    done, pending = _studies(staging_root, [2, 3])

    plan = build_plan(
        str(staging_root), str(tmp_path / "work"), StagingOptions(), skip_study={done}.__contains__
    )

    assert _batch_layout(plan) == [[pending]]
    assert plan.manifest["studies"]["skipped_done"] == {"studies": 1, "instances": 2}
    assert list(plan.iter_invalid()) == []


def test_everything_done_plans_no_batch(staging_root: Path, tmp_path: Path) -> None:
    _studies(staging_root, [2])

    plan = build_plan(str(staging_root), str(tmp_path / "work"), StagingOptions(), skip_study=lambda _: True)

    assert plan.batches == ()
    assert not list((tmp_path / "work/batches").iterdir())


def test_a_new_plan_replaces_the_previous_one_entirely(staging_root: Path, tmp_path: Path) -> None:
    _studies(staging_root, [1, 1, 1])
    work = tmp_path / "work"
    build_plan(str(staging_root), str(work), StagingOptions(max_batch_instances=1))

    build_plan(str(staging_root), str(work), StagingOptions(max_batch_instances=3))

    assert sorted(path.name for path in (work / "batches").iterdir()) == ["batch-00001.jsonl"]
    assert [path.name for path in work.iterdir() if path.name.startswith(".scan")] == []


def test_the_same_staging_area_gives_the_same_plan(staging_root: Path, tmp_path: Path) -> None:
    _studies(staging_root, [2, 1, 3])
    options = StagingOptions(max_batch_instances=3)

    first = build_plan(str(staging_root), str(tmp_path / "one"), options)
    second = build_plan(str(staging_root), str(tmp_path / "two"), options)

    assert first.batches == second.batches
    for batch_id in first.batch_ids:
        assert (tmp_path / "one/batches" / f"{batch_id}.jsonl").read_bytes() == (
            tmp_path / "two/batches" / f"{batch_id}.jsonl"
        ).read_bytes()


def test_loading_a_missing_plan_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(StagingError, match="no plan at"):
        Plan.load(str(tmp_path))


def test_unknown_batch_is_a_key_error(staging_root: Path, tmp_path: Path) -> None:
    _studies(staging_root, [1])
    plan = build_plan(str(staging_root), str(tmp_path / "work"), StagingOptions())

    with pytest.raises(KeyError, match="batch-00009"):
        list(plan.iter_batch("batch-00009"))


def test_a_dicomdir_media_set_plans_its_instances_and_records_the_directory(
    staging_root: Path, tmp_path: Path
) -> None:
    media_set = Path(get_testdata_file("DICOMDIR", download=False)).parent / "TINY_ALPHA"
    shutil.copytree(media_set, staging_root / "cd")

    plan = build_plan(
        str(staging_root), str(tmp_path / "work"), StagingOptions(metadata={"required_fields": []})
    )

    assert {(r.relative_path, r.reason.value) for r in plan.iter_invalid()} == {
        ("cd/DICOMDIR", "dicomdir"),
        ("cd/README", "not_dicom"),  # the media set's own text file
    }
    [study] = [study for batch_id in plan.batch_ids for study in plan.iter_batch(batch_id)]
    assert len(study.instances) == 50
    assert study.instances[0].relative_path == "cd/PT000000/ST000000/SE000000/IM000000"
