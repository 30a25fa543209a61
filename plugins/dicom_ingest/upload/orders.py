"""Find the order a study's upload went into and attach the study's metadata to it.

The vendor files uploaded instances into orders asynchronously, so right after a study's last
instance its order may not be listed yet: the lookup is repeated with backoff for a bounded time.
The waits start short and grow by half each time, so the lookup that finds an order comes no
later than half again the time the vendor took to file it, plus the first wait (or one longest
wait, once the waits stop growing): the last study's lookup is the end of every batch.
The order picked is the study's most recent one, unless that one existed before this send and
did not take this send's instances (then the vendor is still filing them into a new order).
Orders the study had before that are not picked are *abandoned*: a partial order left behind by
an interrupted earlier send fails at the vendor for lack of metadata, and is never completed
with a PATCH, because completing it would deliver an incomplete study.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential

from dicom_ingest.exceptions import DicomIngestApiError, DicomIngestError, DicomIngestOrderNotFoundError
from dicom_ingest.upload.protocols import VendorClient
from dicom_ingest.upload.results import FailureReason

log = logging.getLogger(__name__)

HTTP_CONFLICT = 409
"""The vendor's answer to metadata sent to an order that is no longer taking any."""

ORDER_POLL_FIRST_WAIT = 0.1
"""Seconds before the second order lookup ..."""
ORDER_POLL_GROWTH = 1.5
"""... each wait this many times the one before ..."""
ORDER_POLL_MAX_WAIT = 5.0
"""... up to this many seconds."""


class OrderNotFiledError(DicomIngestError):
    """The vendor lists no order holding this send's instances yet."""


@dataclass(frozen=True)
class StudyOrderRequest:
    """What the finaliser needs to know about a study whose instances are all uploaded.

    :param study_uid: the StudyInstanceUID.
    :param metadata: the study's resolved order metadata (patient data: never log it).
    :param instance_count: instances the study's order must hold.
    :param previous_orders: orders the study had before this send (its re-send's starting point).
    """

    study_uid: str
    metadata: Mapping[str, Any] = field(repr=False)
    instance_count: int
    previous_orders: frozenset[str] = frozenset()


@dataclass(frozen=True)
class FinalisedStudy:
    """How a study's order ended up: its id, the orders left behind, or why it failed.

    :param study_uid: the StudyInstanceUID.
    :param order_id: the order holding this send, when it was found.
    :param failure: why the study failed, or ``None`` when its metadata is with the vendor.
    :param abandoned_orders: earlier orders of the study that this send left behind.
    """

    study_uid: str
    order_id: str | None
    failure: FailureReason | None = None
    abandoned_orders: tuple[str, ...] = ()


