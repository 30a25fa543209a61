"""Wait in Airflow's triggerer until every vendor order of a batch is finished.

:class:`DicomOrderTrigger` polls ``GET /status`` for the orders still running, sleeps with
``asyncio.sleep`` between polls, and yields exactly one event, whose payload is
JSON made of order ids, study UIDs, the vendor's status words and reason codes (never a token,
a URL or a tag value)::

    {"status": "success" | "failed" | "timeout" | "error",
     "orders": {order_id: {"study_uid": str | None, "status": str | None, "reason": str | None,
                           "outcome": "done" | "failed" | "pending"}},
     "message": str}

It writes nothing anywhere: the triggerer may run the same trigger more than once.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowNotFoundException
from airflow.triggers.base import BaseTrigger, TriggerEvent

from dicom_ingest.exceptions import DicomIngestError

if TYPE_CHECKING:
    from dicom_ingest.hooks.dicom_ingest import DicomIngestAsyncHook
    from dicom_ingest.hooks.models import OrderStatus


class WaitStatus(enum.StrEnum):
    """How the wait for a batch's orders ended (the event's ``status``)."""

    SUCCESS = "success"
    """Every order is done."""
    FAILED = "failed"
    """Every order is finished and at least one failed."""
    TIMEOUT = "timeout"
    """The deadline passed while some orders were still running."""
    ERROR = "error"
    """The orders cannot be checked: the connection, the credentials or the API refused."""


class OrderOutcome(enum.StrEnum):
    """Where one order stands, by the connection's status words."""

    DONE = "done"
    FAILED = "failed"
    PENDING = "pending"


def status_words(words: Iterable[str] | None) -> frozenset[str] | None:
    """Return status words upper-cased for comparison, or ``None`` when not given.

    :param words: status words such as ``["DELIVERED"]``.
    """
    return None if words is None else frozenset(word.strip().upper() for word in words)


def order_outcome(
    status: OrderStatus | None,
    done_words: frozenset[str] | None = None,
    failed_words: frozenset[str] | None = None,
) -> OrderOutcome:
    """Classify an order's status; without words, use the connection's (``is_done`` / ``is_failed``).

    :param status: the order's latest status, ``None`` when it was never read.
    :param done_words: upper-case status words meaning done.
    :param failed_words: upper-case status words meaning failed.
    """
    if status is None:
        return OrderOutcome.PENDING
    word = status.status.upper()
    done = status.is_done if done_words is None else word in done_words
    failed = status.is_failed if failed_words is None else word in failed_words
    if done:
        return OrderOutcome.DONE
    if failed:
        return OrderOutcome.FAILED
    return OrderOutcome.PENDING


def order_entry(status: OrderStatus | None, outcome: OrderOutcome) -> dict[str, str | None]:
    """Describe one order for an event: study UID, status word, reason code and outcome.

    :param status: the order's latest status, ``None`` when it was never read.
    :param outcome: the order's classification.
    """
    return {
        "study_uid": status.study_uid if status else None,
        "status": status.status if status else None,
        "reason": status.reason if status else None,
        "outcome": outcome.value,
    }


def wait_summary(outcomes: Mapping[str, OrderOutcome]) -> tuple[WaitStatus | None, str]:
    """Decide how a wait ends given every order's outcome; ``None`` while some are pending.

    :param outcomes: order id to outcome, for every order of the batch.
    """
    total = len(outcomes)
    failed = sum(outcome is OrderOutcome.FAILED for outcome in outcomes.values())
    pending = sum(outcome is OrderOutcome.PENDING for outcome in outcomes.values())
    if pending:
        message = f"{pending} of {total} orders not finished"
        return None, message + (f", {failed} failed" if failed else "")
    if failed:
        return WaitStatus.FAILED, f"{failed} of {total} orders failed"
    return WaitStatus.SUCCESS, f"{total} of {total} orders done"


