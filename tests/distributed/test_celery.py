"""The demo site's DAG, unchanged, on CeleryExecutor with PostgreSQL and Redis; a worker and a scheduler lost.

Every test checks the outcome where the vendor sees it, through the sandbox's own state
(:meth:`SampleManifest.delivery_problems`): exactly one ``DELIVERED`` order per valid study,
holding every one of its instances and complete metadata; no order for a held-back study or a
bad file; no upload the vendor rejected. Each test stages days of its own, and starts from an
empty sandbox, so a day's studies are new to the site's ledger and to the vendor.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from dicom_ingest.ledger import Ledger
from dicom_ingest_sandbox.samples import SampleManifest, build_sample_staging
from dicom_ingest_sandbox.testing import Sandbox
from scripts.stack import FINISHED_RUN_STATES, SCHEDULER, Stack, wait_until
from tests.distributed.conftest import DEMO_DAG_ID, DEMO_SITE_ID

UPLOAD_TASK_ID = "ingest_batch.upload"
WAIT_TASK_ID = "ingest_batch.wait_for_orders"
TRIGGER_CLASS_NAME = "DicomOrderTrigger"

RUN_TIMEOUT_SECONDS = 300.0
MID_UPLOAD_OBJECTS = 4
"""Objects the vendor holds when a test interrupts a run: the upload has begun, not finished."""
SLOW_PRESIGN = {"kind": "latency", "endpoint": "upload", "seconds": 1.0, "rate": 1.0}
"""Holds every presign call, so that a batch's upload lasts long enough to be interrupted."""
HOLD_ORDERS_QUIET_PERIOD = 3600
"""A vendor quiet period no test waits out: orders stay ``UPLOADING`` until the test shortens it."""
RECOVERY_QUIET_PERIOD = 60
"""A vendor quiet period longer than a lost worker's recovery (heartbeat timeout, retry, re-send),
so an interrupted study's partial order is still open when its instances are re-sent."""


def stage(demo_root: Path, day: str, **options: Any) -> SampleManifest:
    """Write the sample staging area of ``day`` where the demo site reads it.

    :param demo_root: the stack's ``$DICOM_INGEST_DEMO_ROOT``.
    :param day: ``YYYY-MM-DD``.
    :param options: passed to :func:`build_sample_staging`.
    """
    return build_sample_staging(demo_root / "staging" / day, day=day, **options)


def stage_generated_only(demo_root: Path, day: str, **options: Any) -> SampleManifest:
    """Stage generated studies only: pydicom's bundled files have fixed UIDs and are sent once per ledger.

    :param demo_root: the stack's ``$DICOM_INGEST_DEMO_ROOT``.
    :param day: ``YYYY-MM-DD``.
    :param options: more options of :func:`build_sample_staging`.
    """
    return stage(demo_root, day, include_bundled=False, include_bad=False, **options)


def midnight(day: str) -> str:
    """Return the logical date of ``day``'s run: that day at 00:00 UTC.

    :param day: ``YYYY-MM-DD``.
    """
    return f"{day}T00:00:00Z"


def fresh_sandbox(stack: Stack) -> Sandbox:
    """Return the stack's sandbox emptied of orders, objects and faults."""
    assert stack.sandbox is not None
    stack.sandbox.reset()
    return stack.sandbox


def tis_of(instances: list[dict[str, Any]], task_id: str) -> list[dict[str, Any]]:
    """Return the task instances of one task (all map indexes).

    :param instances: :meth:`Stack.task_instances` of a run.
    :param task_id: the task's full id.
    """
    return [ti for ti in instances if ti["task_id"] == task_id]


def assert_run_succeeded(stack: Stack, run_id: str, run: dict[str, Any]) -> list[dict[str, Any]]:
    """Assert that the run and every one of its task instances succeeded; return the task instances.

    :param stack: the stack.
    :param run_id: the run.
    :param run: the finished run as :meth:`Stack.wait_for_run` returned it.
    """
    instances = stack.task_instances(DEMO_DAG_ID, run_id)
    states = {f"{ti['task_id']}[{ti['map_index']}]": ti["state"] for ti in instances}
    assert run["state"] == "success", f"run {run_id} ended {run['state']}; task instances: {states}"
    assert set(states.values()) == {"success"}, states
    assert tis_of(instances, UPLOAD_TASK_ID), "the plan produced no batch to upload"
    return instances


def accepted_objects(state: dict[str, Any]) -> int:
    """Return how many uploaded objects the vendor accepted (re-sent copies included).

    :param state: the sandbox's state.
    """
    return sum(1 for item in state["objects"] if item["accepted"])


