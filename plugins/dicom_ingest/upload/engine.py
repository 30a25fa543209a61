"""Upload one batch of whole studies: a bounded pool of upload workers and an order finaliser.

How a batch flows:

- The coordinating thread (the caller's) claims studies in the ledger one after another, only
  as far ahead as the workers need: a study is claimed when fewer than two instances per worker
  are waiting, so the workers never drain the queue while a claim is being written. The claim
  says what to do: ``skip`` (already with the vendor, or held back), ``busy`` (another live
  worker has it), ``resume_metadata`` (every instance is uploaded: only
  the order and its metadata are missing) or ``upload_all`` (send every instance; a re-send of an
  interrupted study is whole, on purpose, so that it joins or replaces the earlier order).
- Instances wait in one priority queue ordered by (study sequence, instance sequence), served by
  ``concurrency`` worker threads. All of a study's instances are taken before any of the next
  study's, so they reach the vendor back to back (it starts processing a study once none of its
  instances arrived for a minute), and a free worker never waits while another study is ready:
  a study's large file holds up one worker, not the batch.
- Right after a study's last instance, a small finaliser pool resolves the study's order and
  sends its metadata, while the workers carry on with the next studies. This happens in the same
  task, so no queueing between tasks can push a study past the vendor's metadata deadline.
- An instance that fails after the hook's retries fails its study: the study's remaining
  instances are not sent, its partial order gets no metadata, and the other studies carry on.
  A later attempt re-sends the failed study whole.

Every ledger write happens on the coordinating thread; workers only read files and talk to the
vendor. Uploaded instances are recorded in bulk: the coordinator keeps them in memory for at most
``flush_interval`` seconds or ``flush_size`` instances, and always records them before it marks a
study uploaded or failed, and when the batch ends or breaks off. What a crash loses from memory
costs nothing extra: a study whose upload was interrupted is re-sent whole anyway. Logs carry
UIDs, counts, sizes, rates and reason codes: never file paths, tag values, tokens or URLs.
"""

from __future__ import annotations

import io
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, BinaryIO

from dicom_ingest.exceptions import DicomIngestError, DicomIngestIntegrityError, DicomIngestOrderNotFoundError
from dicom_ingest.hooks.models import UploadResult
from dicom_ingest.ledger import (
    DEFAULT_LEASE,
    ClaimAction,
    ClaimLostError,
    InstanceUpload,
    Ledger,
    LedgerError,
    StudyClaim,
    StudyState,
)
from dicom_ingest.staging.plan import PlannedInstance, PlannedStudy
from dicom_ingest.upload.orders import FinalisedStudy, OrderFinaliser, StudyOrderRequest
from dicom_ingest.upload.progress import ProgressMeter
from dicom_ingest.upload.protocols import StagedFiles, UploadLookahead, VendorClient
from dicom_ingest.upload.results import BatchResult, FailureReason

log = logging.getLogger(__name__)

DEFAULT_METADATA_WAIT = 60.0
"""Seconds to keep looking for a study's order after its last instance before the study fails."""
DEFAULT_PROGRESS_INTERVAL = 10.0
"""Seconds between two progress lines."""
DEFAULT_FLUSH_INTERVAL = 0.5
"""Longest time, in seconds, an uploaded instance waits in memory before the ledger records it."""
DEFAULT_FLUSH_SIZE = 256
"""Uploaded instances the ledger records in one transaction at most."""
DEFAULT_RENEW_INTERVAL = DEFAULT_LEASE.total_seconds() / 4
"""Seconds between two renewals of the claims on the studies being uploaded."""
DEFAULT_RESUME_WINDOW = timedelta(minutes=10)
"""A study uploaded less than this long ago only needs its metadata; an older upload is re-sent whole,
because the vendor fails an order left without its metadata for 15 minutes."""
FINALISER_THREADS = 2
"""Studies whose order is being resolved at the same time."""
MAX_EVENT_WAIT = 0.5
"""Longest real wait for a worker's news before the coordinator checks its clocks again."""
MAX_EVENTS_PER_TURN = 256
"""Pieces of news handled in one turn before the coordinator checks its clocks again."""
QUEUED_PER_WORKER = 2
"""Instances kept queued per worker: the next study is claimed before the workers run out of work."""

