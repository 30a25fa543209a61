"""Helpers shared by the DAG, operator and end-to-end tests: sites files, sites and ledger states."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from dicom_ingest.ledger import ClaimAction, Ledger
from dicom_ingest.sites import SiteConfig
from dicom_ingest.staging import Plan
from dicom_ingest.staging import PlannedStudy as StagedStudy

REPO_ROOT = Path(__file__).resolve().parents[2]
DAGS_FOLDER = REPO_ROOT / "dags"
SITE_DAG_FILE = DAGS_FOLDER / "dicom_ingest_sites.py"
SITE_ERRORS_FILE = DAGS_FOLDER / "dicom_ingest_site_errors.py"

RUN_ID = "manual__2025-03-01T00:00:00+00:00"
DELIVERED = "DELIVERED"


@contextlib.contextmanager
def private_folder() -> Iterator[Path]:
    """Give a temporary folder of this test alone.

    pytest's numbered ``tmp_path`` folders are pruned by other pytest runs started meanwhile.
    """
    with tempfile.TemporaryDirectory(prefix="dicom-ingest-dags-") as folder:
        yield Path(folder)


def site_entry(site_id: str, folder: Path, **overrides: Any) -> dict[str, Any]:
    """Return a sites-file entry whose locations all lie in ``folder``.

    :param site_id: the site's id.
    :param folder: a private folder for the site's staging, work, reports and ledger.
    :param overrides: keys to set or replace.
    """
    entry: dict[str, Any] = {
        "id": site_id,
        "schedule": "@daily",
        "staging": str(folder / "staging"),
        "conn_id": "dicom_ingest_default",
        "work_location": str(folder / "work"),
        "reports_location": str(folder / "reports"),
        "ledger": {"path": str(folder / "ledger.sqlite")},
        "invalid_threshold": {"max_fraction": 0.5},
    }
    entry.update(overrides)
    return entry


def write_sites_file(path: Path, entries: Iterable[Mapping[str, Any]]) -> Path:
    """Write a sites file holding ``entries`` and return its path.

    :param path: the file to write.
    :param entries: the ``sites:`` entries.
    """
    path.write_text(yaml.safe_dump({"sites": list(entries)}, sort_keys=False), encoding="utf-8")
    return path


def site_args(entry: Mapping[str, Any]) -> dict[str, Any]:
    """Return an entry as the operators take it: validated, then dumped to JSON types.

    :param entry: a sites-file entry.
    """
    return SiteConfig.model_validate(dict(entry)).model_dump(mode="json")


def open_ledger(entry: Mapping[str, Any]) -> Ledger:
    """Open the SQLite ledger of a site made by :func:`site_entry`.

    :param entry: the site's entry.
    """
    return Ledger.for_location(entry["ledger"]["path"])


def batch_studies(plan: Plan) -> dict[str, tuple[str, StagedStudy]]:
    """Return every study of the plan's batches by UID, with its batch id.

    :param plan: a written plan.
    """
    return {
        study.study_uid: (batch.batch_id, study)
        for batch in plan.batches
        for study in plan.iter_batch(batch.batch_id)
    }


def order_id_of(study_uid: str) -> str:
    """Return a made-up vendor order id for a study."""
    return f"order-{hashlib.sha1(study_uid.encode()).hexdigest()[:12]}"


def upload_study(ledger: Ledger, site_id: str, run_id: str, batch_id: str, study: StagedStudy) -> str:
    """Take a planned study through claim, uploads and metadata in the ledger; return its claim token.

    :param ledger: the site's ledger.
    :param site_id: the site.
    :param run_id: the run.
    :param batch_id: the study's batch.
    :param study: the planned study.
    """
    claim = ledger.claim_study(site_id, study.study_uid, run_id, batch_id)
    assert claim.action is ClaimAction.UPLOAD_ALL, claim
    for instance in study.instances:
        digest = hashlib.md5(instance.sop_uid.encode()).hexdigest()
        ledger.mark_instance_uploaded(
            site_id, instance.sop_uid, f"uploads/{instance.sop_uid}.dcm", digest, digest
        )
    ledger.mark_study_uploaded(site_id, study.study_uid, token=claim.token)
    ledger.mark_metadata_sent(site_id, study.study_uid, order_id_of(study.study_uid))
    return claim.token or ""


def deliver_study(ledger: Ledger, site_id: str, run_id: str, batch_id: str, study: StagedStudy) -> None:
    """Take a planned study all the way to ``verified`` in the ledger, as a successful batch would.

    :param ledger: the site's ledger.
    :param site_id: the site.
    :param run_id: the run.
    :param batch_id: the study's batch.
    :param study: the planned study.
    """
    upload_study(ledger, site_id, run_id, batch_id, study)
    ledger.mark_verified(site_id, study.study_uid, order_id_of(study.study_uid), DELIVERED)


@functools.cache
def migrated_airflow_db() -> None:
    """Create Airflow's metadata database (SQLite, in the session's AIRFLOW_HOME) once per process."""
    from airflow.utils import db

    db.resetdb()