def trigger_slow_run(stack: Stack, sandbox: Sandbox, day: str) -> str:
    """Trigger ``day``'s run with slow presign calls; return its id once its upload is under way.

    :param stack: the stack.
    :param sandbox: the stack's sandbox (the caller clears the fault).
    :param day: ``YYYY-MM-DD``.
    """
    sandbox.faults(SLOW_PRESIGN)
    run_id = stack.trigger_dag(DEMO_DAG_ID, logical_date=midnight(day))
    sandbox.wait_for(lambda state: len(state["objects"]) >= MID_UPLOAD_OBJECTS, timeout=RUN_TIMEOUT_SECONDS)
    return run_id


def verified_in_ledger(stack: Stack, manifest: SampleManifest) -> set[str]:
    """Return the studies of ``manifest`` that the site's ledger, in PostgreSQL, records as delivered.

    :param stack: the stack.
    :param manifest: the staged sample.
    """
    with Ledger(stack.ledger_url) as ledger:
        return ledger.done_studies(DEMO_SITE_ID, [study.study_uid for study in manifest.studies])


def delivered_uids(manifest: SampleManifest) -> set[str]:
    """Return the UIDs of the studies a correct run delivers.

    :param manifest: the staged sample.
    """
    return {study.study_uid for study in manifest.delivered_studies}


def every_sensor_deferred(stack: Stack, run_id: str) -> list[dict[str, Any]] | None:
    """Return the run's order sensors once every batch is uploaded and every sensor is deferred.

    :param stack: the stack.
    :param run_id: the run.
    """
    instances = stack.task_instances(DEMO_DAG_ID, run_id, with_tries=False)
    uploads, sensors = tis_of(instances, UPLOAD_TASK_ID), tis_of(instances, WAIT_TASK_ID)
    uploaded = bool(uploads) and all(ti["map_index"] >= 0 and ti["state"] == "success" for ti in uploads)
    deferred = len(sensors) == len(uploads) and all(ti["state"] == "deferred" for ti in sensors)
    return sensors if uploaded and deferred else None


def triggerer_job_ids(stack: Stack) -> set[int]:
    """Return the ids of the stack's triggerer jobs, from the REST API."""
    jobs = stack.api("GET", "/api/v2/jobs", params={"job_type": "TriggererJob", "limit": 100})["jobs"]
    return {job["id"] for job in jobs}


def test_rest_triggered_run_delivers_each_study_once_and_waits_in_the_triggerer(
    stack: Stack, demo_root: Path
) -> None:
    """A run triggered through the REST API delivers the demo sample; its order sensors deferred.

    The vendor holds every order until each sensor has deferred, so that no sensor can find its
    orders finished at its first, synchronous check; then the orders go through.
    """
    sandbox = fresh_sandbox(stack)
    day = "2025-01-02"
    manifest = stage(demo_root, day)

    with sandbox.clocks(quiet_period=HOLD_ORDERS_QUIET_PERIOD):
        run_id = stack.trigger_dag(DEMO_DAG_ID, logical_date=midnight(day))
        wait_until(
            lambda: every_sensor_deferred(stack, run_id),
            RUN_TIMEOUT_SECONDS,
            "every batch uploaded and every order sensor deferred",
            interval=1,
        )
    run = stack.wait_for_run(DEMO_DAG_ID, run_id, timeout=RUN_TIMEOUT_SECONDS)

    instances = assert_run_succeeded(stack, run_id, run)
    state = sandbox.state()
    assert manifest.delivery_problems(state) == []
    delivered = [order for order in state["orders"] if order["status"] == "DELIVERED"]
    assert len(delivered) == len(manifest.delivered_studies)
    assert accepted_objects(state) == manifest.instances_to_deliver
    assert verified_in_ledger(stack, manifest) == delivered_uids(manifest)

    worker_log = "\n".join(stack.processes[name].log_text() for name in stack.worker_names())
    for ti in tis_of(instances, UPLOAD_TASK_ID):
        assert f"run_id={run_id}/task_id={UPLOAD_TASK_ID}/map_index={ti['map_index']}/" in worker_log, (
            "the upload task did not run on the Celery worker"
        )

    triggerers = triggerer_job_ids(stack)
    sensors = tis_of(instances, WAIT_TASK_ID)
    assert len(sensors) == len(tis_of(instances, UPLOAD_TASK_ID))
    for sensor in sensors:
        trigger_logs = stack.trigger_log_files(DEMO_DAG_ID, run_id, WAIT_TASK_ID, sensor["map_index"])
        assert trigger_logs, f"sensor {sensor['map_index']} never ran a trigger: it did not defer"
        # attempt=<n>.log.trigger.<triggerer job id>.log: the triggerer that ran it.
        assert {int(path.name.rsplit(".", 2)[-2]) for path in trigger_logs} <= triggerers
        assert TRIGGER_CLASS_NAME in "".join(path.read_text() for path in trigger_logs)
        # Deferring and resuming happen within one try: the sensor was not retried instead.
        assert [attempt["try_number"] for attempt in sensor["tries"]] == [1]


