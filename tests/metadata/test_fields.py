"""Normalisation of order metadata values and keys."""

from __future__ import annotations

import pytest

from dicom_ingest.metadata.fields import (
    InvalidFieldValueError,
    canonical_key,
    normalise,
    normalise_age,
    normalise_sex,
)


@pytest.mark.parametrize(
    ("raw", "years"),
    [
        ("045Y", 45),
        ("045y", 45),
        (" 045Y ", 45),
        ("006M", 0),
        ("018M", 1),
        ("003W", 0),
        ("010D", 0),
        ("400D", 1),
        ("000Y", 0),
        ("089Y", 89),
        ("090Y", 90),
        ("097Y", 90),
        ("90+", 90),
        ("95 +", 90),
        ("45", 45),
        (45, 45),
        (45.0, 45),
        (120, 90),
    ],
)
def test_ages_become_whole_years_capped_at_90(raw: object, years: int) -> None:
    assert normalise_age(raw) == years


@pytest.mark.parametrize("raw", ["45 years", "X45Y", "-1", 151, "200Y", 4.5, True, None, ["045Y"], "1000Y"])
def test_invalid_ages_are_refused_without_quoting_them(raw: object) -> None:
    with pytest.raises(InvalidFieldValueError) as raised:
        normalise_age(raw)

    assert repr(raw) not in str(raised.value)


@pytest.mark.parametrize(("raw", "sex"), [("M", "M"), ("f", "F"), (" Female ", "F"), ("male", "M")])
def test_sex_is_m_or_f(raw: str, sex: str) -> None:
    assert normalise_sex(raw) == sex


@pytest.mark.parametrize("raw", ["O", "X", "", 1, None])
def test_other_sex_values_are_invalid(raw: object) -> None:
    with pytest.raises(InvalidFieldValueError, match="expected M or F"):
        normalise_sex(raw)


def test_empty_values_mean_not_given_and_other_fields_are_trimmed_text() -> None:
    assert normalise("patient_age", None) is None
    assert normalise("patient_sex", "  ") is None
    assert normalise("accession_number", " ACC 7 ") == "ACC 7"
    assert normalise("accession_number", 1234) == "1234"
    with pytest.raises(InvalidFieldValueError):
        normalise("accession_number", {"nested": 1})


@pytest.mark.parametrize("key", ["PatientAge", "patientAge", "patient_age", "patient-age", "PATIENT AGE"])
def test_key_spellings_share_one_canonical_form(key: str) -> None:
    assert canonical_key(key) == canonical_key("patient_age") == "patientage"
