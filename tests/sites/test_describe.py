"""The Markdown description of a site that becomes its DAG's ``doc_md``."""

from __future__ import annotations

import re
from typing import Any

from dicom_ingest.sites import SiteConfig, describe_site
from tests.sites.conftest import MINIMAL_ENTRY

UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")


def table_rows(markdown: str) -> dict[str, str]:
    """Return the settings table as ``{setting: value}``, failing on a row with a wrong cell count."""
    rows = {}
    for line in markdown.splitlines():
        if not line.startswith("| ") or line.startswith("| Setting "):
            continue
        cells = UNESCAPED_PIPE.split(line)
        assert len(cells) == 4, f"malformed table row: {line}"
        rows[cells[1].strip()] = cells[2].strip()
    return rows


def describe(**overrides: Any) -> str:
    """Describe the minimal entry with ``overrides`` applied."""
    return describe_site(SiteConfig.model_validate({**MINIMAL_ENTRY, **overrides}))


def test_every_setting_is_in_the_table() -> None:
    rows = table_rows(
        describe(
            schedule="30 1 * * 1-5",
            timezone="Europe/Paris",
            start_date="2024-06-01",
            catchup=True,
            staging="s3://aws_lyon@lyon-staging/{{ ds }}/",
            conn_id="vendor_lyon",
            required_metadata=["patient_age", "accession_number"],
            metadata={"manifest": "/data/manifest.csv", "manifest_key": "AccessionNumber", "sidecar": None},
            upload_concurrency=12,
            quarantine={"policy": "move", "location": "/quarantine/lyon"},
            invalid_threshold={"max_fraction": 0.25, "max_count": 40},
            batch={"max_instances": 750, "max_bytes": "2GiB"},
            max_active_batches=3,
            pool="vendor_eu",
            retries=4,
            retry_delay_seconds=90,
            owner="radiology",
            tags=["lyon", "nightly"],
            max_file_size="1GiB",
            work_location="/work/lyon",
            reports_location="/reports/lyon",
            ledger={"conn_id": "ledger_pg"},
            sensor={"poke_interval": 30, "timeout": 7200},
        )
    )

    assert rows["Schedule"] == (
        "`30 1 * * 1-5` in Europe/Paris, from 2024-06-01, missed intervals are caught up; one run at a time"
    )
    assert rows["Staging"] == "`s3://aws_lyon@lyon-staging/{{ ds }}/`"
    assert rows["Vendor connection"] == "`vendor_lyon`"
    assert rows["Required metadata"].startswith("`patient_age`, `accession_number`; a study lacking one")
    assert "manifest `/data/manifest.csv` keyed by AccessionNumber" in rows["Metadata sources"]
    assert "sidecar" not in rows["Metadata sources"]
    assert rows["Invalid files"].startswith("moved to `/quarantine/lyon` with a reason file")
    assert rows["Invalid-file threshold"] == (
        "the run fails before any upload when more than 25% of the scanned files "
        "or more than 40 files are invalid"
    )
    assert rows["Largest file"] == "1.0GiB"
    assert "up to 750 instances or 2.0GiB per batch" in rows["Batches"]
    assert "3 batches at a time, 12 parallel uploads each" in rows["Batches"]
    assert rows["Pool"] == "`vendor_eu`"
    assert rows["Retries"] == "4, 90 s apart"
    assert rows["Order sensor"] == "checks every 30 s, fails after 2 h"
    assert rows["Work location"] == "`/work/lyon`"
    assert rows["Reports location"] == "`/reports/lyon`"
    assert rows["Ledger"] == "PostgreSQL through connection `ledger_pg`"
    assert rows["Owner"] == "`radiology`"
    assert rows["Tags"] == "`lyon`, `nightly`"


def test_defaults_are_described_as_they_apply() -> None:
    rows = table_rows(describe())

    assert rows["Invalid files"].startswith("left in place")
    assert "DICOM tags (`patient_age` ← PatientAge" in rows["Metadata sources"]
    assert "sidecar file `metadata.json`" in rows["Metadata sources"]
    assert rows["Ledger"] == (
        "PostgreSQL through the connection named by `$DICOM_INGEST_LEDGER_CONN_ID` when it is set, "
        "else SQLite file `dicom_ingest/lyon/ledger.sqlite`"
    )
    assert rows["Tags"] == "none"
    assert rows["Retries"] == "2, 1 min apart"


def test_no_threshold_and_no_required_metadata_are_said_plainly() -> None:
    rows = table_rows(describe(invalid_threshold={"max_fraction": None}, required_metadata=[]))

    assert rows["Invalid-file threshold"] == "none: invalid files never fail a run on their own"
    assert rows["Required metadata"] == "none"


def test_pipes_and_backticks_in_values_keep_the_table_intact() -> None:
    rows = table_rows(describe(staging="/data/a|b", owner="team `x`"))

    assert rows["Staging"] == "`/data/a\\|b`"
    assert rows["Owner"] == "`` team `x` ``"


def test_disabled_site_says_so_and_enabled_site_does_not() -> None:
    assert "**disabled**" in describe(enabled=False)
    assert "disabled" not in describe()


def test_heading_names_the_site() -> None:
    assert describe().startswith("### DICOM ingest: site `lyon`\n")
