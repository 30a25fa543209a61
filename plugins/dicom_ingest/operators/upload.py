"""Upload one batch of a run's plan: :class:`DicomUploadBatchOperator`, the mapped upload task.

The operator is thin: it rebuilds the site, opens the plan, the ledger and the hook, and hands
the batch to :class:`~dicom_ingest.upload.BatchUploader`. The hook, the staging code and the
ledger are imported when the task runs, never when a DAG file is parsed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from dicom_ingest.exceptions import DicomIngestConfigError, DicomIngestError
from dicom_ingest.links import DicomBatchOrdersLink
from dicom_ingest.sites.runtime import SiteRuntime

if TYPE_CHECKING:
    from airflow.sdk import Context

log = logging.getLogger(__name__)

BATCH_LABEL_KEY = "batch_label"
"""Context key the DAG's ``map_index_template="{{ batch_label }}"`` renders."""


@dataclass(frozen=True)
class BatchRef:
    """One batch as the plan task hands it to the mapped upload tasks.

    :param batch_id: the batch's id in the plan.
    :param index: its position in the plan (from 1).
    :param studies: studies in the batch.
    :param instances: instances in the batch.
    """

    batch_id: str
    index: int
    studies: int
    instances: int

    @classmethod
    def from_value(cls, value: Mapping[str, Any]) -> BatchRef:
        """Read a batch dict of the plan's XCom (``batch_id``, ``index``, ``studies``, ``instances``).

        :param value: the batch as rendered into the operator.
        :raises DicomIngestConfigError: the value is not such a dict.
        """
        if not isinstance(value, Mapping):
            raise DicomIngestConfigError(
                f"batch must be a dict of the plan's batches, not {type(value).__name__}"
            )
        try:
            return cls(
                batch_id=str(value["batch_id"]),
                index=int(value["index"]),
                studies=int(value["studies"]),
                instances=int(value["instances"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DicomIngestConfigError(
                "batch must carry batch_id, index, studies and instances as the plan task returns them"
            ) from exc

    @property
    def label(self) -> str:
        """The mapped task's label in the UI, e.g. ``batch 3: 12 studies, 4,211 instances``."""
        return f"batch {self.index}: {self.studies} studies, {self.instances:,} instances"


def claim_owner(site_id: str, run_id: str, batch_id: str) -> str:
    """Name the claimant of a batch's studies: the same for every try of the same batch.

    A retried (or re-run after a lost worker) upload task then takes its studies back at once
    instead of waiting for the claims' lease to run out.

    :param site_id: the site.
    :param run_id: the Airflow run.
    :param batch_id: the batch.
    """
    return f"{site_id}/{run_id}/{batch_id}"


class DicomUploadBatchOperator(BaseOperator):
    """Upload the studies of one planned batch and attach each study's metadata right after it.

    Studies the ledger says are done or held back are left alone; a study interrupted earlier is
    re-sent whole. Up to the site's ``upload_concurrency`` instances (at most the connection's
    cap) are sent at once. When any study failed, the task fails after the others are done,
    naming the failed studies and reasons; its retry resumes from the ledger.

    The XCom value is small: the batch's id and index with counts, bytes and seconds. The
    batch's order ids are in the ledger; the "Batch orders" link opens them.

    :param site: the site's configuration, ``SiteConfig.model_dump(mode="json")`` (templated).
    :param work_uri: the run's work location holding the plan (templated).
    :param batch: one batch of the plan task's ``batches`` (templated).
    :param dicom_ingest_conn_id: the vendor connection; the site's ``conn_id`` by default.
    """

    template_fields: Sequence[str] = ("site", "work_uri", "batch")
    operator_extra_links = (DicomBatchOrdersLink(),)
    ui_color = "#e6f4ea"

    def __init__(
        self,
        *,
        site: dict[str, Any],
        work_uri: str,
        batch: dict[str, Any],
        dicom_ingest_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.site = site
        self.work_uri = work_uri
        self.batch = batch
        self.dicom_ingest_conn_id = dicom_ingest_conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        """Upload the batch; return its counts.

        :param context: the task's context.
        :raises DicomIngestError: one or more studies failed (named with their reasons).
        """
        from dicom_ingest.hooks.dicom_ingest import DicomIngestHook
        from dicom_ingest.staging import Plan
        from dicom_ingest.upload import BatchUploader

        batch = BatchRef.from_value(self.batch)
        context[BATCH_LABEL_KEY] = batch.label  # type: ignore[literal-required]
        DicomBatchOrdersLink.persist(context, batch_id=batch.batch_id)
        runtime = SiteRuntime.from_dict(self.site)
        run_id = context["run_id"]
        plan = Plan.load(self.work_uri)
        hook = DicomIngestHook(dicom_ingest_conn_id=self.dicom_ingest_conn_id or runtime.config.conn_id)
        try:
            concurrency = min(runtime.config.upload_concurrency, hook.config.upload_concurrency)
            uploader = BatchUploader(
                hook,
                runtime.ledger,
                plan.source(),
                runtime.site_id,
                run_id,
                batch.batch_id,
                concurrency,
                batch_index=batch.index,
                claim_owner=claim_owner(runtime.site_id, run_id, batch.batch_id),
            )
            result = uploader.run(plan.iter_batch(batch.batch_id))
        finally:
            hook.close()
            runtime.close()
        if result.failed:
            raise DicomIngestError(
                f"Batch {batch.batch_id}: {result.failed} of {result.studies} studies failed: "
                f"{result.failure_summary()}. A retry re-sends them whole."
            )
        return result.to_xcom()
