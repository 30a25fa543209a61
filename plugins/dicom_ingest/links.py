"""The "Batch orders" extra link of the upload and order-sensor tasks.

How Airflow 3.3 serves an operator's extra link: when a task instance finishes a try (or
defers), the task runner calls :meth:`DicomBatchOrdersLink.get_link` on the worker with the
rendered operator and the running task instance as ``ti_key``, and stores the answer as the XCom
``_link_DicomBatchOrdersLink`` of that task instance, map index included. The API server never
imports this class: it rebuilds every operator link from the serialized DAG as an
``XComOperatorLink`` (the link's name and XCom key) and reads that XCom. So a mapped task's link
points at its own batch, and the link works without this package on the API server.

The link opens the plugin's page ``/dicom-ingest/runs/<dag_id>/<run_id>/batches/<batch_id>``.
The batch id is the operator's (rendered) ``batch_id`` attribute when it has one, as the order
sensor does; an operator without one records it with :meth:`DicomBatchOrdersLink.persist` while
it runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote, urlsplit

from airflow.sdk import BaseOperatorLink, conf
from airflow.sdk.execution_time.xcom import XCom

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator, Context
    from airflow.sdk.types import TaskInstanceKey

WEB_URL_PREFIX = "/dicom-ingest"
"""Where the plugin's web app is mounted in Airflow's API server."""


def api_root_path() -> str:
    """Return the path the API server is served under (``[api] base_url``'s path), ending with ``/``."""
    path = urlsplit(conf.get("api", "base_url", fallback="") or "/").path or "/"
    return path if path.endswith("/") else f"{path}/"


def batch_orders_path(dag_id: str, run_id: str, batch_id: str) -> str:
    """Return the path of a batch's orders page, each part quoted as one path segment.

    :param dag_id: the site's DAG id.
    :param run_id: the DAG run id (``:`` and ``+`` are quoted).
    :param batch_id: the batch id.
    """
    dag, run, batch = (quote(part, safe="") for part in (dag_id, run_id, batch_id))
    return f"{api_root_path()}{WEB_URL_PREFIX.lstrip('/')}/runs/{dag}/{run}/batches/{batch}"


class DicomBatchOrdersLink(BaseOperatorLink):
    """Open the plugin's page listing a batch's studies, their orders and the vendor's answers."""

    name: ClassVar[str] = "Batch orders"
    key: ClassVar[str] = "dicom_ingest_batch"
    """XCom key under which :meth:`persist` records the batch id."""

    @classmethod
    def persist(cls, context: Context, *, batch_id: str) -> None:
        """Record the batch a running task works on, for its link.

        Call it from ``execute`` of an operator that declares this link.

        :param context: the task's context.
        :param batch_id: the batch id.
        """
        context["ti"].xcom_push(key=cls.key, value={"batch_id": batch_id})

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        """Return the page of the task instance's batch, or ``""`` when the batch is unknown.

        :param operator: the rendered operator.
        :param ti_key: the task instance the link is for.
        """
        batch_id = getattr(operator, "batch_id", None)
        if not isinstance(batch_id, str):
            batch_id = _persisted_batch_id(XCom.get_value(key=self.key, ti_key=ti_key))
        if not batch_id:
            return ""
        return batch_orders_path(ti_key.dag_id, ti_key.run_id, batch_id)


def _persisted_batch_id(value: Any) -> str | None:
    """Return the batch id from the value :meth:`DicomBatchOrdersLink.persist` stored, if any.

    :param value: the XCom value, or ``None``.
    """
    if isinstance(value, dict) and isinstance(value.get("batch_id"), str):
        return value["batch_id"]
    return None
