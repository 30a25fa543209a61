"""Presigned URLs requested ahead: one request per upload, never more than announced, never stuck."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from dicom_ingest.exceptions import DicomIngestApiError
from dicom_ingest.hooks.models import PresignedUrl
from dicom_ingest.hooks.presign import FAILURE_PAUSE, PresignedUrlSupply

WAIT = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Vendor:
    """Hands out numbered URLs; can hold requests back, fail them, and counts them."""

    def __init__(self, clock: Clock, *, expires_in: float = 900.0) -> None:
        self.clock = clock
        self.expires_in = expires_in
        self.calls = 0
        self.in_flight = 0
        self.peak = 0
        self.failures = 0
        self.release = threading.Event()
        self.release.set()
        self.lock = threading.Lock()

    def presign_once(self) -> PresignedUrl:
        with self.lock:
            self.calls += 1
            number = self.calls
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            failing = self.failures > 0
            self.failures -= failing
        try:
            assert self.release.wait(WAIT)
            if failing:
                raise DicomIngestApiError("GET /upload answered 503", status_code=503)
            return PresignedUrl(
                url=f"https://store.example/u/{number}?sig=x",
                key=f"u/{number}",
                expires_in=self.expires_in,
                issued_at=self.clock(),
            )
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def vendor(clock: Clock) -> Vendor:
    return Vendor(clock)


def make_supply(vendor: Vendor, clock: Clock, depth: int = 4) -> PresignedUrlSupply:
    return PresignedUrlSupply(vendor.presign_once, clock, depth=depth, wait_limit=WAIT)


def test_each_announced_upload_gets_a_url_requested_ahead_and_none_is_wasted(vendor, clock):
    supply = make_supply(vendor, clock)
    supply.expect(10)

    keys = [supply.take().key for _ in range(10)]

    assert sorted(keys, key=lambda key: int(key.split("/")[1])) == [f"u/{n}" for n in range(1, 11)]
    assert len(set(keys)) == 10
    assert vendor.calls == 10
    assert (supply.fetched, supply.handed_out) == (10, 10)
    supply.close()


def takes_while_requests_are_held(
    supply: PresignedUrlSupply, vendor: Vendor, takes: int
) -> tuple[int, list[PresignedUrl | None], bool]:
    """Start ``takes`` takes while the vendor holds its answers (``release`` cleared), then release them.

    :returns: the requests made while held, what each take returned, and whether any take had
        returned before the vendor answered.
    """
    with ThreadPoolExecutor(takes) as pool:
        futures = [pool.submit(supply.take) for _ in range(takes)]
        threading.Event().wait(0.2)
        calls_while_held = vendor.calls
        any_done = any(future.done() for future in futures)
        vendor.release.set()
        urls = [future.result(WAIT) for future in futures]
    return calls_while_held, urls, any_done


def test_no_more_than_depth_requests_are_on_their_way(vendor, clock):
    vendor.release.clear()
    supply = make_supply(vendor, clock, depth=3)
    supply.expect(50)

    calls_while_held, urls, _ = takes_while_requests_are_held(supply, vendor, 8)

    assert calls_while_held == 3
    assert vendor.peak <= 3
    assert sum(url is not None for url in urls) >= 3  # three takes waited for the requests on their way
    supply.close()


def test_a_take_waits_for_the_url_on_its_way_instead_of_asking_again(vendor, clock):
    vendor.release.clear()
    supply = make_supply(vendor, clock, depth=1)
    supply.expect(1)

    _, [url], returned_early = takes_while_requests_are_held(supply, vendor, 1)

    assert not returned_early
    assert url is not None
    assert vendor.calls == 1
    supply.close()


def test_nothing_is_requested_before_uploads_are_announced(vendor, clock):
    supply = make_supply(vendor, clock)

    assert supply.take() is None

    assert vendor.calls == 0
    supply.close()


def test_depth_zero_requests_nothing(vendor, clock):
    supply = make_supply(vendor, clock, depth=0)
    supply.expect(5)

    assert supply.take() is None
    assert vendor.calls == 0
    supply.close()


def test_a_failed_background_request_hands_the_upload_back_and_pauses(vendor, clock):
    vendor.failures = 1
    supply = make_supply(vendor, clock, depth=1)
    supply.expect(3)

    assert supply.take() is None  # the upload asks for its own URL, under its retry policy
    assert supply.take() is None  # paused: nothing is requested
    assert vendor.calls == 1
    clock.now += FAILURE_PAUSE + 0.1
    supply.expect(0)  # any call after the pause requests again
    assert supply.take() is not None
    assert vendor.calls == 2
    supply.close()


def test_a_url_past_its_expiry_is_never_handed_out(clock):
    vendor = Vendor(clock, expires_in=10.0)
    supply = make_supply(vendor, clock, depth=2)
    supply.expect(2)
    while supply.fetched < 2:
        threading.Event().wait(0.01)
    clock.now += 60.0

    assert supply.take() is None  # both stale URLs are dropped, and no fresh one is on its way yet
    assert supply.handed_out == 0
    supply.close()


def test_close_drops_ready_urls_and_stops_requesting(vendor, clock):
    supply = make_supply(vendor, clock)
    supply.expect(4)
    supply.close()
    calls = vendor.calls

    supply.expect(4)
    assert supply.take() is None
    assert vendor.calls == calls
