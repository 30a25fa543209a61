"""Wait until the vendor finished every order of one upload batch, and record the answers in the ledger.

The batch's studies and their order ids come from the site's ledger, where the upload task put
them; a study without an order there (held back, or failed before its metadata was accepted) is
not waited on. The vendor's verdicts go back into the ledger: a done order makes its study
``verified`` (never sent again), a failed one makes it ``failed`` with the vendor's reason (the next
run sends it again).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator, Context, PokeReturnValue
from airflow.sdk.exceptions import (
    AirflowException,
    AirflowFailException,
    AirflowSensorTimeout,
    AirflowSkipException,
)

from dicom_ingest.exceptions import DicomIngestError
from dicom_ingest.links import DicomBatchOrdersLink
from dicom_ingest.sites.config import SensorConfig
from dicom_ingest.sites.runtime import SiteRuntime
from dicom_ingest.triggers.orders import (
    DicomOrderTrigger,
    OrderOutcome,
    WaitStatus,
    order_entry,
    order_outcome,
    wait_summary,
)

if TYPE_CHECKING:
    from dicom_ingest.hooks.dicom_ingest import DicomIngestHook

ORDER_FAILED_REASON = "order_failed"
"""Reason recorded for a failed order when the vendor gave none."""
LEDGER_REASON_LENGTH = 64
"""The ledger keeps reason codes of at most this many characters."""
STUDIES_NAMED_IN_ERRORS = 20
"""Failed or unfinished studies named in an error message; the batch's page lists them all."""
DEFERRAL_TIMEOUT_GRACE = timedelta(minutes=10)
"""How long after the trigger's own deadline Airflow gives up on it (the trigger reports first)."""

OrderEntries = dict[str, dict[str, Any]]
"""Order id to ``{"study_uid", "status", "reason", "outcome"}``, as in the trigger's event."""


@dataclass(frozen=True)
class BatchOrders:
    """The orders of one batch of one run, as the ledger lists them.

    :param site_id: the site.
    :param run_id: the DAG run.
    :param batch_id: the batch.
    :param study_by_order: order id to study UID, for the studies whose metadata the vendor accepted.
    :param delivered_before: studies of the batch already verified.
    :param without_order: studies of the batch with no order to wait for.
    """

    site_id: str
    run_id: str
    batch_id: str
    study_by_order: dict[str, str]
    delivered_before: int
    without_order: int

    @property
    def order_ids(self) -> list[str]:
        """Return the order ids to wait for, in study UID order."""
        return list(self.study_by_order)


def _sensor_settings(site: Any) -> SensorConfig:
    """Return the ``sensor`` section of a site dict (defaults when the site is not a dict yet).

    :param site: ``SiteConfig.model_dump(mode="json")``, or an unresolved template or XCom reference.
    """
    section = site.get("sensor") if isinstance(site, Mapping) else None
    return SensorConfig.model_validate(section or {})


def _ledger_reason(reason: Any) -> str:
    """Return the vendor's reason code as the ledger keeps it, or :data:`ORDER_FAILED_REASON`.

    :param reason: the reason from the vendor's status answer.
    """
    text = str(reason).strip() if reason is not None else ""
    return text[:LEDGER_REASON_LENGTH] if text else ORDER_FAILED_REASON


def _event_entries(event: Any) -> tuple[WaitStatus, OrderEntries, str]:
    """Check a trigger event and return its status, order entries and message.

    :param event: the payload the trigger sent.
    :raises AirflowException: when the event is missing or not one :class:`DicomOrderTrigger` sends.
    """
    if not isinstance(event, Mapping):
        raise AirflowException("The order sensor resumed without an event from its trigger")
    try:
        status = WaitStatus(event.get("status"))
    except ValueError:
        raise AirflowException(f"The order trigger sent an unknown status: {event.get('status')!r}") from None
    orders = event.get("orders")
    outcomes = {outcome.value for outcome in OrderOutcome}
    if not isinstance(orders, Mapping) or not all(
        isinstance(entry, Mapping) and entry.get("outcome") in outcomes for entry in orders.values()
    ):
        raise AirflowException("The order trigger sent an event without a valid list of orders")
    return (
        status,
        {str(order_id): dict(entry) for order_id, entry in orders.items()},
        str(event.get("message", "")),
    )


