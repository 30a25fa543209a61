"""The order sensor inside a real DAG run: mapped over batches, deferred, resumed, with its extra link.

``dag.test()`` runs the tasks and the trigger in this process against the session's sandbox and
an Airflow metadata database on SQLite, then the links are read back the way the API server
reads them (from the serialized DAG and the XComs the worker wrote).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from dicom_ingest.ledger import Ledger, StudyState
from dicom_ingest.links import DicomBatchOrdersLink, batch_orders_path
from dicom_ingest.sensors.orders import DicomOrderSensor
from dicom_ingest_sandbox.testing import Sandbox, new_uid
from tests.sensors.support import SITE_ID, record_held, record_sent, send_study

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]

DAG_ID = "dicom_ingest__orders_sensor_check"
BATCHES = ["batch-0000", "batch-0001"]
STUDIES_WITH_ORDERS = 2
QUIET_SECONDS = 4
"""Long enough that the sensor's first check always finds the orders still uploading."""


@pytest.fixture(scope="module")
def airflow_db() -> None:
    """Create the Airflow metadata tables (kept if they exist already)."""
    from airflow.utils.db import initdb

    initdb()


def build_dag(site: dict[str, Any], ledger_path: Path, sandbox: Sandbox):
    """Build a DAG shaped like a site's: stage batches, a mapped upload stand-in, the mapped sensor.

    One batch has studies with orders, the other only a held study. The upload stand-in records
    its batch for the link the way the upload operator does (:meth:`DicomBatchOrdersLink.persist`)
    and hands the batch id on; the sensor's link uses its own ``batch_id``.
    """
    from airflow.sdk import DAG, BaseOperator, get_current_context, task

    class RecordBatchOperator(BaseOperator):
        template_fields = ("batch",)
        operator_extra_links = (DicomBatchOrdersLink(),)

        def __init__(self, *, batch: dict[str, Any], **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.batch = batch

        def execute(self, context: Any) -> str:
            DicomBatchOrdersLink.persist(context, batch_id=self.batch["batch_id"])
            return self.batch["batch_id"]

    @task
    def stage_batches() -> list[dict[str, str]]:
        run_id = get_current_context()["run_id"]
        with Ledger.for_location(ledger_path) as ledger:
            for _ in range(STUDIES_WITH_ORDERS):
                record_sent(ledger, send_study(sandbox), run_id=run_id, batch_id=BATCHES[0])
            record_held(ledger, new_uid(), run_id=run_id, batch_id=BATCHES[1])
        return [{"batch_id": batch_id} for batch_id in BATCHES]

    with DAG(DAG_ID, schedule=None, start_date=datetime(2026, 1, 1, tzinfo=UTC), catchup=False) as dag:
        upload = RecordBatchOperator.partial(task_id="upload").expand(batch=stage_batches())
        DicomOrderSensor.partial(task_id="wait_for_orders", site=site).expand(batch_id=upload.output)
    return dag


def register(dag) -> None:
    """Store the DAG as the DAG processor would, so that ``dag.test()`` can create a run of it."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    DagBundlesManager().sync_bundles_to_db()
    bag = DagBag(collect_dags=False)
    bag.bag_dag(dag)
    sync_bag_to_db(bag, "dags-folder", None)


def sensor_results(run_id: str) -> dict[int, Any]:
    """Return the sensor's return value per map index."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.execute(
            select(XComModel.map_index, XComModel.value).where(
                XComModel.dag_id == DAG_ID,
                XComModel.run_id == run_id,
                XComModel.task_id == "wait_for_orders",
                XComModel.key == "return_value",
            )
        ).all()
    return {row.map_index: XComModel.deserialize_value(row) for row in rows}


def links_as_the_api_server_sees_them(run_id: str, task_id: str) -> dict[int, str | None]:
    """Evaluate each mapped instance's "Batch orders" link through the serialized DAG, as the API does."""
    from airflow.models.serialized_dag import SerializedDagModel
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        task = SerializedDagModel.get_dag(DAG_ID, session=session).get_task(task_id)
        instances = session.scalars(
            select(TaskInstance).where(
                TaskInstance.dag_id == DAG_ID,
                TaskInstance.run_id == run_id,
                TaskInstance.task_id == task_id,
            )
        ).all()
        return {ti.map_index: task.get_extra_links(ti, DicomBatchOrdersLink.name) for ti in instances}


def deferrals(run_id: str) -> dict[int, tuple[str, dict[str, Any]] | None]:
    """Return, per sensor instance, the trigger it deferred to (classpath, arguments), if any."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.trigger import Trigger
    from airflow.utils.session import create_session

    with create_session() as session:
        instances = session.scalars(
            select(TaskInstance).where(
                TaskInstance.dag_id == DAG_ID,
                TaskInstance.run_id == run_id,
                TaskInstance.task_id == "wait_for_orders",
            )
        ).all()
        triggers = {
            ti.map_index: session.get(Trigger, ti.trigger_id) if ti.trigger_id else None for ti in instances
        }
        return {
            index: (trigger.classpath, trigger.kwargs) if trigger else None
            for index, trigger in triggers.items()
        }


def test_mapped_sensors_defer_resume_record_and_link_their_batches(
    airflow_db, vendor, ledger_path, site, monkeypatch
):
    from airflow.utils.state import DagRunState

    vendor.configure(quiet_period=QUIET_SECONDS)
    dag = build_dag(site, ledger_path, vendor)
    register(dag)

    run = dag.test()

    assert run.state == DagRunState.SUCCESS
    assert sensor_results(run.run_id) == {
        0: {"batch_id": BATCHES[0], "delivered": STUDIES_WITH_ORDERS, "failed": 0},
        1: {"batch_id": BATCHES[1], "delivered": 0, "failed": 0},
    }
    with Ledger.for_location(ledger_path) as ledger:
        waited = ledger.studies_in_batch(SITE_ID, run.run_id, BATCHES[0])
        held = ledger.studies_in_batch(SITE_ID, run.run_id, BATCHES[1])
    deferred = deferrals(run.run_id)
    assert deferred[1] is None, "a batch without orders finishes without deferring"
    classpath, trigger_kwargs = deferred[0]
    assert classpath == "dicom_ingest.triggers.orders.DicomOrderTrigger"
    assert trigger_kwargs["order_ids"] == [study.order_id for study in waited]
    assert vendor.state()["calls"]["status"] > STUDIES_WITH_ORDERS, "the trigger polls after the first check"
    assert [(study.state, study.order_status) for study in waited] == [(StudyState.VERIFIED, "DELIVERED")] * 2
    assert [study.state for study in held] == [StudyState.HELD]
    batch_pages = {
        index: batch_orders_path(DAG_ID, run.run_id, batch_id) for index, batch_id in enumerate(BATCHES)
    }
    assert links_as_the_api_server_sees_them(run.run_id, "upload") == batch_pages
    assert links_as_the_api_server_sees_them(run.run_id, "wait_for_orders") == batch_pages
