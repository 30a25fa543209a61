"""A stand-in vendor for the uploader's unit tests, staged files it can recognise, and plan recording.

The stand-in replaces the hook at its public methods (the uploader's only contact with the
vendor): it reads each instance from the stream it is given, files it into an order the way the
vendor does (the study's latest order while that one still takes instances, else a new one),
and records every PUT start and every PATCH.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from dicom_ingest.exceptions import DicomIngestApiError, DicomIngestOrderNotFoundError
from dicom_ingest.hooks.models import OrderStatus, UploadResult
from dicom_ingest.ledger import Ledger
from dicom_ingest.ledger import PlannedInstance as LedgerInstance
from dicom_ingest.ledger import PlannedStudy as LedgerStudy
from dicom_ingest.staging.plan import PlannedInstance, PlannedStudy

SITE = "paris"
RUN = "scheduled__2026-11-01T00:00:00+00:00"
BATCH = "batch-00001"
OWNER = f"{SITE}/{RUN}/{BATCH}"
UPLOADING = "UPLOADING"
DELIVERED = "DELIVERED"
FAILED = "FAILED"
GATE_TIMEOUT = 20.0
HEADER_BYTES = 512
"""Bytes read first from a staged test instance: enough for its two UIDs."""
"""Seconds a gated upload waits for its gate before giving up (only reached when a test fails)."""
HEADER_SEPARATOR = b"|"


def study_uid(number: int) -> str:
    """Return the UID of the test study numbered ``number``."""
    return f"1.2.826.0.1.3680043.8.498.7{number}"


def sop_uid(study_number: int, instance_number: int) -> str:
    """Return the UID of an instance of the test study numbered ``study_number``."""
    return f"{study_uid(study_number)}.1.{instance_number}"


def stage_study(
    root: Path,
    number: int,
    instances: int = 3,
    *,
    folder: str | None = None,
    sizes: Mapping[int, int] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> PlannedStudy:
    """Write a study's files (each starts with its study and SOP UIDs) and return it as planned.

    :param root: the staging root.
    :param number: the study's number.
    :param instances: how many instances.
    :param folder: the study's folder below the root (``study-<number>`` by default).
    :param sizes: instance number → file size, for instances bigger than their header.
    :param metadata: the study's order metadata.
    """
    folder = folder or f"study-{number}"
    planned = []
    for index in range(instances):
        sop = sop_uid(number, index)
        header = HEADER_SEPARATOR.join([study_uid(number).encode(), sop.encode(), b""])
        size = max(len(header), (sizes or {}).get(index, 0))
        relative_path = f"{folder}/IM{index:04d}.dcm"
        path = root / relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(header.ljust(size, b"\0"))
        planned.append(
            PlannedInstance(
                relative_path=relative_path,
                size=size,
                study_uid=study_uid(number),
                series_uid=f"{study_uid(number)}.1",
                sop_uid=sop,
                sop_class_uid=None,
                transfer_syntax_uid=None,
            )
        )
    default_metadata = {"patient_age": 45, "patient_sex": "F"}
    return PlannedStudy(
        study_uid=study_uid(number),
        metadata=dict(default_metadata if metadata is None else metadata),
        instances=tuple(planned),
    )


def ledger_study(study: PlannedStudy) -> LedgerStudy:
    """Return a planned study as the ledger records it.

    :param study: the study from the plan.
    """
    return LedgerStudy(
        study_uid=study.study_uid,
        instances=[
            LedgerInstance(
                sop_uid=instance.sop_uid,
                path=instance.relative_path,
                size=instance.size,
                series_uid=instance.series_uid,
            )
            for instance in study.instances
        ],
    )


def record_plan(
    ledger: Ledger, studies: Iterable[PlannedStudy], *, site_id: str = SITE, batch_id: str = BATCH
) -> None:
    """Record a batch's studies in the ledger for the test run, as the plan task does.

    :param ledger: the ledger.
    :param studies: the batch's studies.
    :param site_id: the site.
    :param batch_id: the batch.
    """
    ledger.record_plan(site_id, RUN, batch_id, [ledger_study(study) for study in studies])


def record_sent(ledger: Ledger, instances: Iterable[PlannedInstance]) -> None:
    """Record instances as uploaded by an earlier try, as that try's worker would have.

    :param ledger: the ledger.
    :param instances: the instances sent.
    """
    for instance in instances:
        ledger.mark_instance_uploaded(
            SITE, instance.sop_uid, f"incoming/{instance.sop_uid}", "e" * 32, "e" * 32
        )


@dataclass
class FakeClock:
    """A monotonic clock that moves only when told to (or when the fake sleep sleeps)."""

    now: float = 1000.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        with self._lock:
            self.now += seconds


@dataclass
class FakeSleep:
    """A sleep that records the requested waits and moves a fake clock instead of waiting."""

    clock: FakeClock
    waits: list[float] = field(default_factory=list)

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.clock.advance(seconds)


@dataclass
class Patch:
    """One metadata PATCH the stand-in vendor accepted."""

    order_id: str
    metadata: dict[str, Any]


class FakeVendor:
    """The vendor's API and store, in memory, at the hook's public methods (thread-safe).

    :param upload_seconds: how far each upload moves ``clock`` (for progress tests).
    :param clock: the clock moved by uploads.
    """

    def __init__(self, *, upload_seconds: float = 0.0, clock: FakeClock | None = None) -> None:
        self._lock = threading.Lock()
        self._upload_seconds = upload_seconds
        self._clock = clock
        self.put_starts: list[str] = []
        self.orders: dict[str, list[str]] = {}
        self.order_study: dict[str, str] = {}
        self.filed: dict[str, set[str]] = {}
        self.statuses: dict[str, str] = {}
        self.complete_by_tags: set[str] = set()
        self.patches: list[Patch] = []
        self.failing_sops: set[str] = set()
        self.unfiled_lookups = 0
        self.gates: dict[str, threading.Event] = {}
        self.gate_timeouts: list[str] = []
        self.start_listeners: list[Callable[[str], None]] = []
        self.filed_listeners: list[Callable[[str], None]] = []
        self.patch_listeners: list[Callable[[Patch], None]] = []
        self.announced: list[int] = []
        self.lookahead_open = False
        self.lookahead_depth: int | None = None

    # -- set-up --------------------------------------------------------------------------------

    def add_order(
        self, study: str, order_id: str, *, status: str = UPLOADING, sops: Iterable[str] = ()
    ) -> None:
        """Give a study an order that exists before the test's upload.

        :param study: the StudyInstanceUID.
        :param order_id: the order id.
        :param status: its status word.
        :param sops: instances already filed under it.
        """
        with self._lock:
            self.orders.setdefault(study, []).append(order_id)
            self.order_study[order_id] = study
            self.filed[order_id] = set(sops)
            self.statuses[order_id] = status

    # -- what the uploader calls ----------------------------------------------------------------

    @contextmanager
    def presigning_ahead(self, uploads_at_once: int | None = None) -> Iterator[FakeVendor]:
        """Note the uploads the batch announces (the stand-in needs no presigned URLs)."""
        self.lookahead_depth = uploads_at_once
        self.lookahead_open = True
        try:
            yield self
        finally:
            self.lookahead_open = False

    def expect(self, uploads: int) -> None:
        """Record an announcement of uploads to come."""
        with self._lock:
            self.announced.append(uploads)

    def upload_instance(self, source: BinaryIO, *, size: int | None = None) -> UploadResult:
        """Read the instance from its stream, file it into an order and answer like the hook."""
        # The header (two UIDs) is read first, so that a PUT's start is recorded before a large
        # body is read, as a real PUT's start is seen before its body arrives.
        head = source.read(HEADER_BYTES if size is None else min(size, HEADER_BYTES))
        study, sop, _ = head.split(HEADER_SEPARATOR, 2)
        study_text, sop_text = study.decode(), sop.decode()
        with self._lock:
            self.put_starts.append(sop_text)
            listeners = list(self.start_listeners)
        for listener in listeners:
            listener(sop_text)
        data = head + (source.read() if size is None else source.read(size - len(head)))
        gate = self.gates.get(sop_text)
        if gate is not None and not gate.wait(GATE_TIMEOUT):
            self.gate_timeouts.append(sop_text)
        if self._clock is not None:
            self._clock.advance(self._upload_seconds)
        if sop_text in self.failing_sops:
            raise DicomIngestApiError("PUT <store>/bucket/key failed", status_code=503)
        with self._lock:
            order_id = self._order_taking_instances(study_text)
            self.filed[order_id].add(sop_text)
            listeners = list(self.filed_listeners)
        for listener in listeners:
            listener(sop_text)
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        return UploadResult(
            key=f"incoming/{sop_text}", size=len(data), md5=md5, etag=md5, attempts=1, seconds=0.0
        )

    def _order_taking_instances(self, study: str) -> str:
        """Return the study's latest order if it still takes instances, else open a new one."""
        existing = self.orders.get(study, [])
        if existing and self.statuses[existing[-1]] == UPLOADING:
            return existing[-1]
        order_id = f"order-{len(self.order_study) + 1}"
        self.orders.setdefault(study, []).append(order_id)
        self.order_study[order_id] = study
        self.filed[order_id] = set()
        self.statuses[order_id] = UPLOADING
        return order_id

    def order_ids(self, study_uid: str) -> list[str]:
        """List a study's orders, oldest first; answer 404 while instances are being filed."""
        with self._lock:
            if self.unfiled_lookups > 0:
                self.unfiled_lookups -= 1
                raise DicomIngestOrderNotFoundError("GET /orderId found nothing", status_code=404)
            if not self.orders.get(study_uid):
                raise DicomIngestOrderNotFoundError("GET /orderId found nothing", status_code=404)
            return list(self.orders[study_uid])

    def add_metadata(
        self, *, order_id: str | None = None, study_uid: str | None = None, metadata: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Accept metadata for an order still uploading; answer 409 like the vendor otherwise."""
        if order_id is None:
            raise AssertionError("the uploader must name the order, not the study")
        patch = Patch(order_id, dict(metadata))
        with self._lock:
            if self.statuses[order_id] != UPLOADING:
                raise DicomIngestApiError(
                    "PATCH /add-metadata failed", status_code=409, error_code="order_not_active"
                )
            self.patches.append(patch)
            listeners = list(self.patch_listeners)
        for listener in listeners:
            listener(patch)
        return {"order_id": order_id, "status": UPLOADING}

    def get_status(self, *, order_id: str | None = None, study_uid: str | None = None) -> OrderStatus:
        """Describe an order as the vendor's status endpoint does."""
        if order_id is None:
            raise AssertionError("the uploader must name the order, not the study")
        with self._lock:
            status = self.statuses[order_id]
            patched = any(patch.order_id == order_id for patch in self.patches)
            return OrderStatus(
                order_id=order_id,
                study_uid=self.order_study[order_id],
                status=status,
                instances_received=len(self.filed[order_id]),
                metadata_complete=patched or order_id in self.complete_by_tags,
                is_done=status == DELIVERED,
                is_failed=status == FAILED,
            )

    # -- what tests look at ---------------------------------------------------------------------

    def patched_orders(self) -> list[str]:
        """Return the orders that received metadata, in PATCH order."""
        return [patch.order_id for patch in self.patches]

    def started_studies(self) -> list[str]:
        """Return the study UID of every PUT start, in start order."""
        return [sop.rsplit(".1.", 1)[0] for sop in self.put_starts]
