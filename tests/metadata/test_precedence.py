"""Where a study's metadata comes from, end to end through planning: precedence and placement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicom_ingest.metadata.errors import MetadataSourceError
from dicom_ingest.metadata.options import MetadataOptions
from dicom_ingest.staging.options import StagingOptions
from dicom_ingest.staging.plan import Plan, build_plan
from tests.staging.factory import uid, write_instance, write_study


def _metadata_by_study(plan: Plan) -> dict[str, dict[str, object]]:
    return {study.study_uid: study.metadata for batch in plan.batch_ids for study in plan.iter_batch(batch)}


def _held_back(plan: Plan) -> dict[str, str]:
    return {record.relative_path: record.message for record in plan.iter_invalid()}


def _plan(staging_root: Path, tmp_path: Path, **metadata: object) -> Plan:
    options = StagingOptions(metadata=MetadataOptions(**metadata))
    return build_plan(str(staging_root), str(tmp_path / "work"), options)


def test_manifest_beats_sidecar_beats_tags_field_by_field(staging_root: Path, tmp_path: Path) -> None:
    write_study(
        staging_root, "study", uid(40), 2, patient_age="030Y", patient_sex="F", accession_number="ACC-40"
    )
    (staging_root / "study/metadata.json").write_text(json.dumps({"patientAge": 31, "patientSex": "M"}))
    (staging_root / "orders.csv").write_text(f"StudyInstanceUID,PatientAge\n{uid(40)},32\n")

    plan = _plan(staging_root, tmp_path, manifest="orders.csv")

    assert _metadata_by_study(plan) == {
        uid(40): {"patient_age": 32, "patient_sex": "M", "accession_number": "ACC-40"}
    }
    assert plan.manifest["files"]["ignored"] == 1  # the manifest in the staging root is not an instance
    assert plan.manifest["files"]["sidecars"] == 1


def test_manifest_keyed_by_accession_number_from_tags_or_sidecar(staging_root: Path, tmp_path: Path) -> None:
    write_study(staging_root, "a", uid(41), 1, patient_age=None, accession_number="ACC-41")
    write_study(staging_root, "b", uid(42), 1, patient_age=None, accession_number=None)
    (staging_root / "b/metadata.json").write_text('{"AccessionNumber": "ACC-42"}')
    manifest = tmp_path / "orders.csv"
    manifest.write_text("AccessionNumber,patient_age\nACC-41,41\nACC-42,42\n")

    plan = _plan(staging_root, tmp_path, manifest=str(manifest))

    metadata = _metadata_by_study(plan)
    assert metadata[uid(41)]["patient_age"] == 41
    assert metadata[uid(42)]["patient_age"] == 42


def test_a_sidecar_above_the_series_folder_applies_to_the_study_below(
    staging_root: Path, tmp_path: Path
) -> None:
    write_study(staging_root, "study/series-1", uid(43), 2, patient_age=None)
    (staging_root / "study/metadata.json").write_text('{"patient_age": "050Y"}')

    plan = _plan(staging_root, tmp_path)

    assert _metadata_by_study(plan)[uid(43)]["patient_age"] == 50


def test_a_sidecar_shared_by_several_studies_is_not_used(staging_root: Path, tmp_path: Path) -> None:
    write_study(staging_root, "day/s1", uid(44), 1, patient_age=None)
    write_study(staging_root, "day/s2", uid(45), 1, patient_age=None)
    (staging_root / "day/metadata.json").write_text('{"patient_age": 60}')

    plan = _plan(staging_root, tmp_path)

    assert plan.batches == ()
    assert _held_back(plan)["day/s1/IM00000.dcm"] == (
        "day/s1/IM00000.dcm: study held back: missing required metadata: patient_age; "
        "day/metadata.json was not used: its folder holds several studies and it names none"
    )


def test_a_sidecar_naming_its_study_applies_only_to_that_study(staging_root: Path, tmp_path: Path) -> None:
    write_study(staging_root, "day/s1", uid(46), 1, patient_age=None)
    write_study(staging_root, "day/s2", uid(47), 1, patient_age=None)
    (staging_root / "day/metadata.json").write_text(
        json.dumps({"StudyInstanceUID": uid(47), "PatientAge": 70})
    )

    plan = _plan(staging_root, tmp_path)

    assert _metadata_by_study(plan) == {
        uid(47): {"patient_age": 70, "patient_sex": "F", "accession_number": "ACC-1"}
    }
    assert "missing required metadata: patient_age" in _held_back(plan)["day/s1/IM00000.dcm"]


def test_a_misplaced_sidecar_is_an_error(staging_root: Path, tmp_path: Path) -> None:
    write_study(staging_root, "s", uid(48), 1)
    (staging_root / "s/metadata.json").write_text(json.dumps({"StudyInstanceUID": uid(99), "PatientAge": 70}))

    with pytest.raises(MetadataSourceError, match=r"s/metadata.json, line 1: it names StudyInstanceUID"):
        _plan(staging_root, tmp_path)


def test_a_malformed_sidecar_names_file_and_line(staging_root: Path, tmp_path: Path) -> None:
    write_study(staging_root, "s", uid(49), 1)
    (staging_root / "s/info.json").write_text('{\n  "PatientAge": "045Y",\n  "PatientSex": "unknown"\n}\n')

    with pytest.raises(MetadataSourceError) as raised:
        _plan(staging_root, tmp_path, sidecar_name="info.json")

    assert str(raised.value) == "s/info.json, line 3: PatientSex: expected M or F"


def test_a_repeated_manifest_key_names_both_lines(staging_root: Path, tmp_path: Path) -> None:
    write_study(staging_root, "s", uid(50), 1)
    (staging_root / "orders.csv").write_text(f"study_uid,patient_age\n{uid(50)},1\n1.2.3,2\n{uid(50)},3\n")

    with pytest.raises(MetadataSourceError, match=r"orders.csv, line 4: the same key as line 2"):
        _plan(staging_root, tmp_path, manifest="orders.csv")


def test_a_missing_manifest_is_an_error(staging_root: Path, tmp_path: Path) -> None:
    write_study(staging_root, "s", uid(51), 1)

    with pytest.raises(MetadataSourceError, match=r"orders\.csv, line 1: the manifest does not exist"):
        _plan(staging_root, tmp_path, manifest="orders.csv")


def test_site_specific_required_fields_hold_back_with_field_names_only(
    staging_root: Path, tmp_path: Path
) -> None:
    write_instance(staging_root / "s/1.dcm", study_uid=uid(52), sop_uid=uid(52, 1), patient_sex="O")

    plan = _plan(
        staging_root, tmp_path, required_fields=["patient_sex", "accession_number", "referring_site"]
    )

    assert _held_back(plan) == {
        "s/1.dcm": "s/1.dcm: study held back: missing required metadata: patient_sex, referring_site"
    }


def test_without_required_fields_studies_go_out_with_whatever_they_have(
    staging_root: Path, tmp_path: Path
) -> None:
    write_instance(
        staging_root / "s/1.dcm", study_uid=uid(53), sop_uid=uid(53, 1), patient_age=None, patient_sex=None
    )

    plan = _plan(staging_root, tmp_path, required_fields=[])

    assert _metadata_by_study(plan) == {uid(53): {"accession_number": "ACC-1"}}