class DicomOrderSensor(BaseSensorOperator):
    """Wait until every order of an upload batch is done or failed at the vendor.

    In deferrable mode (the default) the sensor checks the orders once from the worker and, if
    some are still running, hands the wait to :class:`~dicom_ingest.triggers.orders.DicomOrderTrigger`
    in the triggerer, so no worker slot is held while the vendor processes the studies. Otherwise
    it checks every ``poke_interval`` seconds from the worker. Airflow's
    ``[operators] default_deferrable`` is deliberately not consulted: it is ``false`` in stock
    Airflow (and in every generated ``airflow.cfg``), and the vendor takes minutes to hours.

    The task fails, after recording every finished order in the ledger, when an order failed
    (no retry: a retry cannot change the vendor's verdict; the next run re-sends the study) or
    when orders are still running after ``timeout`` seconds; the message names the studies with
    the vendor's status words and reasons. It returns ``{"batch_id", "delivered", "failed"}``.

    :param site: the site's configuration, ``SiteConfig.model_dump(mode="json")`` (templated).
    :param batch_id: the batch whose orders to wait for (templated).
    :param dicom_ingest_conn_id: the vendor connection; defaults to the site's ``conn_id``.
    :param deferrable: wait in the triggerer rather than on a worker.
    :param poke_interval: seconds between checks; defaults to the site's ``sensor.poke_interval``.
    :param timeout: seconds before unfinished orders fail the task; defaults to the site's
        ``sensor.timeout``.
    :param kwargs: passed to :class:`~airflow.sdk.BaseSensorOperator`.
    """

    template_fields: Sequence[str] = ("site", "batch_id")
    operator_extra_links = (DicomBatchOrdersLink(),)
    ui_color = "#d6eaf8"

    def __init__(
        self,
        *,
        site: dict[str, Any],
        batch_id: str,
        dicom_ingest_conn_id: str | None = None,
        deferrable: bool = True,
        poke_interval: timedelta | float | None = None,
        timeout: timedelta | float | None = None,
        **kwargs: Any,
    ) -> None:
        settings = _sensor_settings(site)
        super().__init__(
            poke_interval=settings.poke_interval if poke_interval is None else poke_interval,
            timeout=settings.timeout if timeout is None else timeout,
            **kwargs,
        )
        if self.poke_interval <= 0:
            raise ValueError("poke_interval must be a positive number of seconds")
        self.site = site
        self.batch_id = batch_id
        self.dicom_ingest_conn_id = dicom_ingest_conn_id
        self.deferrable = deferrable
        self._orders: BatchOrders | None = None
        self._deadline: float | None = None

    @cached_property
    def runtime(self) -> SiteRuntime:
        """The site's runtime view (its ledger opens on first use)."""
        return SiteRuntime.from_dict(self.site)

    @cached_property
    def hook(self) -> DicomIngestHook:
        """The vendor hook on the given connection, or the site's."""
        from dicom_ingest.hooks.dicom_ingest import DicomIngestHook

        return DicomIngestHook(self.dicom_ingest_conn_id or self.runtime.config.conn_id)

    def _close(self) -> None:
        """Release the hook's connections and the ledger's."""
        if "hook" in self.__dict__:
            self.hook.close()
        if "runtime" in self.__dict__:
            self.runtime.close()

    # -- reading the batch and the vendor -----------------------------------------------------------

    def _batch_orders(self, context: Context) -> BatchOrders:
        """Read the batch's studies and orders from the ledger.

        :param context: the task's context (for the run id).
        """
        from dicom_ingest.ledger import StudyState

        site_id, run_id = self.runtime.site_id, context["run_id"]
        studies = self.runtime.ledger.studies_in_batch(site_id, run_id, self.batch_id)
        study_by_order = {
            study.order_id: study.study_uid
            for study in studies
            if study.state == StudyState.METADATA_SENT and study.order_id
        }
        delivered_before = sum(study.state == StudyState.VERIFIED for study in studies)
        orders = BatchOrders(
            site_id=site_id,
            run_id=run_id,
            batch_id=self.batch_id,
            study_by_order=study_by_order,
            delivered_before=delivered_before,
            without_order=len(studies) - len(study_by_order) - delivered_before,
        )
        self.log.info(
            "Batch %s: %d studies; %d orders to wait for, %d studies delivered before, %d without an order",
            self.batch_id,
            len(studies),
            len(study_by_order),
            delivered_before,
            orders.without_order,
        )
        return orders

    def _check_orders(self, orders: BatchOrders) -> OrderEntries:
        """Read every order's status once from the worker, a few at a time.

        A transient failure (after the hook's own retries) is logged and leaves every order
        pending; any other failure is raised.

        :param orders: the batch's orders.
        """
        config, order_ids = self.hook.config, orders.order_ids
        if not order_ids:
            return {}
        try:
            with ThreadPoolExecutor(min(len(order_ids), config.upload_concurrency)) as pool:
                answers = pool.map(lambda order_id: self.hook.get_status(order_id=order_id), order_ids)
                statuses = dict(zip(order_ids, answers, strict=True))
        except DicomIngestError as exc:
            if not exc.retryable:
                raise
            self.log.warning("Batch %s: checking its orders failed transiently: %s", self.batch_id, exc)
            statuses = {}
        return {
            order_id: order_entry(
                statuses.get(order_id),
                order_outcome(statuses.get(order_id), config.done_statuses, config.failed_statuses),
            )
            for order_id in order_ids
        }

    @staticmethod
    def _outcomes(entries: OrderEntries) -> dict[str, OrderOutcome]:
        """Return each order's outcome.

        :param entries: the orders as the trigger or a check described them.
        """
        return {order_id: OrderOutcome(entry["outcome"]) for order_id, entry in entries.items()}

    # -- the three ways of waiting --------------------------------------------------------------------

    def execute(self, context: Context) -> dict[str, Any]:
        """Wait for the batch's orders: at once when none is running, else in the triggerer or by poking.

        :param context: the task's context.
        """
        try:
            self._orders = self._batch_orders(context)
            self._deadline = time.time() + self.timeout
            if not self._orders.study_by_order:
                return self._finish(self._orders, {}, WaitStatus.SUCCESS, "no order to wait for")
            if not self.deferrable:
                return super().execute(context)
            entries = self._check_orders(self._orders)
            finished, message = wait_summary(self._outcomes(entries))
            if finished is not None:
                return self._finish_after_first_check(self._orders, entries, finished, message)
            self.log.info("Batch %s: %s; deferring to the triggerer", self.batch_id, message)
            config = self.hook.config
            self.defer(
                trigger=DicomOrderTrigger(
                    conn_id=config.conn_id,
                    order_ids=self._orders.order_ids,
                    poll_interval=self.poke_interval,
                    deadline=self._deadline,
                    done_statuses=sorted(config.done_statuses),
                    failed_statuses=sorted(config.failed_statuses),
                ),
                method_name="execute_complete",
                timeout=timedelta(seconds=max(self._deadline - time.time(), 0)) + DEFERRAL_TIMEOUT_GRACE,
            )
        finally:
            self._close()

    def _finish_after_first_check(
        self, orders: BatchOrders, entries: OrderEntries, status: WaitStatus, message: str
    ) -> dict[str, Any]:
        """Finish when the first check found every order finished, honouring ``soft_fail`` / ``never_fail``.

        The poke loop and the resumption from the trigger apply those settings themselves.

        :param orders: the batch's orders.
        :param entries: the orders' statuses.
        :param status: how the wait ended.
        :param message: the wait's summary.
        """
        try:
            return self._finish(orders, entries, status, message)
        except AirflowException as exc:
            if self.soft_fail or self.never_fail:
                raise AirflowSkipException(f"Skipping (soft_fail or never_fail is set): {exc}") from exc
            raise

    def poke(self, context: Context) -> PokeReturnValue:
        """Check the orders once; finish when none is running, fail when the timeout passed.

        :param context: the task's context.
        """
        if self._orders is None:
            self._orders = self._batch_orders(context)
        if self._deadline is None:
            self._deadline = time.time() + self.timeout
        entries = self._check_orders(self._orders)
        finished, message = wait_summary(self._outcomes(entries))
        if finished is not None:
            return PokeReturnValue(True, self._finish(self._orders, entries, finished, message))
        if time.time() >= self._deadline:
            self._finish(self._orders, entries, WaitStatus.TIMEOUT, message)
        self.log.info("Batch %s: %s", self.batch_id, message)
        return PokeReturnValue(False)

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume after the trigger: record its verdicts and succeed, or fail naming the studies.

        :param context: the task's context.
        :param event: the trigger's event payload.
        :raises AirflowException: for a missing or unknown event, or an ``error`` event.
        """
        status, entries, message = _event_entries(event)
        try:
            return self._finish(self._batch_orders(context), entries, status, message)
        finally:
            self._close()

    # -- recording and reporting ----------------------------------------------------------------------

    def _record(self, orders: BatchOrders, entries: OrderEntries) -> tuple[int, int]:
        """Write every finished order's verdict to the ledger; return (delivered, failed) counts.

        Orders the batch no longer waits for (unknown, or whose study moved on) are left alone.

        :param orders: the batch's orders as the ledger lists them now.
        :param entries: the orders' latest statuses.
        """
        ledger, delivered, failed = self.runtime.ledger, 0, 0
        for order_id, entry in entries.items():
            study_uid = orders.study_by_order.get(order_id)
            outcome = OrderOutcome(entry["outcome"])
            if outcome is OrderOutcome.PENDING:
                continue
            if study_uid is None:
                self.log.info(
                    "Batch %s: order %s is not awaited any more; not recorded", self.batch_id, order_id
                )
                continue
            if outcome is OrderOutcome.DONE:
                ledger.mark_verified(orders.site_id, study_uid, order_id, str(entry["status"]))
                delivered += 1
            else:
                reason = _ledger_reason(entry.get("reason"))
                ledger.mark_study_failed(orders.site_id, study_uid, reason, order_id)
                failed += 1
        return delivered, failed

    def _finish(
        self, orders: BatchOrders, entries: OrderEntries, status: WaitStatus, message: str
    ) -> dict[str, Any]:
        """Record the verdicts, then return the batch's result on success or raise naming the studies.

        :param orders: the batch's orders.
        :param entries: the orders' latest statuses.
        :param status: how the wait ended.
        :param message: the wait's summary.
        :raises AirflowFailException: when an order failed.
        :raises AirflowSensorTimeout: when orders were still running at the deadline.
        :raises AirflowException: when the orders could not be checked.
        """
        delivered, failed = self._record(orders, entries)
        result = {
            "batch_id": orders.batch_id,
            "delivered": orders.delivered_before + delivered,
            "failed": failed,
        }
        if status is WaitStatus.SUCCESS:
            self.log.info("Batch %s: %s; %d studies delivered", orders.batch_id, message, result["delivered"])
            return result
        if status is WaitStatus.ERROR:
            raise AirflowException(f"Batch {orders.batch_id}: the order check failed: {message}")
        outcomes = list(self._outcomes(entries).values())
        problems = self._describe(orders, entries, OrderOutcome.FAILED)
        if status is WaitStatus.FAILED:
            raise AirflowFailException(
                f"Batch {orders.batch_id}: {outcomes.count(OrderOutcome.FAILED)} of {len(outcomes)} orders "
                f"failed at the vendor: {problems}"
            )
        unfinished = self._describe(orders, entries, OrderOutcome.PENDING)
        raise AirflowSensorTimeout(
            f"Batch {orders.batch_id}: {outcomes.count(OrderOutcome.PENDING)} of {len(outcomes)} orders "
            f"still running after {self.timeout:g} s: {unfinished}"
            + (f"; failed: {problems}" if OrderOutcome.FAILED in outcomes else "")
        )

    @staticmethod
    def _describe(orders: BatchOrders, entries: OrderEntries, outcome: OrderOutcome) -> str:
        """Name the studies whose order has ``outcome``, with status word and reason (a bounded list).

        :param orders: the batch's orders.
        :param entries: the orders' latest statuses.
        :param outcome: which orders to name.
        """
        lines = []
        for order_id, entry in entries.items():
            if entry["outcome"] != outcome.value:
                continue
            study_uid = orders.study_by_order.get(order_id) or entry.get("study_uid") or "unknown study"
            status = entry.get("status") or "status not read yet"
            detail = (
                f"{status}: {entry.get('reason') or 'no reason given'}"
                if outcome is OrderOutcome.FAILED
                else status
            )
            lines.append(f"study {study_uid} (order {order_id}) {detail}")
        shown = "; ".join(lines[:STUDIES_NAMED_IN_ERRORS])
        hidden = len(lines) - STUDIES_NAMED_IN_ERRORS
        return shown + (f"; and {hidden} more (see the batch's orders page)" if hidden > 0 else "")
