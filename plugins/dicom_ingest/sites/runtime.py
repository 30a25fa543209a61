"""What a running task needs of its site: options for staging, the ledger, and its folders.

Operators receive a site's validated configuration as a plain dict (a templated field, so
Jinja such as ``{{ ds }}`` in its locations is rendered for each run) and rebuild it here.
Nothing in this module runs at DAG parse time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any

from dicom_ingest.sites.config import SiteConfig
from dicom_ingest.sites.locations import resolve_ledger, resolve_location

if TYPE_CHECKING:
    from dicom_ingest.ledger import Ledger
    from dicom_ingest.staging.options import StagingOptions

_UNSAFE_PATH_CHARACTERS = re.compile(r"[^A-Za-z0-9._-]+")


def run_folder_name(run_id: str) -> str:
    """Return a run id made safe as one folder or file name (``:`` and ``+`` become ``_``).

    :param run_id: the Airflow run id.
    """
    return _UNSAFE_PATH_CHARACTERS.sub("_", run_id).strip("._") or "run"


class SiteRuntime:
    """A site's configuration as a task uses it.

    :param config: the site's validated configuration.
    """

    def __init__(self, config: SiteConfig) -> None:
        self.config = config

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SiteRuntime:
        """Rebuild the runtime view from a configuration dict (as passed to an operator).

        :param data: ``SiteConfig.model_dump(mode="json")``, possibly with Jinja rendered.
        """
        return cls(SiteConfig.model_validate(dict(data)))

    @property
    def site_id(self) -> str:
        """Return the site's id."""
        return self.config.id

    def staging_uri(self, override: str | None = None) -> str:
        """Return the staging location of this run, with environment references expanded.

        :param override: a location that replaces the configured one (the DAG's staging param).
        """
        return resolve_location(override or self.config.staging)

    def work_uri(self, run_id: str) -> str:
        """Return the folder where this run's plan is written.

        :param run_id: the Airflow run id.
        """
        return f"{resolve_location(self.config.work_location).rstrip('/')}/{run_folder_name(run_id)}"

    def reports_uri(self) -> str:
        """Return the folder where run reports are written."""
        return resolve_location(self.config.reports_location).rstrip("/")

    def staging_options(self) -> StagingOptions:
        """Return the staging and metadata options of the site."""
        from dicom_ingest.metadata.options import ManifestKey, MetadataOptions
        from dicom_ingest.staging.options import InvalidThreshold, QuarantinePolicy, StagingOptions

        site = self.config
        sources = site.metadata
        metadata = MetadataOptions(
            required_fields=tuple(site.required_metadata),
            tag_mapping=dict(sources.tags),
            sidecar_name=sources.sidecar,
            manifest=resolve_location(sources.manifest) if sources.manifest else None,
            manifest_key=(
                ManifestKey.ACCESSION_NUMBER
                if sources.manifest_key == "AccessionNumber"
                else ManifestKey.STUDY_UID
            ),
        )
        quarantine_uri = site.quarantine.location
        return StagingOptions(
            max_file_size=site.max_file_size,
            quarantine_policy=QuarantinePolicy(site.quarantine.policy),
            quarantine_uri=resolve_location(quarantine_uri) if quarantine_uri else None,
            invalid_threshold=InvalidThreshold(
                max_fraction=site.invalid_threshold.max_fraction,
                max_count=site.invalid_threshold.max_count,
            ),
            max_batch_instances=site.batch.max_instances,
            max_batch_bytes=site.batch.max_bytes,
            metadata=metadata,
            scan_processes=site.scan_processes,
            scan_threads=site.scan_threads,
        )

    @cached_property
    def ledger(self) -> Ledger:
        """Open the site's ledger (SQLite file or PostgreSQL connection) on first use."""
        from dicom_ingest.ledger import Ledger

        target = resolve_ledger(self.config)
        if target.conn_id:
            return Ledger.from_airflow_connection(target.conn_id)
        return Ledger.for_location(target.path)

    def close(self) -> None:
        """Release the ledger's connections if it was opened."""
        if "ledger" in self.__dict__:
            self.__dict__.pop("ledger").close()
