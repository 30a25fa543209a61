"""Order metadata fields: their names, the keys accepted for them, and value normalisation.

A field has a ``snake_case`` name (``patient_age``). Sidecars and manifests may spell it in any
case and with or without separators: ``PatientAge``, ``patientAge``, ``patient_age`` and
``patient-age`` all name the same field, because keys are compared in their canonical form
(lower case, letters and digits only).

Values are normalised to what the vendor expects:

- ``patient_age``: whole years as an ``int``. DICOM Age Strings are accepted (``"045Y"`` → 45;
  ``"018M"``, ``"010W"``, ``"120D"`` are converted to whole years, so anything under a year is 0),
  as are plain numbers (``45``, ``"45"``). Ages of 90 and above become 90 (``"090Y"``, ``"95"``,
  ``"90+"``), as the vendor asks and as HIPAA's safe harbour requires.
- ``patient_sex``: ``"M"`` or ``"F"`` (``male``/``female`` in any case are accepted). DICOM's
  ``"O"`` (other) is not a value the vendor accepts and counts as invalid.
- every other field: the text with surrounding blanks removed.

Empty values (``None``, ``""``) mean "not given". An invalid value raises
:class:`InvalidFieldValueError`, whose text describes the expected form but never the value.
"""

from __future__ import annotations

import re
from collections.abc import Callable

PATIENT_AGE = "patient_age"
PATIENT_SEX = "patient_sex"
ACCESSION_NUMBER = "accession_number"

DEFAULT_TAG_MAPPING: dict[str, str] = {
    PATIENT_AGE: "PatientAge",
    PATIENT_SEX: "PatientSex",
    ACCESSION_NUMBER: "AccessionNumber",
}
"""Which DICOM keyword each field is read from when the site does not say otherwise."""

DEFAULT_REQUIRED_FIELDS: tuple[str, ...] = (PATIENT_AGE, PATIENT_SEX)
"""The fields the vendor requires before it completes an order."""

FieldValue = int | str
"""A normalised field value."""

AGE_CAP_YEARS = 90
"""Ages from this value up are reported as this value."""

MAX_PLAUSIBLE_AGE_YEARS = 150
"""Ages above this are rejected as invalid rather than capped."""

_DAYS_PER_UNIT = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}
_AGE_STRING = re.compile(r"^(\d{1,3})\s*([DWMY])$")
_AGE_NUMBER = re.compile(r"^(\d{1,3})(\s*\+)?$")
_SEX_WORDS = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F"}
_FIELD_NAME = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


class InvalidFieldValueError(ValueError):
    """A value cannot be normalised for its field; the text never contains the value."""


def canonical_key(key: str) -> str:
    """Return the form in which keys naming the same field compare equal.

    :param key: a key from a sidecar, a manifest column, or a field name.
    """
    return re.sub(r"[^a-z0-9]", "", key.lower())


def is_field_name(name: str) -> bool:
    """Tell whether ``name`` is a valid ``snake_case`` field name.

    :param name: the candidate field name.
    """
    return bool(_FIELD_NAME.match(name))


def normalise_age(value: object) -> int:
    """Return an age in whole years, capped at 90.

    :param value: a DICOM Age String, a number, or a number followed by ``+``.
    """
    if isinstance(value, bool):
        raise InvalidFieldValueError("expected an age such as 045Y, 45 or 90+, not a boolean")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        years = value
    elif isinstance(value, str):
        text = value.strip().upper()
        if match := _AGE_STRING.match(text):
            years = int(int(match.group(1)) * _DAYS_PER_UNIT[match.group(2)] // _DAYS_PER_UNIT["Y"])
        elif match := _AGE_NUMBER.match(text):
            years = int(match.group(1))
        else:
            raise InvalidFieldValueError("expected an age such as 045Y, 45 or 90+")
    else:
        raise InvalidFieldValueError("expected an age such as 045Y, 45 or 90+")
    if not 0 <= years <= MAX_PLAUSIBLE_AGE_YEARS:
        raise InvalidFieldValueError(f"expected an age between 0 and {MAX_PLAUSIBLE_AGE_YEARS} years")
    return min(years, AGE_CAP_YEARS)


def normalise_sex(value: object) -> str:
    """Return ``"M"`` or ``"F"``.

    :param value: ``M``, ``F``, ``male`` or ``female`` in any case.
    """
    sex = _SEX_WORDS.get(value.strip().upper()) if isinstance(value, str) else None
    if sex is None:
        raise InvalidFieldValueError("expected M or F")
    return sex


def normalise_text(value: object) -> str:
    """Return a text value without surrounding blanks.

    :param value: a string or a number.
    """
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidFieldValueError("expected a text or a number")
    return str(value).strip()


_NORMALISERS: dict[str, Callable[[object], FieldValue]] = {
    PATIENT_AGE: normalise_age,
    PATIENT_SEX: normalise_sex,
}


def normalise(field: str, value: object) -> FieldValue | None:
    """Return the normalised value of ``field``, or ``None`` when the value is empty.

    :param field: the field name.
    :param value: the raw value from a tag, a sidecar or a manifest.
    :raises InvalidFieldValueError: the value is present but not valid for the field.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    normalised = _NORMALISERS.get(field, normalise_text)(value)
    return normalised if normalised != "" else None
