"""Combine a study's metadata sources and check the site's required fields."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from dicom_ingest.metadata.fields import FieldValue


@dataclass(frozen=True)
class ResolvedMetadata:
    """A study's order metadata after precedence, and the required fields it still lacks.

    :param fields: normalised values, field by field from the most explicit source that has one.
    :param missing: required field names without a value, in the site's order.
    """

    fields: dict[str, FieldValue] = field(repr=False)
    missing: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        """Whether every required field has a value."""
        return not self.missing


def resolve_metadata(
    required_fields: Iterable[str],
    *,
    tags: Mapping[str, FieldValue] | None = None,
    sidecar: Mapping[str, FieldValue] | None = None,
    manifest: Mapping[str, FieldValue] | None = None,
) -> ResolvedMetadata:
    """Merge the sources field by field, manifest over sidecar over tags, and check completeness.

    The most explicit source wins: a manifest row is written for the upload on purpose, a
    sidecar for its study, while tags are whatever the modality wrote. A source without a value
    for a field never hides a value from a lower one.

    :param required_fields: the site's required field names.
    :param tags: fields read from the study's DICOM tags.
    :param sidecar: fields from the study's sidecar JSON.
    :param manifest: fields from the study's manifest row.
    """
    merged: dict[str, FieldValue] = {}
    for source in (tags, sidecar, manifest):
        merged.update(source or {})
    missing = tuple(name for name in required_fields if name not in merged)
    return ResolvedMetadata(fields=merged, missing=missing)
