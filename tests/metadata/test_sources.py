"""Sidecar and manifest parsing: spellings, keys, and errors that name the file and line."""

from __future__ import annotations

import io

import pytest

from dicom_ingest.metadata.errors import MetadataSourceError
from dicom_ingest.metadata.options import ManifestKey, MetadataOptions
from dicom_ingest.metadata.sources import ManifestReader, parse_sidecar

FIELDS = MetadataOptions().known_fields


def test_sidecar_keys_in_any_spelling_are_normalised() -> None:
    content = parse_sidecar(
        '{"PatientAge": "045Y", "patientSex": "f", "accession_number": 77, "Comment": "ignored"}',
        "s.json",
        FIELDS,
    )

    assert content.fields == {"patient_age": 45, "patient_sex": "F", "accession_number": "77"}
    assert content.study_uid is None


def test_sidecar_may_name_its_study() -> None:
    content = parse_sidecar('{"StudyInstanceUID": " 1.2.3 ", "patient_age": null}', "s.json", FIELDS)

    assert content.study_uid == "1.2.3"
    assert content.fields == {}


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ('{\n  "PatientAge": "045Y",\n  "PatientSex": "M"\n  "x": 1\n}', 4, "not valid JSON"),
        ('{\n  "PatientAge": "045Y",\n  "PatientSex": "Q"\n}', 3, "PatientSex: expected M or F"),
        ('{\n  "patientAge": "old"\n}', 2, "patientAge: expected an age"),
        ('{\n "PatientAge": 45,\n "patient_age": 46\n}', 3, "patient_age given twice"),
        ('["045Y", "M"]', 1, "expected a JSON object"),
        ('{"StudyInstanceUID": 12}', 1, "expected a UID string"),
    ],
)
def test_malformed_sidecars_name_file_and_line_but_no_value(text: str, line: int, problem: str) -> None:
    with pytest.raises(MetadataSourceError) as raised:
        parse_sidecar(text, "study/metadata.json", FIELDS)

    assert (raised.value.location, raised.value.line) == ("study/metadata.json", line)
    assert str(raised.value).startswith(f"study/metadata.json, line {line}: ")
    assert problem in str(raised.value)
    for value in ('"Q"', "old", "046"):
        assert value not in str(raised.value)


def _rows(text: str, key: ManifestKey | None = None) -> list[tuple[int, str, dict[str, object]]]:
    reader = ManifestReader(io.StringIO(text), "orders.csv", FIELDS, key)
    return [(row.line, row.key, row.fields) for row in reader]


def test_manifest_rows_keyed_by_study_uid() -> None:
    text = "\ufeffStudyInstanceUID,Patient Age,patient_sex,Notes\n1.2.3,045Y,M,x\n\n1.2.4,,f,y\n"

    assert _rows(text) == [
        (2, "1.2.3", {"patient_age": 45, "patient_sex": "M"}),
        (4, "1.2.4", {"patient_sex": "F"}),
    ]


def test_manifest_key_prefers_study_uid_unless_told_otherwise() -> None:
    text = "AccessionNumber,StudyInstanceUID,PatientAge\nACC-1,1.2.3,30\n"

    assert _rows(text) == [(2, "1.2.3", {"patient_age": 30, "accession_number": "ACC-1"})]
    assert _rows(text, ManifestKey.ACCESSION_NUMBER) == [(2, "ACC-1", {"patient_age": 30})]


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("PatientAge,PatientSex\n45,M\n", 1, "the header has no StudyInstanceUID or AccessionNumber column"),
        ("StudyInstanceUID,PatientAge\n1.2.3,45\n1.2.4,45,extra\n", 3, "expected 2 columns"),
        ("StudyInstanceUID,PatientAge\n1.2.3,45\n,45\n", 3, "StudyInstanceUID is empty"),
        ("StudyInstanceUID,PatientSex\n1.2.3,M\n1.2.4,unknown\n", 3, "column PatientSex: expected M or F"),
        ('StudyInstanceUID,PatientAge\n1.2.3,"45\n', 2, "not valid CSV"),
        ("\n\n", 1, "no header row"),
    ],
)
def test_malformed_manifests_name_file_and_line(text: str, line: int, problem: str) -> None:
    with pytest.raises(MetadataSourceError) as raised:
        _rows(text)

    assert (raised.value.location, raised.value.line) == ("orders.csv", line)
    assert problem in str(raised.value)
    assert "unknown" not in str(raised.value)
