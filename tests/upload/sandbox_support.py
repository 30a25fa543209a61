"""A real staging area of DICOM files, planned by ``build_plan``, for tests against the sandbox.

The files carry no PatientAge/PatientSex tags: each study's ``metadata.json`` sidecar gives them,
so an order only completes when the uploader's PATCH arrives (a partial order stays open).
"""

from __future__ import annotations

import json
import secrets
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dicom_ingest.ledger import Ledger
from dicom_ingest.staging import Plan, build_plan
from dicom_ingest_sandbox.testing import Sandbox
from tests.hooks.support import set_connection
from tests.staging.factory import uid, write_study
from tests.upload.support import SITE, record_plan

CONN_ID = "upload_sandbox"
FAST_RETRIES = {"backoff_base": 0.05, "backoff_max": 0.5, "max_retries": 3}


@dataclass(frozen=True)
class StagedRun:
    """A planned staging area and what the vendor must end up with.

    :param plan: the plan written by ``build_plan``.
    :param metadata: study UID → the order metadata its sidecar gives.
    :param instances: study UID → its SOP Instance UIDs.
    """

    plan: Plan
    metadata: dict[str, dict[str, Any]]
    instances: dict[str, set[str]]

    @property
    def batch_id(self) -> str:
        """The plan's only batch."""
        (batch_id,) = self.plan.batch_ids
        return batch_id


def stage_and_plan(folder: Path, studies: int, instances: int) -> StagedRun:
    """Write ``studies`` studies of ``instances`` DICOM files (fake patients) and plan them.

    :param folder: the test's folder; the ``staging`` and ``work`` folders go below it.
    :param studies: how many studies.
    :param instances: instances per study.
    """
    staging, work = folder / "staging", folder / "work"
    metadata: dict[str, dict[str, Any]] = {}
    sop_uids: dict[str, set[str]] = {}
    run_number = secrets.randbelow(10**9)  # one sandbox serves every test: keep each test's studies apart
    for number in range(studies):
        study_uid = uid(800, run_number, number)
        folder = f"patient-{number}/study"
        paths = write_study(staging, folder, study_uid, instances, patient_age=None, patient_sex=None)
        age, sex = 40 + number, "MF"[number % 2]
        (staging / folder / "metadata.json").write_text(
            json.dumps({"PatientAge": f"{age:03d}Y", "PatientSex": sex})
        )
        metadata[study_uid] = {"patient_age": age, "patient_sex": sex}
        sop_uids[study_uid] = {f"{study_uid}.1.{index}" for index, _ in enumerate(paths)}
    plan = build_plan(str(staging), str(work))
    return StagedRun(plan, metadata, sop_uids)


def record(ledger: Ledger, run: StagedRun, site_id: str = SITE) -> None:
    """Record the plan's batch in the ledger, as the plan task does.

    :param ledger: the ledger.
    :param run: the planned staging area.
    :param site_id: the site.
    """
    record_plan(ledger, run.plan.iter_batch(run.batch_id), site_id=site_id, batch_id=run.batch_id)


def connect(monkeypatch: pytest.MonkeyPatch, sandbox: Sandbox, **extra: Any) -> None:
    """Point the :data:`CONN_ID` connection at the sandbox, with quick retries.

    :param monkeypatch: pytest's monkeypatch.
    :param sandbox: the running sandbox.
    :param extra: connection extras replacing the quick-retry defaults.
    """
    set_connection(
        monkeypatch,
        CONN_ID,
        host=sandbox.base_url,
        login=sandbox.client_id,
        password=sandbox.client_secret,
        **{**FAST_RETRIES, **extra},
    )


def orders_by_study(state: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Group the sandbox's orders by study.

    :param state: ``sandbox.state()``.
    """
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for order in state["orders"]:
        grouped[order["study_uid"]].append(order)
    return dict(grouped)


def wait_until_delivered(sandbox: Sandbox, study_uids: set[str]) -> dict[str, list[dict[str, Any]]]:
    """Wait until every study's latest order is ``DELIVERED``; return the orders by study.

    :param sandbox: the running sandbox.
    :param study_uids: the studies to wait for.
    """

    def delivered(state: dict[str, Any]) -> dict[str, list[dict[str, Any]]] | None:
        grouped = orders_by_study(state)
        done = all(grouped.get(uid) and grouped[uid][-1]["status"] == "DELIVERED" for uid in study_uids)
        return grouped if done else None

    return sandbox.wait_for(delivered, timeout=30)


def assert_one_complete_order_each(orders: dict[str, list[dict[str, Any]]], run: StagedRun) -> None:
    """Check that every study has exactly one order, delivered, with all its instances and its metadata.

    :param orders: the sandbox's orders by study.
    :param run: the planned staging area.
    """
    assert set(orders) == set(run.instances)
    for study_uid, study_orders in orders.items():
        assert len(study_orders) == 1, f"study {study_uid} has {len(study_orders)} orders"
        (order,) = study_orders
        assert order["status"] == "DELIVERED"
        assert {instance["sop_instance_uid"] for instance in order["instances"]} == run.instances[study_uid]
        assert {field: order["metadata"].get(field) for field in run.metadata[study_uid]} == run.metadata[
            study_uid
        ]
