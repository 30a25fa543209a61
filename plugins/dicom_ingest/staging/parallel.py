"""Classify the files of a staging area in worker processes or threads, in listing order.

Parsing headers is CPU-bound Python, so one process classifies a few thousand files a second;
an archive of millions of files needs the worker's other cores. The listing stays in the calling
process; the files go to the workers in chunks of :data:`CHUNK_ENTRIES`, and the results come back
in listing order, at most :data:`CHUNKS_IN_FLIGHT_PER_WORKER` chunks per worker ahead of the
consumer, so memory does not depend on the size of the area.

The workers are forked (Linux only), so they start at once with everything the task process has
already imported; they log nothing, because a child writing to the task's log channel could
garble it. The result is exactly what one process would give, order metadata included: a chunk's
first file of a study that continues from the previous chunk carries no tag metadata, as it would
not in one pass. A worker that dies (killed for memory, say) costs no file: the chunks it and its
siblings still held are classified again in the calling process, which then finishes the scan on
its own.

Object-store areas are classified in threads instead (:data:`DEFAULT_SCAN_THREADS` by default):
each header costs a ranged read that mostly waits on a round trip, so a single reader would
spend an archive's scan waiting. Chunks are smaller there (:data:`THREAD_CHUNK_ENTRIES`), so a
modest area still keeps every thread busy, and come back in listing order the same way.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import chain, islice

from dicom_ingest.staging.classify import Classification, HeaderClassifier, Reason
from dicom_ingest.staging.source import SourceEntry, StagingSource

log = logging.getLogger(__name__)

CHUNK_ENTRIES = 256
"""Files handed to a worker at once; an area with fewer files is classified in-process."""
CHUNKS_IN_FLIGHT_PER_WORKER = 2
MAX_SCAN_PROCESSES = 8
"""The default never uses more processes than this, however many cores the worker has."""
DEFAULT_SCAN_THREADS = 16
"""Threads reading an object-store area's headers at once unless the site says otherwise."""
THREAD_CHUNK_ENTRIES = 16
"""Files one thread classifies at a time in an object-store area."""


@dataclass(frozen=True)
class ClassifierSettings:
    """What a :class:`HeaderClassifier` is built from.

    :param max_file_size: files larger than this many bytes are ``too_large`` and not read.
    :param header_prefix_bytes: how many bytes to read at once for the header.
    :param tag_mapping: field name → DICOM keyword for the order metadata read from tags.
    """

    max_file_size: int
    header_prefix_bytes: int
    tag_mapping: Mapping[str, str] = field(default_factory=dict)

    def classifier(self, source: StagingSource) -> HeaderClassifier:
        """Return a new classifier for ``source``.

        :param source: the staging area.
        """
        return HeaderClassifier(
            source,
            max_file_size=self.max_file_size,
            header_prefix_bytes=self.header_prefix_bytes,
            tag_mapping=self.tag_mapping,
        )