_NO_MORE_WORK = math.inf
"""Priority of the stop signal: it sorts after every instance."""


def _size_of(stream: BinaryIO) -> int:
    """Return the size of an open staged file, leaving it at its start (a seek, not a read).

    :param stream: the file, open at its start.
    """
    size = stream.seek(0, io.SEEK_END)
    stream.seek(0)
    return size


@dataclass(eq=False)
class _StudyRun:
    """A study this task is working on.

    :param sequence: the study's position in the batch (its priority).
    :param study: the planned study.
    :param token: the ledger claim's token while this task holds the claim.
    :param pending: instances not yet settled (sent, failed or skipped).
    :param previous_orders: orders the study had before this send.
    :param failure: why the study failed, once it did.
    :param cancelled: its queued instances are no longer sent (read by the workers).
    :param lost: another worker took over the claim.
    """

    sequence: int
    study: PlannedStudy
    token: str | None
    pending: int = 0
    previous_orders: frozenset[str] = frozenset()
    failure: FailureReason | None = None
    cancelled: bool = False
    lost: bool = False

    @property
    def study_uid(self) -> str:
        """The study's StudyInstanceUID."""
        return self.study.study_uid


@dataclass(frozen=True)
class _InstanceJob:
    """One instance to send, queued with its study's priority."""

    run: _StudyRun
    instance: PlannedInstance


@dataclass(frozen=True)
class _InstanceSettled:
    """A worker's news: an instance was sent, failed, or skipped because its study was cancelled."""

    job: _InstanceJob
    result: UploadResult | None = None
    failure: FailureReason | None = None


@dataclass(frozen=True)
class _StudyFinalised:
    """The finaliser's news: a study's order and metadata are settled."""

    run: _StudyRun
    outcome: FinalisedStudy


@dataclass
class _Counts:
    """Study and instance counts of the batch so far."""

    uploaded: int = 0
    bytes: int = 0
    skipped_done: int = 0
    held: int = 0
    busy: int = 0
    orders: int = 0
    failures: dict[str, str] = field(default_factory=dict)


