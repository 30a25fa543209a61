"""Where a study's order metadata comes from, and whether it is complete.

The vendor fails an order 15 minutes after upload when its required metadata is missing, so
the metadata is resolved and checked before the first byte of a study is sent.

Sources, per site (:class:`~dicom_ingest.metadata.options.MetadataOptions`):

1. DICOM tags, through a field → keyword mapping (default: ``patient_age`` ← PatientAge,
   ``patient_sex`` ← PatientSex, ``accession_number`` ← AccessionNumber), read from the first
   valid instance of the study;
2. a sidecar JSON file in the study's folder (default name ``metadata.json``);
3. a CSV manifest keyed by StudyInstanceUID or AccessionNumber.

Precedence: manifest > sidecar > tags, field by field: the most explicit source wins. A study
missing a required field is held back with reason ``metadata_missing``, whose message names the
missing field names only. Malformed sidecars and manifests raise
:class:`~dicom_ingest.metadata.errors.MetadataSourceError` naming the file and line. Values are
never logged nor put into messages.
"""

from __future__ import annotations

from dicom_ingest.metadata.errors import MetadataSourceError
from dicom_ingest.metadata.fields import (
    ACCESSION_NUMBER,
    DEFAULT_REQUIRED_FIELDS,
    DEFAULT_TAG_MAPPING,
    PATIENT_AGE,
    PATIENT_SEX,
    FieldValue,
    InvalidFieldValueError,
    canonical_key,
    normalise,
)
from dicom_ingest.metadata.options import ManifestKey, MetadataOptions
from dicom_ingest.metadata.resolve import ResolvedMetadata, resolve_metadata
from dicom_ingest.metadata.sources import (
    ManifestReader,
    ManifestRow,
    SidecarContent,
    parse_sidecar,
    read_tag_fields,
)

__all__ = [
    "ACCESSION_NUMBER",
    "DEFAULT_REQUIRED_FIELDS",
    "DEFAULT_TAG_MAPPING",
    "PATIENT_AGE",
    "PATIENT_SEX",
    "FieldValue",
    "InvalidFieldValueError",
    "ManifestKey",
    "ManifestReader",
    "ManifestRow",
    "MetadataOptions",
    "MetadataSourceError",
    "ResolvedMetadata",
    "SidecarContent",
    "canonical_key",
    "normalise",
    "parse_sidecar",
    "read_tag_fields",
    "resolve_metadata",
]
