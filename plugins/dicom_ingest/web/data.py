"""What the plugin's pages show, read from ``sites.yaml`` and each site's ledger.

Only UIDs, states, reason codes, order ids, counts and sizes leave this module: never a file
path, a location, a tag value or a credential. The sites file is read on every request, so
edits show without restarting the API server; a site's ledger is opened for one request and
closed again, and a SQLite ledger that does not exist yet is not created.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_ingest.exceptions import DicomIngestConfigError
from dicom_ingest.ledger import LedgerError
from dicom_ingest.sites import SiteConfig, load_sites, resolve_ledger, sites_file_path
from dicom_ingest.sites.config import DAG_ID_PREFIX
from dicom_ingest.sites.runtime import SiteRuntime

if TYPE_CHECKING:
    from collections.abc import Iterator

    from dicom_ingest.ledger import BatchStudy, Ledger


class SiteNotFoundError(LookupError):
    """No valid site of the sites file has the requested id (or DAG id)."""


class LedgerUnavailableError(RuntimeError):
    """The site's ledger cannot be opened; the message names neither paths nor credentials."""


@dataclass(frozen=True)
class SiteListing:
    """The sites a user may see, and how many entries of the sites file are invalid.

    :param sites: ``(site id, DAG id, enabled)`` per valid site, in file order.
    :param invalid_entries: entries rejected by validation (their DAG import errors say why).
    """

    sites: tuple[tuple[str, str, bool], ...]
    invalid_entries: int


def list_sites() -> SiteListing:
    """Read the sites file and list its valid sites."""
    loaded = load_sites(sites_file_path())
    return SiteListing(
        sites=tuple((site.id, site.dag_id, site.enabled) for site in loaded.sites),
        invalid_entries=len(loaded.errors),
    )


def find_site(site_id: str) -> SiteConfig:
    """Return the valid site with this id.

    :param site_id: the site's id.
    :raises SiteNotFoundError: when the sites file has no valid site with this id.
    """
    for site in load_sites(sites_file_path()).sites:
        if site.id == site_id:
            return site
    raise SiteNotFoundError(f"no site {site_id!r} in the sites file")


def site_id_of_dag(dag_id: str) -> str:
    """Return the site id of a site DAG id (``dicom_ingest__<site_id>``).

    :param dag_id: the DAG id.
    :raises SiteNotFoundError: when the DAG id is not a site DAG's.
    """
    if not dag_id.startswith(DAG_ID_PREFIX) or dag_id == DAG_ID_PREFIX:
        raise SiteNotFoundError(f"{dag_id!r} is not a site DAG")
    return dag_id.removeprefix(DAG_ID_PREFIX)


@contextmanager
def site_ledger(site: SiteConfig) -> Iterator[Ledger | None]:
    """Open the site's ledger for the duration of a ``with`` block; ``None`` when it has none yet.

    :param site: the site.
    :raises LedgerUnavailableError: when the ledger's location or connection is unusable.
    """
    try:
        target = resolve_ledger(site)
    except DicomIngestConfigError as exc:
        raise LedgerUnavailableError(f"the ledger location of site {site.id!r} cannot be resolved") from exc
    if target.path is not None and not Path(target.path).is_file():
        yield None
        return
    runtime = SiteRuntime(site)
    try:
        yield runtime.ledger
    except (LedgerError, DicomIngestConfigError) as exc:
        raise LedgerUnavailableError(f"the ledger of site {site.id!r} cannot be read") from exc
    finally:
        runtime.close()


def study_row(study: BatchStudy) -> dict[str, Any]:
    """Return what the batch page shows of one study.

    :param study: the study as the ledger lists it.
    """
    return {
        "study_uid": study.study_uid,
        "state": study.state,
        "order_id": study.order_id,
        "vendor_status": study.order_status,
        "reason": study.reason,
        "abandoned_order_ids": list(study.abandoned_order_ids),
        "instances": study.instance_count,
        "bytes": study.byte_count,
        "resends": study.resend_count,
    }


def batch_view(site: SiteConfig, run_id: str, batch_id: str) -> dict[str, Any]:
    """Return one batch of one run: its studies with their orders, and counts.

    :param site: the site.
    :param run_id: the DAG run id.
    :param batch_id: the batch id.
    :raises LedgerUnavailableError: when the ledger cannot be read.
    """
    with site_ledger(site) as ledger:
        studies = [] if ledger is None else ledger.studies_in_batch(site.id, run_id, batch_id)
    rows = [study_row(study) for study in studies]
    return {
        "site_id": site.id,
        "dag_id": site.dag_id,
        "run_id": run_id,
        "batch_id": batch_id,
        "counts": {
            "studies": len(rows),
            "instances": sum(row["instances"] for row in rows),
            "bytes": sum(row["bytes"] for row in rows),
            "orders": sum(row["order_id"] is not None for row in rows),
            "abandoned_orders": sum(len(row["abandoned_order_ids"]) for row in rows),
            "studies_by_state": dict(sorted(Counter(row["state"] for row in rows).items())),
        },
        "studies": rows,
    }


def site_view(site: SiteConfig) -> dict[str, Any]:
    """Return a site's counts over every run (empty counts before its first run).

    :param site: the site.
    :raises LedgerUnavailableError: when the ledger cannot be read.
    """
    with site_ledger(site) as ledger:
        summary = None if ledger is None else ledger.site_summary(site.id).to_dict()
    return {
        "site_id": site.id,
        "dag_id": site.dag_id,
        "enabled": site.enabled,
        "schedule": site.schedule,
        "summary": summary,
    }