class BatchUploader:
    """Upload the studies of one batch and attach their metadata, resuming from the ledger.

    :param hook: the vendor client (a :class:`~dicom_ingest.hooks.dicom_ingest.DicomIngestHook`).
    :param ledger: the site's ledger, in which the plan's studies are recorded.
    :param source: the staging area the plan's relative paths are below (``Plan.source()``).
    :param site_id: the site.
    :param run_id: the Airflow run.
    :param batch_id: the batch of the run.
    :param concurrency: instances sent at the same time.
    :param batch_index: the batch's position in the plan, for the result.
    :param claim_owner: who claims studies in the ledger; a stable name (the same for every try of
        the same batch) lets a retry take its studies back without waiting for the claim's lease.
    :param metadata_wait: seconds to keep looking for a study's order after its last instance.
    :param progress_interval: seconds between progress lines.
    :param renew_interval: seconds between renewals of the claims of studies in progress.
    :param flush_interval: longest time, in seconds, an uploaded instance waits in memory before
        the ledger records it.
    :param flush_size: uploaded instances recorded in one ledger transaction at most.
    :param resume_window: how recent a complete upload must be for its metadata to be sent without
        sending the study again.
    :param clock: a monotonic clock in seconds.
    :param sleep: waits between order lookups; by default a wait that ends early when the batch stops.
    """

    def __init__(
        self,
        hook: VendorClient,
        ledger: Ledger,
        source: StagedFiles,
        site_id: str,
        run_id: str,
        batch_id: str,
        concurrency: int,
        *,
        batch_index: int = 0,
        claim_owner: str | None = None,
        metadata_wait: float = DEFAULT_METADATA_WAIT,
        progress_interval: float = DEFAULT_PROGRESS_INTERVAL,
        renew_interval: float = DEFAULT_RENEW_INTERVAL,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        flush_size: int = DEFAULT_FLUSH_SIZE,
        resume_window: timedelta = DEFAULT_RESUME_WINDOW,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if flush_size < 1:
            raise ValueError("flush_size must be at least 1")
        self._hook = hook
        self._ledger = ledger
        self._source = source
        self.site_id = site_id
        self.run_id = run_id
        self.batch_id = batch_id
        self.batch_index = batch_index
        self.concurrency = concurrency
        self._claim_owner = claim_owner
        self._progress_interval = progress_interval
        self._renew_interval = renew_interval
        self._flush_interval = flush_interval
        self._flush_size = flush_size
        self._resume_window = resume_window
        self._clock = clock
        self._stopping = threading.Event()
        self._finaliser = OrderFinaliser(
            hook,
            wait_limit=metadata_wait,
            clock=clock,
            sleep=sleep or self._stopping.wait,
            stopping=self._stopping,
        )
        self._jobs: queue.PriorityQueue[tuple[float, int, _InstanceJob | None]] = queue.PriorityQueue()
        self._events: queue.SimpleQueue[_InstanceSettled | _StudyFinalised] = queue.SimpleQueue()
        self._active: set[_StudyRun] = set()
        self._unrecorded: list[InstanceUpload] = []
        self._flush_due = math.inf
        self._counts = _Counts()
        self._meter: ProgressMeter | None = None
        self._lookahead: UploadLookahead | None = None

    # -- the batch ------------------------------------------------------------------------------

    def run(self, studies: Iterable[PlannedStudy]) -> BatchResult:
        """Upload the batch's studies and send their metadata; return what happened.

        A study that fails does not stop the others; the result names it with its reason.

        :param studies: the batch's studies in plan order (``Plan.iter_batch``).
        :raises LedgerError: the ledger cannot be written (the batch stops; a retry resumes).
        """
        planned = list(studies)
        instances = sum(len(study.instances) for study in planned)
        total_bytes = sum(study.bytes for study in planned)
        self._counts = _Counts()
        self._active = set()
        self._unrecorded, self._flush_due = [], math.inf
        self._stopping.clear()
        meter = self._meter = ProgressMeter(
            self.batch_id,
            studies=len(planned),
            instances=instances,
            total_bytes=total_bytes,
            clock=self._clock,
        )
        log.info(
            "Batch %s: %d studies, %d instances, %.1f MB, %d upload workers",
            self.batch_id,
            len(planned),
            instances,
            total_bytes / 1e6,
            self.concurrency,
        )
        with self._hook.presigning_ahead(self.concurrency) as lookahead:
            self._lookahead = lookahead
            workers = ThreadPoolExecutor(self.concurrency, thread_name_prefix=f"upload-{self.batch_id}")
            finalisers = ThreadPoolExecutor(FINALISER_THREADS, thread_name_prefix=f"finalise-{self.batch_id}")
            for _ in range(self.concurrency):
                workers.submit(self._work)
            completed = False
            try:
                self._coordinate(deque(enumerate(planned)), finalisers)
                completed = True
            except BaseException:
                self._record_uploads_before_stopping()
                raise
            finally:
                self._shut_down(workers, finalisers, completed=completed)
                self._lookahead = None
        meter.log(log)
        counts = self._counts
        log.info(
            "Batch %s finished: %d instances uploaded, %d orders with metadata, %d studies skipped as done, "
            "%d held, %d busy elsewhere, %d failed",
            self.batch_id,
            counts.uploaded,
            counts.orders,
            counts.skipped_done,
            counts.held,
            counts.busy,
            len(counts.failures),
        )
        return BatchResult(
            batch_id=self.batch_id,
            index=self.batch_index,
            studies=len(planned),
            instances=instances,
            uploaded=counts.uploaded,
            skipped_done=counts.skipped_done,
            failed=len(counts.failures),
            held=counts.held,
            busy=counts.busy,
            bytes=counts.bytes,
            seconds=meter.elapsed,
            orders=counts.orders,
            failures=dict(counts.failures),
        )

    def _coordinate(self, waiting: deque[tuple[int, PlannedStudy]], finalisers: ThreadPoolExecutor) -> None:
        """Claim studies, feed the workers, record what they did, until every study is settled.

        :param waiting: studies not claimed yet, with their sequence numbers.
        :param finalisers: the pool that resolves orders and sends metadata.
        """
        next_progress = self._clock() + self._progress_interval
        next_renewal = self._clock() + self._renew_interval
        while True:
            while waiting and self._jobs.qsize() < QUEUED_PER_WORKER * self.concurrency:
                self._claim(*waiting.popleft(), finalisers)
            if not waiting and not self._active:
                self._record_uploads()
                return
            next_deadline = min(next_progress, next_renewal, self._flush_due)
            wait = min(MAX_EVENT_WAIT, max(0.0, next_deadline - self._clock()))
            for event in self._next_events(wait):
                if isinstance(event, _InstanceSettled):
                    self._instance_settled(event, finalisers)
                else:
                    self._study_finalised(event)
            now = self._clock()
            if now >= self._flush_due:
                self._record_uploads()
            if now >= next_progress:
                self._progress().log(log)
                next_progress = now + self._progress_interval
            if now >= next_renewal:
                self._renew_claims()
                next_renewal = now + self._renew_interval

    def _next_events(self, wait: float) -> list[_InstanceSettled | _StudyFinalised]:
        """Wait up to ``wait`` seconds for news, then take the news already there (a bounded amount).

        :param wait: seconds to wait for the first piece.
        """
        try:
            events = [self._events.get(timeout=wait)]
        except queue.Empty:
            return []
        while len(events) < MAX_EVENTS_PER_TURN:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        return events

    def _shut_down(
        self, workers: ThreadPoolExecutor, finalisers: ThreadPoolExecutor, *, completed: bool
    ) -> None:
        """Stop the workers and the finalisers; when the batch broke off, drop the unsent instances.

        :param workers: the upload pool.
        :param finalisers: the finaliser pool.
        :param completed: whether every study was settled.
        """
        if not completed:
            self._stopping.set()
            for run in self._active:
                run.cancelled = True
        for number in range(self.concurrency):
            self._jobs.put((_NO_MORE_WORK, number, None))
        workers.shutdown(wait=True)
        finalisers.shutdown(wait=True, cancel_futures=True)

    def _progress(self) -> ProgressMeter:
        """Return the meter of the batch in progress."""
        if self._meter is None:
            raise RuntimeError("no batch is running")
        return self._meter

    # -- claims ---------------------------------------------------------------------------------

    def _claim(self, sequence: int, study: PlannedStudy, finalisers: ThreadPoolExecutor) -> None:
        """Claim one study and act on the ledger's answer.

        :param sequence: the study's position in the batch.
        :param study: the planned study.
        :param finalisers: the pool that resolves orders and sends metadata.
        """
        claim = self._ledger.claim_study(
            self.site_id,
            study.study_uid,
            self.run_id,
            self.batch_id,
            owner=self._claim_owner,
            resume_window=self._resume_window,
        )
        if claim.action in (ClaimAction.SKIP, ClaimAction.BUSY):
            self._leave_alone(study, claim)
            return
        run = _StudyRun(sequence, study, claim.token)
        self._active.add(run)
        if claim.action is ClaimAction.RESUME_METADATA:
            log.info("Study %s: every instance is uploaded; sending its metadata", study.study_uid)
            self._progress().instances_settled(len(study.instances), study.bytes)
            self._finalise(run, finalisers)
            return
        if claim.resent:
            log.info("Study %s: re-sending all %d instances", study.study_uid, len(study.instances))
        try:
            run.previous_orders = self._orders_before_send(claim)
        except DicomIngestError as exc:
            log.warning("Study %s: its earlier orders could not be listed: %s", study.study_uid, exc)
            self._progress().instances_settled(len(study.instances), study.bytes)
            self._fail(run, FailureReason.ORDER_LOOKUP_FAILED)
            return
        run.pending = len(study.instances)
        if self._lookahead is not None:
            self._lookahead.expect(run.pending)
        for number, instance in enumerate(study.instances):
            self._jobs.put((sequence, number, _InstanceJob(run, instance)))
        if not study.instances:
            self._study_sent(run, finalisers)

    def _leave_alone(self, study: PlannedStudy, claim: StudyClaim) -> None:
        """Count a study this task must not touch: done, held back, or another worker's.

        :param study: the planned study.
        :param claim: the ledger's answer.
        """
        counts = self._counts
        if claim.action is ClaimAction.BUSY:
            counts.busy += 1
            log.info("Study %s: another worker (%s) is uploading it", study.study_uid, claim.owner)
        elif claim.state == StudyState.HELD:
            counts.held += 1
            log.info("Study %s: held back (%s)", study.study_uid, claim.reason)
        else:
            counts.skipped_done += 1
            log.info("Study %s: already with the vendor (%s); not sent again", study.study_uid, claim.state)
        meter = self._progress()
        meter.instances_settled(len(study.instances), study.bytes)
        meter.study_finished()

    def _orders_before_send(self, claim: StudyClaim) -> frozenset[str]:
        """Return the orders a study had before this send: none for a first send.

        :param claim: the ledger's answer for a study to upload.
        """
        if not claim.resent and claim.order_id is None:
            return frozenset()
        try:
            listed = self._hook.order_ids(claim.study_uid)
        except DicomIngestOrderNotFoundError:
            listed = []
        known = {claim.order_id} if claim.order_id else set()
        return frozenset(listed) | known

    def _renew_claims(self) -> None:
        """Renew the claims this task holds; a claim taken over stops its study here."""
        for run in list(self._active):
            if run.token is None or run.lost:
                continue
            try:
                self._ledger.renew_claim(self.site_id, run.study_uid, run.token)
            except ClaimLostError:
                self._lose(run)

    def _lose(self, run: _StudyRun) -> None:
        """Stop working on a study whose claim another worker took over.

        :param run: the study.
        """
        run.lost = run.cancelled = True
        run.token = None
        log.warning("Study %s: another worker took it over; leaving it to that worker", run.study_uid)
        if run.pending == 0:
            self._settle(run)
            self._counts.busy += 1

    # -- workers --------------------------------------------------------------------------------

    def _work(self) -> None:
        """Send queued instances, highest priority first, until told to stop."""
        while True:
            _, _, job = self._jobs.get()
            if job is None:
                return
            self._events.put(self._send(job))

    def _send(self, job: _InstanceJob) -> _InstanceSettled:
        """Stream one instance to the vendor, unless its study was cancelled.

        :param job: the instance and its study.
        """
        run, instance = job.run, job.instance
        if run.cancelled:
            return _InstanceSettled(job)
        try:
            with self._source.open(instance.relative_path) as stream:
                staged_size = _size_of(stream)
                if staged_size == instance.size:
                    return _InstanceSettled(
                        job, result=self._hook.upload_instance(stream, size=instance.size)
                    )
            failure = FailureReason.SOURCE_CHANGED
            detail = f"{staged_size} bytes staged, {instance.size} planned"
        except DicomIngestIntegrityError as exc:
            failure, detail = FailureReason.INTEGRITY_MISMATCH, str(exc)
        except DicomIngestError as exc:
            failure, detail = FailureReason.UPLOAD_FAILED, str(exc)
        except OSError as exc:
            # The error's text names the file, and a path may hold a patient's name.
            failure, detail = FailureReason.SOURCE_UNREADABLE, type(exc).__name__
        except Exception as exc:
            failure, detail = FailureReason.UNEXPECTED_ERROR, type(exc).__name__
        run.cancelled = True  # at once, so that no worker starts another instance of the study
        log.warning("Study %s: instance %s failed (%s): %s", run.study_uid, instance.sop_uid, failure, detail)
        return _InstanceSettled(job, failure=failure)

    # -- recording uploads ----------------------------------------------------------------------

    def _remember_upload(self, upload: InstanceUpload) -> None:
        """Keep an uploaded instance for the next bulk record; record at once when enough wait.

        :param upload: the instance and what the store answered.
        """
        if not self._unrecorded:
            self._flush_due = self._clock() + self._flush_interval
        self._unrecorded.append(upload)
        if len(self._unrecorded) >= self._flush_size:
            self._record_uploads()

    def _record_uploads(self) -> None:
        """Record every uploaded instance kept in memory, in one ledger transaction."""
        uploads, self._unrecorded, self._flush_due = self._unrecorded, [], math.inf
        if uploads:
            self._ledger.mark_instances_uploaded(self.site_id, uploads)

    def _record_uploads_before_stopping(self) -> None:
        """Record the uploads kept in memory while the batch breaks off, never hiding why it broke off."""
        waiting = len(self._unrecorded)
        try:
            self._record_uploads()
        except LedgerError as exc:
            log.warning(
                "Batch %s: %d uploaded instances could not be recorded (%s); "
                "their studies will be re-sent whole",
                self.batch_id,
                waiting,
                exc,
            )

    # -- news from the workers and the finalisers -----------------------------------------------

    def _instance_settled(self, event: _InstanceSettled, finalisers: ThreadPoolExecutor) -> None:
        """Record a worker's news; once the study's last instance is settled, move the study on.

        :param event: the news.
        :param finalisers: the pool that resolves orders and sends metadata.
        """
        run, instance = event.job.run, event.job.instance
        meter = self._progress()
        if event.result is not None:
            result = event.result
            self._remember_upload(InstanceUpload(instance.sop_uid, result.key, result.md5, result.etag))
            self._counts.uploaded += 1
            self._counts.bytes += result.size
            meter.instance_uploaded(result.size)
        else:
            meter.instances_settled(1, instance.size)
            if event.failure is not None and run.failure is None:
                run.failure = event.failure
                run.cancelled = True
        run.pending -= 1
        if run.pending == 0:
            self._study_sent(run, finalisers)

    def _study_sent(self, run: _StudyRun, finalisers: ThreadPoolExecutor) -> None:
        """Move a study on once none of its instances is in flight: fail it, or resolve its order.

        :param run: the study.
        :param finalisers: the pool that resolves orders and sends metadata.
        """
        if run.lost:
            self._settle(run)
            self._counts.busy += 1
            return
        if run.failure is not None:
            self._fail(run, run.failure)
            return
        self._record_uploads()
        try:
            self._ledger.mark_study_uploaded(self.site_id, run.study_uid, token=run.token)
        except ClaimLostError:
            self._lose(run)
            return
        run.token = None  # marking the study uploaded ended the claim
        self._finalise(run, finalisers)

    def _finalise(self, run: _StudyRun, finalisers: ThreadPoolExecutor) -> None:
        """Hand a study whose instances are all uploaded to the finaliser pool.

        :param run: the study.
        :param finalisers: the pool.
        """
        request = StudyOrderRequest(
            study_uid=run.study_uid,
            metadata=run.study.metadata,
            instance_count=len(run.study.instances),
            previous_orders=run.previous_orders,
        )

        def finalise() -> None:
            try:
                outcome = self._finaliser.finalise(request)
            except Exception as exc:
                log.error("Study %s: finalising failed with %s", run.study_uid, type(exc).__name__)
                outcome = FinalisedStudy(run.study_uid, None, FailureReason.UNEXPECTED_ERROR)
            self._events.put(_StudyFinalised(run, outcome))

        finalisers.submit(finalise)

    def _study_finalised(self, event: _StudyFinalised) -> None:
        """Record the finaliser's news: abandoned orders, then the metadata sent or the failure.

        :param event: the news.
        """
        run, outcome = event.run, event.outcome
        if run.lost:
            return
        for order_id in outcome.abandoned_orders:
            self._ledger.record_abandoned_order(self.site_id, run.study_uid, order_id)
        if outcome.failure is not None:
            self._fail(run, outcome.failure, order_id=outcome.order_id)
            return
        if outcome.order_id is None:
            raise RuntimeError(f"study {run.study_uid} was finalised without an order")
        try:
            self._ledger.mark_metadata_sent(self.site_id, run.study_uid, outcome.order_id, token=run.token)
        except ClaimLostError:
            self._lose(run)
            return
        log.info("Study %s: metadata sent to order %s", run.study_uid, outcome.order_id)
        self._counts.orders += 1
        self._settle(run)

    def _fail(self, run: _StudyRun, reason: FailureReason, *, order_id: str | None = None) -> None:
        """Record a failed study (never completing its order) and let the batch carry on.

        :param run: the study.
        :param reason: why it failed.
        :param order_id: the study's order, if it was found.
        """
        self._record_uploads()
        try:
            self._ledger.mark_study_failed(self.site_id, run.study_uid, reason, order_id, token=run.token)
        except ClaimLostError:
            self._lose(run)
            return
        log.warning("Study %s failed: %s", run.study_uid, reason)
        self._counts.failures[run.study_uid] = str(reason)
        self._settle(run)

    def _settle(self, run: _StudyRun) -> None:
        """Forget a study whose fate in this batch is decided.

        :param run: the study.
        """
        run.token = None
        if run in self._active:
            self._active.discard(run)
            self._progress().study_finished()
