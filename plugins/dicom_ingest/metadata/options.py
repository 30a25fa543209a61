"""Per-site settings for where a study's order metadata comes from."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydicom.datadict import tag_for_keyword

from dicom_ingest.metadata.fields import DEFAULT_REQUIRED_FIELDS, DEFAULT_TAG_MAPPING, is_field_name


class ManifestKey(StrEnum):
    """The column a CSV manifest's rows are matched on."""

    STUDY_UID = "study_uid"
    ACCESSION_NUMBER = "accession_number"


class MetadataOptions(BaseModel):
    """Where a site's order metadata comes from, and which fields must be present.

    Sources, from the least to the most explicit (a later one wins, field by field): the DICOM
    tags named in ``tag_mapping``, the sidecar JSON named ``sidecar_name`` in the study's folder,
    and the CSV ``manifest``.

    :param required_fields: fields every study needs before it is uploaded; a study missing one
        is held back with reason ``metadata_missing``.
    :param tag_mapping: field name → DICOM keyword the field is read from. Fields not listed are
        not read from tags.
    :param sidecar_name: file name of the per-study sidecar JSON; ``None`` turns sidecars off.
        Files with this name are metadata, not instances, and are never classified.
    :param manifest: a CSV manifest: a URI, an absolute path, or a path relative to the staging
        root (it is then excluded from the scan); ``None`` for no manifest.
    :param manifest_key: the column rows are matched on; ``None`` picks ``StudyInstanceUID`` when
        the manifest has that column, else ``AccessionNumber``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    required_fields: tuple[str, ...] = DEFAULT_REQUIRED_FIELDS
    tag_mapping: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_TAG_MAPPING))
    sidecar_name: str | None = "metadata.json"
    manifest: str | None = None
    manifest_key: ManifestKey | None = None

    @field_validator("required_fields")
    @classmethod
    def _check_required_fields(cls, fields: tuple[str, ...]) -> tuple[str, ...]:
        bad = [name for name in fields if not is_field_name(name)]
        if bad:
            raise ValueError(f"field names must be snake_case identifiers: {', '.join(map(repr, bad))}")
        return tuple(dict.fromkeys(fields))

    @field_validator("tag_mapping")
    @classmethod
    def _check_tag_mapping(cls, mapping: dict[str, str]) -> dict[str, str]:
        bad_fields = [name for name in mapping if not is_field_name(name)]
        if bad_fields:
            raise ValueError(
                f"field names must be snake_case identifiers: {', '.join(map(repr, bad_fields))}"
            )
        unknown = [keyword for keyword in mapping.values() if tag_for_keyword(keyword) is None]
        if unknown:
            raise ValueError(f"not DICOM keywords: {', '.join(map(repr, unknown))}")
        return mapping

    @field_validator("sidecar_name")
    @classmethod
    def _check_sidecar_name(cls, name: str | None) -> str | None:
        if name is not None and (not name.strip() or "/" in name or "\\" in name or name in {".", ".."}):
            raise ValueError("sidecar_name must be a plain file name, without folders")
        return name

    @model_validator(mode="after")
    def _check_required_fields_have_a_source(self) -> MetadataOptions:
        if self.sidecar_name is None and self.manifest is None:
            unreachable = [name for name in self.required_fields if name not in self.tag_mapping]
            if unreachable:
                raise ValueError(
                    f"required fields {', '.join(map(repr, unreachable))} have no source: map them to a "
                    "DICOM tag in tag_mapping, or configure a sidecar or a manifest"
                )
        return self

    @property
    def known_fields(self) -> tuple[str, ...]:
        """Every field a source may set: the built-in, the mapped and the required ones."""
        return tuple(dict.fromkeys((*DEFAULT_TAG_MAPPING, *self.tag_mapping, *self.required_fields)))