def default_scan_processes() -> int:
    """Return the processes a scan uses by default: the CPUs this process may run on, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_SCAN_PROCESSES))


def _can_fork_workers(source: StagingSource) -> bool:
    """Whether a scan of ``source`` may use worker processes: a local area, on Linux.

    :param source: the staging area.
    """
    return source.is_local and sys.platform.startswith("linux")


def classify_entries(
    source: StagingSource,
    settings: ClassifierSettings,
    entries: Iterable[SourceEntry],
    *,
    processes: int,
    threads: int = DEFAULT_SCAN_THREADS,
) -> Iterator[Classification]:
    """Yield the classification of each entry, in the order of ``entries``.

    :param source: the staging area the entries come from.
    :param settings: how to classify.
    :param entries: the listed entries to classify (the listing is consumed lazily).
    :param processes: worker processes for a local area; 1, or an area of fewer than
        :data:`CHUNK_ENTRIES` files, classifies in the calling process.
    :param threads: threads for an object-store area; 1 classifies in the calling thread.
    """
    remaining = iter(entries)
    if not source.is_local and threads > 1:
        yield from _classify_in_threads(source, settings, remaining, threads)
        return
    if processes <= 1 or not _can_fork_workers(source):
        yield from _classify_in_process(source, settings, remaining)
        return
    first_chunk = list(islice(remaining, CHUNK_ENTRIES))
    if len(first_chunk) < CHUNK_ENTRIES:
        yield from _classify_in_process(source, settings, first_chunk)
        return
    chunks = _chunks(chain(first_chunk, remaining), CHUNK_ENTRIES)
    runs = _StudyRuns()
    leftover: list[SourceEntry] = []
    for chunk_results in _classify_in_workers(source, settings, chunks, processes, leftover):
        yield from runs.continued(chunk_results)
    if leftover:
        rest = chain(leftover, chain.from_iterable(chunks))
        yield from runs.continued(_classify_in_process(source, settings, rest))


def _classify_in_process(
    source: StagingSource, settings: ClassifierSettings, entries: Iterable[SourceEntry]
) -> Iterator[Classification]:
    classifier = settings.classifier(source)
    for entry in entries:
        yield classifier.classify(entry)


def _chunks(entries: Iterator[SourceEntry], size: int) -> Iterator[list[SourceEntry]]:
    while chunk := list(islice(entries, size)):
        yield chunk


def _classify_in_threads(
    source: StagingSource, settings: ClassifierSettings, entries: Iterator[SourceEntry], threads: int
) -> Iterator[Classification]:
    """Classify chunks of entries in a thread pool, each with a classifier of its own; yield in order."""
    log.info("Reading the headers of %s in %d threads", source.uri, threads)
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dicom-ingest-scan")
    runs = _StudyRuns()

    def submit(chunk: list[SourceEntry]) -> Future[list[Classification]]:
        return pool.submit(_classify_list, source, settings, chunk)

    try:
        keep = threads * CHUNKS_IN_FLIGHT_PER_WORKER
        chunks = _chunks(entries, THREAD_CHUNK_ENTRIES)
        for chunk_results in _results_in_order(chunks, submit, keep, deque()):
            yield from runs.continued(chunk_results)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _classify_list(
    source: StagingSource, settings: ClassifierSettings, entries: list[SourceEntry]
) -> list[Classification]:
    return list(_classify_in_process(source, settings, entries))


class _StudyRuns:
    """Keeps tag metadata where one pass over the listing would read it.

    One classifier reads a study's tag metadata from the first valid file of each run of files
    of that study. A worker starts every chunk with a new classifier, so a run that goes on from
    the previous chunk would be read again; this drops that second reading.
    """

    def __init__(self) -> None:
        self._last_valid_study: str | None = None

    def continued(self, results: Iterable[Classification]) -> Iterator[Classification]:
        """Yield ``results`` (one classifier's, in order) as one pass over the listing would give them."""
        first_valid = True
        for classification in results:
            record = classification.record
            if record.reason is Reason.VALID:
                if first_valid and record.study_uid == self._last_valid_study:
                    classification = replace(classification, order_fields={})
                first_valid = False
                self._last_valid_study = record.study_uid
            yield classification


def _classify_in_workers(
    source: StagingSource,
    settings: ClassifierSettings,
    chunks: Iterator[list[SourceEntry]],
    processes: int,
    leftover: list[SourceEntry],
) -> Iterator[list[Classification]]:
    """Yield each chunk's results in order; if a worker dies, put the unfinished entries in ``leftover``."""
    log.info("Classifying the files of %s in %d processes", source.uri, processes)
    context = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(
        max_workers=processes,
        mp_context=context,
        initializer=_start_worker,
        initargs=(source, settings),
    )
    pending: deque[_SentChunk] = deque()
    try:
        keep = processes * CHUNKS_IN_FLIGHT_PER_WORKER
        yield from _results_in_order(chunks, partial(_submit, pool), keep, pending)
    except BrokenProcessPool:
        for sent in pending:
            leftover.extend(sent.entries)
        log.warning(
            "A scan worker process stopped unexpectedly; %d listed files are classified again, "
            "and the rest of %s in this process",
            len(leftover),
            source.uri,
        )
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _results_in_order(
    chunks: Iterable[list[SourceEntry]],
    submit: Callable[[list[SourceEntry]], Future[list[Classification]]],
    keep: int,
    pending: deque[_SentChunk],
) -> Iterator[list[Classification]]:
    """Submit each chunk and yield the chunks' results oldest first, with at most ``keep`` on their way.

    :param chunks: the chunks to classify.
    :param submit: hands a chunk to the pool.
    :param keep: how many chunks may be on their way while results wait to be taken.
    :param pending: where the chunks on their way are kept (the caller's, to recover them).
    """
    for chunk in chunks:
        pending.append(_SentChunk(chunk))
        pending[-1].future = submit(chunk)
        yield from _finished(pending, keep=keep)
    yield from _finished(pending, keep=0)


def _finished(pending: deque[_SentChunk], *, keep: int) -> Iterator[list[Classification]]:
    """Yield the oldest chunks' results until at most ``keep`` chunks are on their way.

    A chunk leaves ``pending`` only once its results are out, so none is lost if a worker dies.
    """
    while len(pending) > keep:
        yield pending[0].result()
        pending.popleft()


@dataclass
class _SentChunk:
    """A chunk handed to the workers, kept until its results are out."""

    entries: list[SourceEntry]
    future: Future[list[Classification]] | None = None

    def result(self) -> list[Classification]:
        """Wait for the chunk's results.

        :raises BrokenProcessPool: a worker died.
        """
        assert self.future is not None
        return self.future.result()


def _submit(pool: ProcessPoolExecutor, chunk: list[SourceEntry]) -> Future[list[Classification]]:
    # The first submission forks the workers; Python 3.12+ warns about forking a process that
    # runs threads. The workers only parse headers and never touch a lock another thread holds.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
        return pool.submit(_classify_chunk, chunk)


_worker_source: StagingSource | None = None
_worker_settings: ClassifierSettings | None = None


def _start_worker(source: StagingSource, settings: ClassifierSettings) -> None:
    """Set a forked worker up: keep the area and settings, and never write to the task's log."""
    global _worker_source, _worker_settings
    logging.disable(logging.CRITICAL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the task's handler, which reports to Airflow
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the calling process decides what an interrupt stops
    _worker_source, _worker_settings = source, settings


def _classify_chunk(entries: list[SourceEntry]) -> list[Classification]:
    """Classify one chunk in a worker, with a classifier of its own."""
    assert _worker_source is not None and _worker_settings is not None
    return _classify_list(_worker_source, _worker_settings, entries)
