"""Orders: how received instances are grouped, when metadata is complete, and the status clocks.

Rules (each on a clock from :class:`~dicom_ingest_sandbox.config.Clocks`):

- A study's first instance opens an order. A later instance of the study joins the study's most
  recent order if that order is still ``UPLOADING`` and received an instance less than
  ``overwrite_window`` seconds ago; the same SOPInstanceUID replaces the earlier copy. Otherwise
  the instance opens a new order.
- Metadata comes from DICOM tags and from PATCH; a patched field wins over the same field from tags.
- An ``UPLOADING`` order still missing required metadata ``metadata_deadline`` seconds after it
  opened becomes ``FAILED`` (``metadata_timeout``). One with complete metadata and no new instance
  for ``quiet_period`` seconds becomes ``DX_STARTED``, then ``DELIVERED`` after ``processing_time``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from dicom_ingest_sandbox.audit import AuditLog
from dicom_ingest_sandbox.clock import monotonic, utc_iso
from dicom_ingest_sandbox.config import Clocks
from dicom_ingest_sandbox.ingest import ReceivedObject

logger = logging.getLogger(__name__)

REASON_METADATA_TIMEOUT = "metadata_timeout"


class OrderStatus(StrEnum):
    """The vendor's status words."""

    UPLOADING = "UPLOADING"
    DX_STARTED = "DX_STARTED"
    DELIVERED = "DELIVERED"
    FAILED = "FAILED"


@dataclass
class Instance:
    """One SOP instance filed under an order."""

    sop_instance_uid: str
    key: str
    size: int
    md5: str


@dataclass
class Order:
    """One order: a study's instances received together, its metadata and its status."""

    order_id: str
    study_uid: str
    opened_at: float
    created_at: float
    status: OrderStatus = OrderStatus.UPLOADING
    reason: str | None = None
    status_since: float = 0.0
    last_instance_at: float = 0.0
    updated_at: float = 0.0
    instances: dict[str, Instance] = field(default_factory=dict)
    tag_metadata: dict[str, Any] = field(default_factory=dict)
    patched_metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def metadata(self) -> dict[str, Any]:
        """Return the effective metadata: tag values overridden by patched ones."""
        return {**self.tag_metadata, **self.patched_metadata}

    def missing_metadata(self, required: tuple[str, ...]) -> list[str]:
        """Return the required fields the order still lacks (null counts as missing).

        :param required: the required field names.
        """
        metadata = self.metadata
        return [name for name in required if metadata.get(name) is None]

    def status_document(self, required: tuple[str, ...]) -> dict[str, Any]:
        """Return the ``/status`` document.

        :param required: the required field names, to tell whether metadata is complete.
        """
        return {
            "order_id": self.order_id,
            "study_uid": self.study_uid,
            "status": self.status.value,
            "instances_received": len(self.instances),
            "metadata_complete": not self.missing_metadata(required),
            "reason": self.reason,
            "created_at": utc_iso(self.created_at),
            "updated_at": utc_iso(self.updated_at),
        }

    def state_document(self, required: tuple[str, ...]) -> dict[str, Any]:
        """Return the order as ``/_sandbox/state`` shows it, instances and metadata included.

        :param required: the required field names.
        """
        document = self.status_document(required)
        document["metadata"] = self.metadata
        document["instances"] = [vars(instance).copy() for instance in self.instances.values()]
        return document


