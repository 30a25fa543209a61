"""Explain a site's settings in Markdown, for the ``doc_md`` of its DAG.

The text holds configuration only: the sites file carries no secret (credentials live in
Airflow connections, and locations with embedded credentials are rejected) and no PHI.
"""

from __future__ import annotations

from dicom_ingest.sites.config import SiteConfig
from dicom_ingest.sites.locations import LEDGER_CONN_ID_ENV

_SECONDS_PER_HOUR = 3600
_SECONDS_PER_MINUTE = 60

_QUARANTINE_EFFECT = {
    "record": "left in place; recorded in the ledger and the run report",
    "copy": "copied to {location} with a reason file; recorded in the ledger and the run report",
    "move": "moved to {location} with a reason file; recorded in the ledger and the run report",
}


def describe_site(site: SiteConfig) -> str:
    """Return Markdown that explains what the site's DAG does and with which settings.

    :param site: the site's validated configuration.
    """
    rows = [
        ("Schedule", _schedule(site)),
        ("Staging", _code(site.staging)),
        ("Vendor connection", _code(site.conn_id)),
        ("Required metadata", _required_metadata(site)),
        ("Metadata sources", _metadata_sources(site)),
        ("Invalid files", _quarantine(site)),
        ("Invalid-file threshold", _threshold(site)),
        ("Largest file", site.max_file_size.human_readable()),
        ("Batches", _batches(site)),
        ("Pool", _code(site.pool)),
        ("Retries", f"{site.retries}, {_duration(site.retry_delay_seconds)} apart"),
        (
            "Order sensor",
            f"checks every {_duration(site.sensor.poke_interval)}, "
            f"fails after {_duration(site.sensor.timeout)}",
        ),
        ("Work location", _code(site.work_location)),
        ("Reports location", _code(site.reports_location)),
        ("Ledger", _ledger(site)),
        ("Owner", _code(site.owner)),
        ("Tags", ", ".join(_code(tag) for tag in site.tags) or "none"),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    state = "" if site.enabled else " It is **disabled**: no runs are scheduled."
    return (
        f"### DICOM ingest: site {_code(site.id)}\n\n"
        f"Each run uploads the DICOM instances staged for its interval to the vendor, whole study "
        f"by whole study, sends each study's order metadata and waits until the vendor has "
        f"delivered or failed every order; a final task writes the run's report.{state}\n\n"
        "| Setting | Value |\n|---|---|\n"
        f"{table}\n\n"
        "Locations are shown as written: `{{ ... }}` is rendered by Airflow, `${NAME}` is read "
        "from the environment when a task runs, and a relative local path lies under "
        "`$AIRFLOW_HOME`.\n"
    )


def _code(value: str) -> str:
    """Render ``value`` as inline code that is safe inside a Markdown table cell."""
    text = str(value).replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _duration(seconds: float) -> str:
    """Render a number of seconds in the largest whole unit: ``6 h``, ``5 min``, ``90 s``."""
    if seconds and seconds % _SECONDS_PER_HOUR == 0:
        return f"{seconds / _SECONDS_PER_HOUR:g} h"
    if seconds and seconds % _SECONDS_PER_MINUTE == 0:
        return f"{seconds / _SECONDS_PER_MINUTE:g} min"
    return f"{seconds:g} s"


def _schedule(site: SiteConfig) -> str:
    """Describe when the site runs."""
    catchup = "missed intervals are caught up" if site.catchup else "no catch-up"
    return (
        f"{_code(site.schedule)} in {site.timezone}, from {site.start_date.isoformat()}, {catchup}; "
        "one run at a time"
    )


def _required_metadata(site: SiteConfig) -> str:
    """Describe the fields a study needs before upload."""
    if not site.required_metadata:
        return "none"
    fields = ", ".join(_code(field) for field in site.required_metadata)
    return f"{fields}; a study lacking one is held back and nothing of it is sent"


def _metadata_sources(site: SiteConfig) -> str:
    """Describe where order metadata comes from."""
    sources = site.metadata
    parts = []
    if sources.tags:
        mapping = ", ".join(f"{_code(field)} ← {keyword}" for field, keyword in sources.tags.items())
        parts.append(f"DICOM tags ({mapping})")
    if sources.sidecar:
        parts.append(f"sidecar file {_code(sources.sidecar)} in the study's folder")
    if sources.manifest:
        parts.append(f"manifest {_code(sources.manifest)} keyed by {sources.manifest_key}")
    return "; ".join(parts) or "none"


def _quarantine(site: SiteConfig) -> str:
    """Describe what happens to invalid files."""
    location = _code(site.quarantine.location) if site.quarantine.location else ""
    return _QUARANTINE_EFFECT[site.quarantine.policy].format(location=location)


def _threshold(site: SiteConfig) -> str:
    """Describe when invalid files fail a run."""
    threshold = site.invalid_threshold
    limits = []
    if threshold.max_fraction is not None:
        limits.append(f"more than {threshold.max_fraction * 100:g}% of the scanned files")
    if threshold.max_count is not None:
        limits.append(f"more than {threshold.max_count} files")
    if not limits:
        return "none: invalid files never fail a run on their own"
    return f"the run fails before any upload when {' or '.join(limits)} are invalid"


def _batches(site: SiteConfig) -> str:
    """Describe batching and upload parallelism."""
    return (
        f"whole studies, up to {site.batch.max_instances:,} instances or "
        f"{site.batch.max_bytes.human_readable()} per batch (a larger study gets a batch of its own); "
        f"{site.max_active_batches} batches at a time, {site.upload_concurrency} parallel uploads each"
    )


def _ledger(site: SiteConfig) -> str:
    """Describe where the site's ledger lives."""
    if site.ledger.conn_id:
        return f"PostgreSQL through connection {_code(site.ledger.conn_id)}"
    if site.ledger.path:
        return f"SQLite file {_code(site.ledger.path)}"
    return (
        f"PostgreSQL through the connection named by `${LEDGER_CONN_ID_ENV}` when it is set, "
        f"else SQLite file {_code(site.default_ledger_path)}"
    )
