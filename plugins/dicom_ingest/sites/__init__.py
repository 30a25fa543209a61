"""Per-site configuration: the models behind ``sites.yaml``, its loader and its description.

Importing this package is cheap (pydantic and PyYAML, no Airflow), so DAG files use it at
parse time.
"""

from __future__ import annotations

from dicom_ingest.sites.config import SiteConfig, SitesFile
from dicom_ingest.sites.describe import describe_site
from dicom_ingest.sites.loader import (
    SiteError,
    SiteIssue,
    SitesFileError,
    SitesLoadResult,
    load_sites,
    sites_file_path,
)
from dicom_ingest.sites.locations import LedgerTarget, expand_env, resolve_ledger, resolve_location

__all__ = [
    "LedgerTarget",
    "SiteConfig",
    "SiteError",
    "SiteIssue",
    "SitesFile",
    "SitesFileError",
    "SitesLoadResult",
    "describe_site",
    "expand_env",
    "load_sites",
    "resolve_ledger",
    "resolve_location",
    "sites_file_path",
]