class OrderBook:
    """Every order and every received object, with the rules that move orders along.

    :param audit: where events are recorded.
    :param clock: the monotonic clock the rules are measured with.
    :param wall_clock: seconds since the epoch, for the documents' timestamps.
    """

    def __init__(
        self,
        audit: AuditLog,
        clock: Callable[[], float] = monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._audit = audit
        self._clock = clock
        self._wall_clock = wall_clock
        self._orders: dict[str, Order] = {}
        self._orders_by_study: dict[str, list[Order]] = {}
        self._open_orders: dict[str, Order] = {}
        self._objects: dict[str, dict[str, Any]] = {}

    def get(self, order_id: str) -> Order | None:
        """Return an order by id.

        :param order_id: the order's id.
        """
        return self._orders.get(order_id)

    def orders_of_study(self, study_uid: str) -> list[Order]:
        """Return a study's orders, oldest first.

        :param study_uid: the StudyInstanceUID.
        """
        return list(self._orders_by_study.get(study_uid, ()))

    def latest_of_study(self, study_uid: str) -> Order | None:
        """Return a study's most recent order.

        :param study_uid: the StudyInstanceUID.
        """
        orders = self._orders_by_study.get(study_uid)
        return orders[-1] if orders else None

    def receive(self, received: ReceivedObject, clocks: Clocks) -> None:
        """File a new object under an order, or record why it was rejected.

        :param received: the object found in the store.
        :param clocks: the rule clocks in force.
        """
        header = received.header
        if header is None:
            self._file_object(received, order_id=None)
            self._audit.record(
                "object_rejected",
                key=received.key,
                size=received.size,
                md5=received.md5,
                reason=received.rejection,
            )
            return
        now = self._clock()
        order = self._order_to_join(header.study_uid, now, clocks)
        if order is None:
            order = self._open_order(header.study_uid, now)
        replaced = header.sop_instance_uid in order.instances
        order.instances[header.sop_instance_uid] = Instance(
            header.sop_instance_uid, received.key, received.size, received.md5
        )
        order.tag_metadata.update(header.tag_metadata)
        order.last_instance_at = now
        order.updated_at = self._wall_clock()
        self._file_object(received, order_id=order.order_id)
        self._audit.record(
            "object_received",
            key=received.key,
            size=received.size,
            md5=received.md5,
            order_id=order.order_id,
            study_uid=header.study_uid,
            sop_instance_uid=header.sop_instance_uid,
            replaced=replaced,
        )

    def _file_object(self, received: ReceivedObject, order_id: str | None) -> None:
        """Remember an object for ``/_sandbox/state``: accepted when it was filed under an order."""
        self._objects[received.key] = {
            "key": received.key,
            "size": received.size,
            "md5": received.md5,
            "accepted": order_id is not None,
            "order_id": order_id,
            "reason": received.rejection,
        }

    def _order_to_join(self, study_uid: str, now: float, clocks: Clocks) -> Order | None:
        """Return the study's order an instance arriving now joins, or None if it opens a new one."""
        latest = self.latest_of_study(study_uid)
        if latest is None or latest.status is not OrderStatus.UPLOADING:
            return None
        if now - latest.last_instance_at >= clocks.overwrite_window:
            return None
        return latest

    def _open_order(self, study_uid: str, now: float) -> Order:
        """Open a new order for a study."""
        wall_now = self._wall_clock()
        order = Order(
            order_id=str(uuid.uuid4()),
            study_uid=study_uid,
            opened_at=now,
            created_at=wall_now,
            status_since=now,
            updated_at=wall_now,
        )
        self._orders[order.order_id] = order
        self._orders_by_study.setdefault(study_uid, []).append(order)
        self._open_orders[order.order_id] = order
        self._audit.record("order_opened", order_id=order.order_id, study_uid=study_uid)
        logger.info("order %s opened", order.order_id)
        return order

    def patch_metadata(self, order: Order, fields: dict[str, Any]) -> None:
        """Merge PATCHed fields into an order's metadata.

        :param order: an ``UPLOADING`` order.
        :param fields: the JSON object sent.
        """
        order.patched_metadata.update(fields)
        order.updated_at = self._wall_clock()
        self._audit.record("metadata_patched", order_id=order.order_id, fields=sorted(fields))

    def advance(self, clocks: Clocks) -> None:
        """Apply the deadline, quiet-period and processing clocks to every order not yet finished.

        :param clocks: the rule clocks in force.
        """
        now = self._clock()
        for order in list(self._open_orders.values()):
            if order.status is OrderStatus.UPLOADING:
                if order.missing_metadata(clocks.required_metadata):
                    if now - order.opened_at >= clocks.metadata_deadline:
                        self._change_status(order, OrderStatus.FAILED, now, REASON_METADATA_TIMEOUT)
                elif now - order.last_instance_at >= clocks.quiet_period:
                    self._change_status(order, OrderStatus.DX_STARTED, now)
            if order.status is OrderStatus.DX_STARTED and now - order.status_since >= clocks.processing_time:
                self._change_status(order, OrderStatus.DELIVERED, now)

    def _change_status(
        self, order: Order, status: OrderStatus, now: float, reason: str | None = None
    ) -> None:
        """Move an order to a new status and record it."""
        previous = order.status
        order.status = status
        order.reason = reason
        order.status_since = now
        order.updated_at = self._wall_clock()
        if status in (OrderStatus.DELIVERED, OrderStatus.FAILED):
            self._open_orders.pop(order.order_id, None)
        self._audit.record(
            "status_changed",
            order_id=order.order_id,
            study_uid=order.study_uid,
            previous=previous.value,
            status=status.value,
            reason=reason,
        )
        logger.info("order %s: %s -> %s", order.order_id, previous.value, status.value)

    def clear(self) -> None:
        """Forget every order and object."""
        self._orders.clear()
        self._orders_by_study.clear()
        self._open_orders.clear()
        self._objects.clear()

    def orders_state(self, required: tuple[str, ...]) -> list[dict[str, Any]]:
        """Return every order as ``/_sandbox/state`` shows it, oldest first.

        :param required: the required field names.
        """
        return [order.state_document(required) for order in self._orders.values()]

    def objects_state(self) -> list[dict[str, Any]]:
        """Return every object received, accepted or not, in arrival order."""
        return [dict(entry) for entry in self._objects.values()]