def test_worker_killed_mid_upload_loses_nothing_and_opens_no_second_order(
    stack: Stack, demo_root: Path
) -> None:
    """SIGKILL the only worker during an upload; a new worker finishes the run from the ledger."""
    sandbox = fresh_sandbox(stack)
    day = "2025-01-03"
    manifest = stage_generated_only(demo_root, day, studies=4, series_per_study=2, instances_per_series=4)

    with sandbox.clocks(quiet_period=RECOVERY_QUIET_PERIOD):
        run_id = trigger_slow_run(stack, sandbox, day)
        killed = stack.kill_worker(signal.SIGKILL)
        sent_before_kill = len(sandbox.state()["objects"])
        assert sent_before_kill < manifest.instances_to_deliver, "the upload finished before the kill"
        sandbox.clear_faults()
        stack.start_worker()
        run = stack.wait_for_run(DEMO_DAG_ID, run_id, timeout=RUN_TIMEOUT_SECONDS + RECOVERY_QUIET_PERIOD)

    assert not stack.processes[killed].alive()
    instances = assert_run_succeeded(stack, run_id, run)
    retried = [ti for ti in tis_of(instances, UPLOAD_TASK_ID) if len(ti["tries"]) > 1]
    assert retried, "no upload task was running on the killed worker"
    assert all(ti["tries"][0]["state"] == "failed" for ti in retried)

    state = sandbox.state()
    assert manifest.delivery_problems(state) == []
    # Only what the killed worker had sent may have been sent twice (a study is re-sent whole).
    assert (
        manifest.instances_to_deliver
        <= accepted_objects(state)
        <= (manifest.instances_to_deliver + sent_before_kill)
    )
    assert verified_in_ledger(stack, manifest) == delivered_uids(manifest)
    with Ledger(stack.ledger_url) as ledger:
        assert ledger.run_summary(DEMO_SITE_ID, run_id).abandoned_orders == 0


def test_scheduler_restarted_mid_run_still_completes_the_run(stack: Stack, demo_root: Path) -> None:
    """Restart the scheduler while a batch uploads; the new scheduler adopts the run and finishes it."""
    sandbox = fresh_sandbox(stack)
    day = "2025-01-04"
    manifest = stage_generated_only(demo_root, day, studies=4, series_per_study=2, instances_per_series=3)

    run_id = trigger_slow_run(stack, sandbox, day)
    old_scheduler = stack.processes[SCHEDULER].pid
    stack.restart_scheduler()
    assert stack.dag_run(DEMO_DAG_ID, run_id)["state"] == "running", "the run ended before the restart"
    sandbox.clear_faults()
    run = stack.wait_for_run(DEMO_DAG_ID, run_id, timeout=RUN_TIMEOUT_SECONDS)

    assert stack.processes[SCHEDULER].pid != old_scheduler
    assert_run_succeeded(stack, run_id, run)
    state = sandbox.state()
    assert manifest.delivery_problems(state) == []
    assert accepted_objects(state) == manifest.instances_to_deliver


def test_backfill_of_three_days_ingests_each_day_once(stack: Stack, demo_root: Path) -> None:
    """``airflow backfill create`` over three days: three runs, each day's studies delivered once."""
    sandbox = fresh_sandbox(stack)
    days = ["2025-02-01", "2025-02-02", "2025-02-03"]
    manifests = [
        stage_generated_only(demo_root, day, studies=3, series_per_study=1, instances_per_series=2)
        for day in days
    ]

    stack.airflow(
        "backfill", "create", "--dag-id", DEMO_DAG_ID, "--from-date", days[0], "--to-date", days[-1]
    )

    def backfill_runs_finished() -> list[dict[str, Any]] | None:
        runs = [run for run in stack.dag_runs(DEMO_DAG_ID) if run["run_type"] == "backfill"]
        done = len(runs) == len(days) and all(run["state"] in FINISHED_RUN_STATES for run in runs)
        return runs if done else None

    runs = wait_until(backfill_runs_finished, 3 * RUN_TIMEOUT_SECONDS, "the backfill's runs", interval=2)

    assert sorted(run["logical_date"][:10] for run in runs) == days
    for run in runs:
        assert_run_succeeded(stack, run["dag_run_id"], run)
    everything = SampleManifest(
        root=demo_root / "staging",
        day=days[0],
        studies=tuple(study for manifest in manifests for study in manifest.studies),
    )
    state = sandbox.state()
    assert everything.delivery_problems(state) == []
    assert accepted_objects(state) == everything.instances_to_deliver
    assert verified_in_ledger(stack, everything) == delivered_uids(everything)
