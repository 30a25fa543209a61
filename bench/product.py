"""The product's own upload path, run in this process the way a site DAG's tasks run it.

A benchmark site is a normal ``sites.yaml`` entry pointed at a generated staging area. The plan
task's planner (:class:`~dicom_ingest.operators.plan.RunPlanner`) scans it, writes the plan and
records it in a fresh SQLite ledger; then each batch goes through the upload task's engine
(:class:`~dicom_ingest.upload.BatchUploader` over the hook, the plan and the ledger, with the
metadata PATCH and progress), built the way the upload task builds it. Only the uploads are
timed. Batches run one after another, as ``airflow dags test`` runs them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from bench.clients import UploadRefused, VendorApi

SITE_ID = "bench"
CONNECTION_ID = "dicom_ingest_bench"
CONNECTION_ENV = f"AIRFLOW_CONN_{CONNECTION_ID.upper()}"


def connection_json(api: VendorApi, extra: Mapping[str, Any] | None = None) -> str:
    """Return the benchmark's ``dicom_ingest`` connection to the sandbox, in Airflow's JSON form.

    :param api: the sandbox's API and credentials.
    :param extra: connection extras (defaults otherwise).
    """
    return json.dumps(
        {
            "conn_type": "dicom_ingest",
            "host": api.base_url,
            "login": api.client_id,
            "password": api.client_secret,
            **({"extra": dict(extra)} if extra else {}),
        }
    )


@contextmanager
def vendor_connection(api: VendorApi, extra: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Make the benchmark's connection visible to hooks in this process (an environment variable).

    :param api: the sandbox's API and credentials.
    :param extra: connection extras (defaults otherwise).
    """
    previous = os.environ.get(CONNECTION_ENV)
    os.environ[CONNECTION_ENV] = connection_json(api, extra)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(CONNECTION_ENV, None)
        else:
            os.environ[CONNECTION_ENV] = previous


def site_entry(
    staging: str,
    *,
    upload_concurrency: int,
    ledger_path: str,
    work_location: str,
    reports_location: str,
    poke_interval: float = 1.0,
) -> dict[str, Any]:
    """Return the benchmark site as a ``sites.yaml`` entry.

    :param staging: the staging location.
    :param upload_concurrency: parallel uploads within a batch.
    :param ledger_path: the SQLite ledger (may be an ``${ENV}`` reference).
    :param work_location: where plans are written.
    :param reports_location: where run reports are written.
    :param poke_interval: seconds between two checks of a batch's orders.
    """
    return {
        "id": SITE_ID,
        "enabled": True,
        "schedule": "@daily",
        "timezone": "UTC",
        "start_date": "2025-01-01",
        "catchup": False,
        "staging": staging,
        "conn_id": CONNECTION_ID,
        "required_metadata": ["patient_age", "patient_sex"],
        "upload_concurrency": upload_concurrency,
        "retries": 0,
        "work_location": work_location,
        "reports_location": reports_location,
        "ledger": {"path": ledger_path},
        "sensor": {"poke_interval": poke_interval, "timeout": 3600},
    }


def operator_arguments(entry: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a site entry into the dict the operators take (``SiteConfig.model_dump(mode="json")``).

    :param entry: a ``sites.yaml`` entry.
    """
    from dicom_ingest.sites import SiteConfig

    return SiteConfig.model_validate(dict(entry)).model_dump(mode="json")


@contextmanager
def quiet_task_logs() -> Iterator[None]:
    """Keep the product's progress lines off the console (warnings and errors still show)."""
    logger = logging.getLogger("dicom_ingest")
    previous = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(previous)


def plan_run(site: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Do what the plan task does: scan, write the plan, record it in the ledger; return its batches.

    :param site: the operators' site dict.
    :param run_id: the run's id (names the work folder and the ledger's run).
    :return: ``{"work_uri": ..., "batches": [...]}`` as the plan task hands them to the upload tasks.
    """
    from dicom_ingest.operators.plan import RunPlanner, batch_summaries
    from dicom_ingest.sites.runtime import SiteRuntime

    runtime = SiteRuntime.from_dict(site)
    try:
        planner = RunPlanner(runtime, run_id)
        plan = planner.build()
        planner.record(plan)
    finally:
        runtime.close()
    return {"work_uri": str(plan.work), "batches": batch_summaries(plan)}


def upload_batches(site: dict[str, Any], plan: Mapping[str, Any], run_id: str) -> list[dict[str, Any]]:
    """Do what the upload task does for every planned batch, one after another; return their results.

    Each batch gets its own hook, ledger connection and :class:`~dicom_ingest.upload.BatchUploader`,
    built as :class:`~dicom_ingest.operators.upload.DicomUploadBatchOperator` builds them.

    :param site: the operators' site dict.
    :param plan: what :func:`plan_run` returned.
    :param run_id: the run's id.
    :raises UploadRefused: a batch had failed studies.
    """
    from dicom_ingest.hooks.dicom_ingest import DicomIngestHook
    from dicom_ingest.operators.upload import claim_owner
    from dicom_ingest.sites.runtime import SiteRuntime
    from dicom_ingest.staging import Plan
    from dicom_ingest.upload import BatchUploader

    results = []
    for batch in plan["batches"]:
        runtime = SiteRuntime.from_dict(site)
        staged = Plan.load(plan["work_uri"])
        hook = DicomIngestHook(dicom_ingest_conn_id=runtime.config.conn_id)
        try:
            uploader = BatchUploader(
                hook,
                runtime.ledger,
                staged.source(),
                runtime.site_id,
                run_id,
                batch["batch_id"],
                min(runtime.config.upload_concurrency, hook.config.upload_concurrency),
                batch_index=batch["index"],
                claim_owner=claim_owner(runtime.site_id, run_id, batch["batch_id"]),
            )
            result = uploader.run(staged.iter_batch(batch["batch_id"]))
        finally:
            hook.close()
            runtime.close()
        if result.failed:
            raise UploadRefused(f"batch {batch['batch_id']}: {result.failure_summary()}")
        results.append(result.to_xcom())
    return results