class DicomOrderTrigger(BaseTrigger):
    """Poll the vendor until every order of a batch is done or failed, the deadline passes, or it refuses.

    Only the orders still running are polled, at most ``upload_concurrency`` (of the connection)
    at once. A transient failure of a poll (connection error, timeout, 429, 5xx, after the hook's
    own retries) is logged and the orders are polled again at the next interval; an error that
    a new poll cannot fix (missing or invalid connection, refused credentials, unknown order,
    malformed answer) ends the wait with an ``error`` event.

    :param conn_id: the ``dicom_ingest`` connection.
    :param order_ids: the vendor's order ids to wait for.
    :param poll_interval: seconds between two polls.
    :param deadline: when to give up, in seconds since the epoch; ``None`` waits without end.
    :param done_statuses: status words meaning done; ``None`` for the connection's.
    :param failed_statuses: status words meaning failed; ``None`` for the connection's.
    """

    def __init__(
        self,
        conn_id: str,
        order_ids: list[str],
        poll_interval: float,
        deadline: float | None = None,
        done_statuses: list[str] | None = None,
        failed_statuses: list[str] | None = None,
    ) -> None:
        super().__init__()
        if poll_interval <= 0:
            raise ValueError("poll_interval must be a positive number of seconds")
        self.conn_id = conn_id
        self.order_ids = list(order_ids)
        self.poll_interval = poll_interval
        self.deadline = deadline
        self.done_statuses = None if done_statuses is None else list(done_statuses)
        self.failed_statuses = None if failed_statuses is None else list(failed_statuses)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Return the classpath and the keyword arguments that rebuild this trigger."""
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "conn_id": self.conn_id,
                "order_ids": self.order_ids,
                "poll_interval": self.poll_interval,
                "deadline": self.deadline,
                "done_statuses": self.done_statuses,
                "failed_statuses": self.failed_statuses,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Poll until the wait ends, then yield its one event."""
        from dicom_ingest.hooks.dicom_ingest import DicomIngestAsyncHook

        async with DicomIngestAsyncHook(self.conn_id) as hook:
            payload = await self._wait(hook)
        yield TriggerEvent(payload)

    def _outcome(self, status: OrderStatus | None) -> OrderOutcome:
        """Classify an order's status with this trigger's status words.

        :param status: the order's latest status, if read.
        """
        return order_outcome(status, status_words(self.done_statuses), status_words(self.failed_statuses))

    def _payload(self, status: WaitStatus, latest: Mapping[str, OrderStatus], message: str) -> dict[str, Any]:
        """Build the event payload from the latest status of every order.

        :param status: how the wait ended.
        :param latest: the latest status read per order id.
        :param message: a summary free of secrets and tag values.
        """
        orders = {
            order_id: order_entry(latest.get(order_id), self._outcome(latest.get(order_id)))
            for order_id in self.order_ids
        }
        return {"status": status.value, "orders": orders, "message": message}

    def _seconds_left(self) -> float | None:
        """Return the seconds until the deadline (negative once passed), ``None`` without one."""
        return None if self.deadline is None else self.deadline - time.time()

    async def _wait(self, hook: DicomIngestAsyncHook) -> dict[str, Any]:
        """Poll the orders still running until none is, the deadline passes, or the API refuses.

        :param hook: the open async hook.
        """
        latest: dict[str, OrderStatus] = {}
        poll = 0
        while True:
            poll += 1
            pending = [
                order_id
                for order_id in self.order_ids
                if self._outcome(latest.get(order_id)) is OrderOutcome.PENDING
            ]
            try:
                latest.update(await hook.get_statuses(pending))
            except AirflowNotFoundException:
                return self._payload(
                    WaitStatus.ERROR, latest, f"The connection {self.conn_id!r} does not exist"
                )
            except DicomIngestError as exc:
                if not exc.retryable:
                    return self._payload(WaitStatus.ERROR, latest, f"Cannot check the orders: {exc}")
                self.log.warning(
                    "Poll %d: checking %d orders failed transiently (%s); polling again in %.1f s",
                    poll,
                    len(pending),
                    exc,
                    self.poll_interval,
                )
            outcomes = {order_id: self._outcome(latest.get(order_id)) for order_id in self.order_ids}
            finished, message = wait_summary(outcomes)
            if finished is not None:
                self.log.info("Poll %d: %s", poll, message)
                return self._payload(finished, latest, message)
            seconds_left = self._seconds_left()
            if seconds_left is not None and seconds_left <= 0:
                self.log.info("Poll %d: the deadline passed; %s", poll, message)
                return self._payload(WaitStatus.TIMEOUT, latest, f"Deadline passed: {message}")
            self.log.info("Poll %d: %s; next poll in %.1f s", poll, message, self.poll_interval)
            await asyncio.sleep(
                self.poll_interval if seconds_left is None else min(self.poll_interval, seconds_left)
            )
