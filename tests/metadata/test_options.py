"""Validation of the per-site metadata and staging settings."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dicom_ingest.metadata.options import MetadataOptions
from dicom_ingest.staging.options import StagingOptions


def test_defaults_match_the_vendor_requirements() -> None:
    options = MetadataOptions()

    assert options.required_fields == ("patient_age", "patient_sex")
    assert options.tag_mapping == {
        "patient_age": "PatientAge",
        "patient_sex": "PatientSex",
        "accession_number": "AccessionNumber",
    }
    assert options.sidecar_name == "metadata.json"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tag_mapping": {"patient_age": "PatientAgeInYears"}}, "not DICOM keywords: 'PatientAgeInYears'"),
        ({"tag_mapping": {"Patient Age": "PatientAge"}}, "snake_case"),
        ({"required_fields": ["patientAge"]}, "snake_case"),
        ({"sidecar_name": "meta/data.json"}, "plain file name"),
        (
            {"sidecar_name": None, "required_fields": ["patient_age", "referring_site"]},
            "required fields 'referring_site' have no source",
        ),
        ({"unknown_knob": 1}, "Extra inputs are not permitted"),
    ],
)
def test_metadata_settings_errors_say_what_is_wrong(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        MetadataOptions(**settings)


def test_a_required_field_from_a_manifest_needs_no_tag() -> None:
    options = MetadataOptions(sidecar_name=None, manifest="orders.csv", required_fields=["referring_site"])

    assert "referring_site" in options.known_fields


def test_staging_sizes_accept_units_and_nested_settings() -> None:
    options = StagingOptions.model_validate(
        {
            "max_file_size": "512MiB",
            "max_batch_bytes": "4GB",
            "invalid_threshold": {"max_fraction": 0.05},
            "metadata": {"required_fields": ["patient_sex"]},
        }
    )

    assert options.max_file_size == 512 * 1024**2
    assert options.max_batch_bytes == 4 * 1000**3
    assert options.invalid_threshold.max_fraction == 0.05
    assert options.metadata.required_fields == ("patient_sex",)


@pytest.mark.parametrize(
    "settings",
    [
        {"invalid_threshold": {"max_fraction": 1.5}},
        {"invalid_threshold": {"max_count": -1}},
        {"max_batch_instances": 0},
        {"max_file_size": "a lot"},
    ],
)
def test_staging_settings_out_of_range_are_refused(settings: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        StagingOptions.model_validate(settings)
