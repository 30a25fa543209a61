"""Code run in separate processes (``spawn``) by the concurrency tests; each opens its own ledger."""

from __future__ import annotations

import traceback
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

from dicom_ingest.ledger import ClaimAction, Ledger
from tests.ledger.support import BATCH, RUN, SITE, planned_study, sop_uid, study_uid

BARRIER_TIMEOUT = 60.0
CONTENDED_STUDY = 0
ABANDONED_ORDER_STUDY = 1
FAILING_INSTANCE = sop_uid(2, 0)
UPDATES_PER_WORKER = 25
STUDIES_PLANNED = 3
INSTANCES_PER_STUDY = 5


def upload_study(ledger: Ledger, number: int, token: str | None) -> None:
    """Record every instance of study ``number`` as uploaded, then the study."""
    for index in range(INSTANCES_PER_STUDY):
        sop = sop_uid(number, index)
        ledger.mark_instance_uploaded(SITE, sop, f"key/{sop}", "0" * 32, "0" * 32)
    ledger.mark_study_uploaded(SITE, study_uid(number), token=token)


def plan_and_claim_one_study(url: str, owner: str, start: Barrier, claimed: Barrier, results: Queue) -> None:
    """Plan, claim the contended study, upload it if told to, then update shared rows many times.

    Reports ``(owner, action, error)`` on ``results``.
    """
    try:
        with Ledger(url) as ledger:
            plan = [planned_study(number, instances=INSTANCES_PER_STUDY) for number in range(STUDIES_PLANNED)]
            start.wait(BARRIER_TIMEOUT)
            ledger.record_plan(SITE, RUN, BATCH, plan)
            start.wait(BARRIER_TIMEOUT)
            answer = ledger.claim_study(SITE, study_uid(CONTENDED_STUDY), RUN, BATCH, owner=owner)
            claimed.wait(BARRIER_TIMEOUT)
            if answer.action == ClaimAction.UPLOAD_ALL:
                upload_study(ledger, CONTENDED_STUDY, answer.token)
            for round_number in range(UPDATES_PER_WORKER):
                ledger.record_abandoned_order(
                    SITE, study_uid(ABANDONED_ORDER_STUDY), f"{owner}-order-{round_number}"
                )
                ledger.mark_instance_failed(SITE, FAILING_INSTANCE, "put_failed")
        results.put((owner, answer.action.value, None))
    except Exception:
        results.put((owner, None, traceback.format_exc()))


def claim_and_upload_every_study(
    url: str, owner: str, study_numbers: list[int], start: Barrier, results: Queue
) -> None:
    """Claim each study in the given order and upload the ones this worker wins.

    Reports ``(owner, {study_uid: action}, error)`` on ``results``.
    """
    try:
        actions: dict[str, str] = {}
        with Ledger(url) as ledger:
            start.wait(BARRIER_TIMEOUT)
            for number in study_numbers:
                answer = ledger.claim_study(SITE, study_uid(number), RUN, BATCH, owner=owner)
                actions[answer.study_uid] = answer.action.value
                if answer.action == ClaimAction.UPLOAD_ALL:
                    upload_study(ledger, number, answer.token)
        results.put((owner, actions, None))
    except Exception:
        results.put((owner, None, traceback.format_exc()))