class OrderFinaliser:
    """Resolve a study's order after its last instance and send its metadata.

    :param client: the vendor calls.
    :param wait_limit: seconds to keep looking for the order before the study fails.
    :param clock: a monotonic clock in seconds.
    :param sleep: waits between order lookups.
    :param stopping: once set, lookups stop waiting (the batch is being abandoned).
    """

    def __init__(
        self,
        client: VendorClient,
        *,
        wait_limit: float,
        clock: Callable[[], float],
        sleep: Callable[[float], Any],
        stopping: threading.Event,
    ) -> None:
        self._client = client
        self._wait_limit = wait_limit
        self._clock = clock
        self._sleep = sleep
        self._stopping = stopping

    def finalise(self, request: StudyOrderRequest) -> FinalisedStudy:
        """Find the study's order and attach its metadata; never raises for vendor failures.

        :param request: the study whose instances are all uploaded.
        """
        study_uid = request.study_uid
        try:
            order_id = self.resolve_order(request)
        except (DicomIngestOrderNotFoundError, OrderNotFiledError):
            log.warning("Study %s: no order holds its instances after %.0f s", study_uid, self._wait_limit)
            return FinalisedStudy(study_uid, None, FailureReason.ORDER_NOT_FOUND)
        except DicomIngestError as exc:
            log.warning("Study %s: its orders could not be listed: %s", study_uid, exc)
            return FinalisedStudy(study_uid, None, FailureReason.ORDER_LOOKUP_FAILED)
        abandoned = tuple(sorted(request.previous_orders - {order_id}))
        for abandoned_id in abandoned:
            log.warning(
                "Study %s: order %s was left behind by a re-send; it is not completed",
                study_uid,
                abandoned_id,
            )
        failure = self.attach_metadata(study_uid, order_id, request.metadata)
        return FinalisedStudy(study_uid, order_id, failure, abandoned)

    def resolve_order(self, request: StudyOrderRequest) -> str:
        """Return the id of the order that holds this send of the study, waiting while it is filed.

        :param request: the study.
        :raises DicomIngestOrderNotFoundError: the vendor still lists no order when the wait ends.
        :raises OrderNotFiledError: the vendor still lists only orders from before this send.
        :raises DicomIngestError: the lookup failed otherwise (after the hook's retries).
        """
        started = self._clock()

        def stop(_: RetryCallState) -> bool:
            return self._stopping.is_set() or self._clock() - started >= self._wait_limit

        retrying = Retrying(
            retry=retry_if_exception_type((DicomIngestOrderNotFoundError, OrderNotFiledError)),
            stop=stop,
            wait=wait_exponential(
                multiplier=ORDER_POLL_FIRST_WAIT, exp_base=ORDER_POLL_GROWTH, max=ORDER_POLL_MAX_WAIT
            ),
            sleep=self._sleep,
            reraise=True,
        )
        return retrying(self._order_of_this_send, request)

    def _order_of_this_send(self, request: StudyOrderRequest) -> str:
        """Look once for the order holding this send (see the module's description).

        :param request: the study.
        """
        order_ids = self._client.order_ids(request.study_uid)
        if not order_ids:
            raise OrderNotFiledError(f"study {request.study_uid} has no order yet")
        latest = order_ids[-1]
        if latest not in request.previous_orders:
            return latest
        status = self._client.get_status(order_id=latest)
        joined = (
            not status.is_done
            and not status.is_failed
            and (status.instances_received or 0) >= request.instance_count
        )
        if joined:
            return latest
        raise OrderNotFiledError(f"study {request.study_uid} has no order holding this send yet")

    def attach_metadata(
        self, study_uid: str, order_id: str, metadata: Mapping[str, Any]
    ) -> FailureReason | None:
        """PATCH the study's metadata into its order; return why that failed, or ``None``.

        A 409 means the order no longer takes metadata. It counts as success only when the
        vendor says the order's metadata is complete (it may have come from the instances'
        tags, letting the order move on before the PATCH arrived); otherwise the study failed
        with ``metadata_rejected``. A study without metadata to send needs no PATCH.

        :param study_uid: the StudyInstanceUID, for the log.
        :param order_id: the order.
        :param metadata: the fields to send (never logged).
        """
        if not metadata:
            return None
        try:
            self._client.add_metadata(order_id=order_id, metadata=metadata)
        except DicomIngestOrderNotFoundError as exc:
            log.warning("Study %s: order %s vanished before its metadata: %s", study_uid, order_id, exc)
            return FailureReason.ORDER_NOT_FOUND
        except DicomIngestApiError as exc:
            if exc.status_code != HTTP_CONFLICT:
                log.warning("Study %s: metadata for order %s failed: %s", study_uid, order_id, exc)
                return FailureReason.METADATA_FAILED
            if self._metadata_complete(order_id):
                log.info(
                    "Study %s: order %s moved on before the metadata arrived, with complete metadata",
                    study_uid,
                    order_id,
                )
                return None
            log.warning("Study %s: order %s refused the metadata: %s", study_uid, order_id, exc)
            return FailureReason.METADATA_REJECTED
        except DicomIngestError as exc:
            log.warning("Study %s: metadata for order %s failed: %s", study_uid, order_id, exc)
            return FailureReason.METADATA_FAILED
        return None

    def _metadata_complete(self, order_id: str) -> bool:
        """Tell whether the vendor reports the order's metadata complete (``False`` if it cannot say).

        :param order_id: the order.
        """
        try:
            return self._client.get_status(order_id=order_id).metadata_complete is True
        except DicomIngestError as exc:
            log.warning("Order %s: its status could not be read: %s", order_id, exc)
            return False
