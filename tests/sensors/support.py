"""Sites, ledgers and vendor orders shared by the sensor, trigger and web tests."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dicom_ingest.ledger import Ledger, PlannedInstance, PlannedStudy
from dicom_ingest.sites import SiteConfig
from dicom_ingest_sandbox.testing import Sandbox, build_instance, new_uid
from tests.hooks.support import set_connection

SITE_ID = "paris"
DAG_ID = f"dicom_ingest__{SITE_ID}"
CONN_ID = "dicom_ingest_orders_tests"
RUN_ID = "manual__2026-11-01T02:00:00+00:00"
BATCH_ID = "batch-0000"
POLL_SECONDS = 0.2
INSTANCE_SIZE = 4_096
FAST_BACKOFF = {"backoff_base": 0.05, "backoff_max": 0.2, "max_retries": 2}


def site_dict(ledger_path: Path, **settings: Any) -> dict[str, Any]:
    """Return a site's configuration as operators receive it, with its ledger at ``ledger_path``.

    :param ledger_path: the site's SQLite ledger file.
    :param settings: keys of the site entry to add or replace.
    """
    entry = {
        "id": SITE_ID,
        "schedule": "@daily",
        "staging": str(ledger_path.parent / "staging"),
        "conn_id": CONN_ID,
        "ledger": {"path": str(ledger_path)},
        "sensor": {"poke_interval": POLL_SECONDS, "timeout": 30},
        **settings,
    }
    return SiteConfig.model_validate(entry).model_dump(mode="json")


def connect_to(monkeypatch: pytest.MonkeyPatch, sandbox: Sandbox, **extra: Any) -> None:
    """Point the tests' ``dicom_ingest`` connection at the sandbox, with short backoffs.

    :param monkeypatch: pytest's monkeypatch.
    :param sandbox: the running sandbox.
    :param extra: connection extras to add or replace.
    """
    set_connection(
        monkeypatch,
        CONN_ID,
        host=sandbox.base_url,
        login=sandbox.client_id,
        password=sandbox.client_secret,
        **{**FAST_BACKOFF, **extra},
    )


@dataclass(frozen=True)
class SentStudy:
    """A study whose instances the sandbox received, with the order it opened.

    :param study_uid: the StudyInstanceUID.
    :param sop_uids: its instances' SOPInstanceUIDs.
    :param order_id: the vendor's order.
    """

    study_uid: str
    sop_uids: tuple[str, ...]
    order_id: str


def send_study(sandbox: Sandbox, *, instances: int = 2, complete_metadata: bool = True) -> SentStudy:
    """Upload a new study to the sandbox and return it once the sandbox filed every instance.

    :param sandbox: the running sandbox.
    :param instances: how many instances to send.
    :param complete_metadata: whether the tags carry the required patient age and sex; without
        them the order waits for metadata until the sandbox's deadline fails it.
    """
    study_uid, token = new_uid(), sandbox.token()
    tags = {} if complete_metadata else {"patient_age": None, "patient_sex": None}
    sop_uids = tuple(new_uid() for _ in range(instances))
    for sop_uid in sop_uids:
        sandbox.put_object(build_instance(study_uid, sop_uid, **tags), token)

    def filed_order(state: dict[str, Any]) -> dict[str, Any] | None:
        return next(
            (
                order
                for order in state["orders"]
                if order["study_uid"] == study_uid and order["instances_received"] == instances
            ),
            None,
        )

    return SentStudy(study_uid, sop_uids, sandbox.wait_for(filed_order)["order_id"])


def planned_study(study_uid: str, sop_uids: tuple[str, ...]) -> PlannedStudy:
    """Return the plan's view of a study: its instances with made-up staging paths.

    :param study_uid: the StudyInstanceUID.
    :param sop_uids: its instances' SOPInstanceUIDs.
    """
    return PlannedStudy(
        study_uid,
        [
            PlannedInstance(sop_uid=sop_uid, path=f"/staging/{study_uid}/{index}.dcm", size=INSTANCE_SIZE)
            for index, sop_uid in enumerate(sop_uids)
        ],
    )


def record_metadata_sent(
    ledger: Ledger,
    study_uid: str,
    sop_uids: tuple[str, ...],
    order_id: str,
    *,
    run_id: str = RUN_ID,
    batch_id: str = BATCH_ID,
) -> None:
    """Walk a study through the ledger up to ``metadata_sent`` for ``order_id``, as the upload task does.

    :param ledger: the site's ledger.
    :param study_uid: the study.
    :param sop_uids: its instances.
    :param order_id: the order the vendor accepted the metadata for.
    :param run_id: the run.
    :param batch_id: the batch.
    """
    ledger.record_plan(SITE_ID, run_id, batch_id, [planned_study(study_uid, sop_uids)])
    claim = ledger.claim_study(SITE_ID, study_uid, run_id, batch_id)
    for sop_uid in sop_uids:
        md5 = hashlib.md5(sop_uid.encode(), usedforsecurity=False).hexdigest()
        ledger.mark_instance_uploaded(SITE_ID, sop_uid, f"uploads/{sop_uid}.dcm", md5, md5)
    ledger.mark_study_uploaded(SITE_ID, study_uid, token=claim.token)
    ledger.mark_metadata_sent(SITE_ID, study_uid, order_id)


def record_sent(ledger: Ledger, study: SentStudy, *, run_id: str = RUN_ID, batch_id: str = BATCH_ID) -> None:
    """Record a study the sandbox received as ``metadata_sent`` for its order.

    :param ledger: the site's ledger.
    :param study: the study.
    :param run_id: the run.
    :param batch_id: the batch.
    """
    record_metadata_sent(
        ledger, study.study_uid, study.sop_uids, study.order_id, run_id=run_id, batch_id=batch_id
    )


def record_held(
    ledger: Ledger,
    study_uid: str,
    *,
    reason: str = "metadata_missing",
    run_id: str = RUN_ID,
    batch_id: str = BATCH_ID,
) -> None:
    """Plan a study in the batch and hold it back, as the upload task does when metadata is missing.

    :param ledger: the site's ledger.
    :param study_uid: the study.
    :param reason: the reason it is held.
    :param run_id: the run.
    :param batch_id: the batch.
    """
    ledger.record_plan(SITE_ID, run_id, batch_id, [planned_study(study_uid, (new_uid(),))])
    ledger.hold_study(SITE_ID, study_uid, run_id, reason)


def fake_study(number: int) -> tuple[str, tuple[str, ...], str]:
    """Return a study UID, two instance UIDs and an order id that no vendor knows.

    :param number: distinguishes studies within a test.
    """
    study_uid = f"1.2.826.0.1.3680043.8.498.77.{number}"
    return study_uid, (f"{study_uid}.1", f"{study_uid}.2"), f"order-{number:04d}"
