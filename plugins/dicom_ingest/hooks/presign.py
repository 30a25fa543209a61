"""Presigned URLs asked for ahead of the uploads that will use them.

Under a real network each instance costs two round trips, ``GET /upload`` and then the ``PUT``.
A :class:`PresignedUrlSupply` takes the first off the critical path: whenever an upload takes a
URL, a replacement is requested in the background, so while a worker's PUT is in flight its next
URL is already on its way. The vendor's URLs are generic (an instance joins its study through its
DICOM header, not its URL) and valid for minutes, so a URL fetched one upload early is as good as
one fetched just before the PUT.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from dicom_ingest.exceptions import DicomIngestError

if TYPE_CHECKING:
    from collections.abc import Callable

    from dicom_ingest.hooks.models import PresignedUrl

log = logging.getLogger(__name__)

FAILURE_PAUSE = 1.0
"""Seconds without background requests after one failed: the uploads then ask for their own URLs."""
DEFAULT_WAIT_LIMIT = 60.0
"""Longest wait, in seconds, for a URL already requested before asking for a new one."""


class PresignedUrlSupply:
    """Keep up to ``depth`` presigned URLs ready or on their way for the uploads announced to come.

    Thread-safe. The caller announces uploads with :meth:`expect` (a batch does so as it queues a
    study's instances); no more URLs are requested than announced uploads remain. :meth:`take`
    hands out a ready URL, or waits for one already on its way (it was asked for earlier, so it
    arrives sooner than a new request would), and returns ``None`` only when none is coming: the
    caller then asks for a URL itself, under its retry policy, so errors surface where they are
    handled. So each upload costs one ``GET /upload``, as without the supply. A background request
    that fails is logged without its text and pauses the supply for :data:`FAILURE_PAUSE` seconds,
    so a struggling API does not receive more requests than the uploads need. With ``depth`` 0
    nothing is requested ahead.

    :param presign_once: asks the vendor for one URL in a single attempt.
    :param clock: the clock the URLs' ``issued_at`` was read from.
    :param depth: URLs kept ready or requested at most (the upload concurrency), or 0.
    :param wait_limit: longest wait, in seconds, for a URL on its way.
    """

    def __init__(
        self,
        presign_once: Callable[[], PresignedUrl],
        clock: Callable[[], float],
        *,
        depth: int,
        wait_limit: float = DEFAULT_WAIT_LIMIT,
    ) -> None:
        if depth < 0:
            raise ValueError("depth must not be negative")
        self._presign_once = presign_once
        self._clock = clock
        self._depth = depth
        self._wait_limit = wait_limit
        self._budget = 0
        self._ready: deque[PresignedUrl] = deque()
        self._requested = 0
        self._waiting = 0
        self._paused_until = float("-inf")
        self._closed = False
        self._changed = threading.Condition()
        self._executor = ThreadPoolExecutor(depth, thread_name_prefix="presign-ahead") if depth else None
        self.fetched = 0
        """URLs received in the background."""
        self.handed_out = 0
        """URLs :meth:`take` handed to an upload."""

    def expect(self, uploads: int) -> None:
        """Announce uploads still to come, and request URLs for the first of them.

        :param uploads: how many more uploads will each :meth:`take` a URL.
        """
        with self._changed:
            self._budget += max(0, uploads)
            self._request_locked()

    def take(self) -> PresignedUrl | None:
        """Return a usable URL requested ahead, waiting for one on its way; ``None`` when none is coming.

        Each call stands for one announced upload, whether or not a URL is found for it.
        """
        with self._changed:
            self._budget = max(0, self._budget - 1)
            url = self._take_locked()
            self._request_locked()
        return url

    def _take_locked(self) -> PresignedUrl | None:
        """Pop a usable ready URL, waiting while a request no other caller waits for is on its way."""
        deadline = self._clock() + self._wait_limit
        while True:
            now = self._clock()
            while self._ready:
                url = self._ready.popleft()
                if url.is_usable(now):
                    self.handed_out += 1
                    return url
            if self._closed or self._requested <= self._waiting or now >= deadline:
                return None
            self._waiting += 1
            try:
                self._changed.wait(deadline - now)
            finally:
                self._waiting -= 1

    def _request_locked(self) -> None:
        """Request URLs until ``depth`` are ready or on their way, for announced uploads only."""
        if self._executor is None or self._closed or self._clock() < self._paused_until:
            return
        while len(self._ready) + self._requested < min(self._depth, self._budget + self._waiting):
            self._requested += 1
            self._executor.submit(self._fetch)

    def _fetch(self) -> None:
        """Request one URL in the background and keep it (or note the failure)."""
        url: PresignedUrl | None = None
        try:
            url = self._presign_once()
        except Exception as exc:  # a background thread must never die silently, nor leak an error's text
            expected_failure = isinstance(exc, DicomIngestError)
            log.log(
                logging.DEBUG if expected_failure else logging.WARNING,
                "A presigned URL requested ahead failed (%s); uploads ask for their own",
                type(exc).__name__,
            )
        with self._changed:
            self._requested -= 1
            if url is None:
                self._paused_until = self._clock() + FAILURE_PAUSE
            else:
                self.fetched += 1
                if not self._closed:
                    self._ready.append(url)
            # One request settled: one waiter has something new to look at (a URL, or the news
            # that fewer are coming); waking them all would only cost CPU.
            self._changed.notify()

    def close(self) -> None:
        """Stop requesting URLs, drop the ready ones, and wait for the requests on their way."""
        with self._changed:
            self._closed = True
            self._ready.clear()
            self._changed.notify_all()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
