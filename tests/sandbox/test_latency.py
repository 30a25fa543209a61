"""Emulated WAN latency and the advertised host: the delaying proxy alone, then the sandbox behind it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
import requests

from dicom_ingest_sandbox.cli import main as sandbox_main
from dicom_ingest_sandbox.config import SandboxSettings
from dicom_ingest_sandbox.latency import (
    INITIAL_WINDOW_BYTES,
    LARGEST_WINDOW_BYTES,
    CongestionWindow,
    DelayingProxy,
    LatencyModel,
)
from dicom_ingest_sandbox.testing import Sandbox, build_instance, new_uid, running_sandbox
from tests.sandbox.support import TIMEOUT, presign, put

pytestmark = pytest.mark.sandbox

ROUND_TRIP_MS = 100
ROUND_TRIP = ROUND_TRIP_MS / 1000
TIMER_SLACK = 0.002
"""Timers may fire this much early (clock resolution); the delays asserted are lower bounds."""


# --- the proxy alone, in front of an echo server ---------------------------------------------


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Send back everything received; close after the client's end of stream."""
    while chunk := await reader.read(65536):
        writer.write(chunk)
        await writer.drain()
    writer.close()


async def with_proxied_echo(
    scenario: Callable[[str, int], Awaitable[Any]],
    round_trip: float = ROUND_TRIP,
    model: LatencyModel = "tcp",
) -> Any:
    """Run ``scenario(host, port)`` against a delaying proxy in front of an echo server."""
    upstream = await asyncio.start_server(echo, "127.0.0.1", 0)
    upstream_port = upstream.sockets[0].getsockname()[1]
    proxy = DelayingProxy("127.0.0.1", upstream_port, round_trip, model)
    front = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    try:
        return await scenario("127.0.0.1", front.sockets[0].getsockname()[1])
    finally:
        front.close()
        upstream.close()


@pytest.mark.parametrize("model", ["tcp", "delay"])
def test_the_proxy_passes_every_byte_both_ways_and_the_end_of_stream(model: LatencyModel) -> None:
    payload = os.urandom(3 * 2**20 + 17)

    async def scenario(host: str, port: int) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(payload)
        writer.write_eof()
        echoed = await reader.read()  # returns only once the end of stream came back
        writer.close()
        return echoed

    echoed = asyncio.run(with_proxied_echo(scenario, round_trip=0.02, model=model))
    assert hashlib.md5(echoed).hexdigest() == hashlib.md5(payload).hexdigest()


def test_the_proxy_adds_one_round_trip_per_exchange_and_one_more_for_a_new_connection() -> None:
    async def scenario(host: str, port: int) -> tuple[float, list[float]]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"ping")
        await reader.readexactly(4)
        first = loop.time() - started
        later = []
        for _ in range(3):
            started = loop.time()
            writer.write(b"ping")
            await reader.readexactly(4)
            later.append(loop.time() - started)
        writer.close()
        return first, later

    first, later = asyncio.run(with_proxied_echo(scenario))
    assert first >= 2 * ROUND_TRIP - TIMER_SLACK
    assert all(exchange >= ROUND_TRIP - TIMER_SLACK for exchange in later)


async def echo_twice(host: str, port: int, size: int) -> tuple[float, float]:
    """Send ``size`` bytes and read them back, twice on one connection; return both durations."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(host, port)
    durations = []
    for _ in range(2):
        started = loop.time()
        writer.write(b"x" * size)
        await writer.drain()
        await reader.readexactly(size)
        durations.append(loop.time() - started)
    writer.close()
    return durations[0], durations[1]


def test_with_the_delay_model_a_large_transfer_is_delayed_not_throttled() -> None:
    round_trip = 0.2
    fresh, _ = asyncio.run(
        with_proxied_echo(lambda host, port: echo_twice(host, port, 4 * 2**20), round_trip, "delay")
    )
    # The handshake and one round trip; held chunk by chunk, 16 chunks would take 16 round trips.
    assert fresh < 4 * round_trip


def test_with_the_tcp_model_a_fresh_connection_starts_slow_and_an_open_one_streams() -> None:
    round_trip = 0.05
    size = 2**20
    # Slow start sends 10, 20, 40, ... segments per round trip: 1 MiB needs 7 of them.
    round_trips_needed = 7
    assert INITIAL_WINDOW_BYTES * (2 ** (round_trips_needed - 1) - 1) < size
    assert INITIAL_WINDOW_BYTES * (2**round_trips_needed - 1) >= size
    fresh, open_ = asyncio.run(with_proxied_echo(lambda host, port: echo_twice(host, port, size), round_trip))
    assert fresh >= round_trips_needed * round_trip - TIMER_SLACK
    # The window grew past 1 MiB: the same transfer goes out in one flight (and back in another).
    assert open_ < 3 * round_trip


def test_the_congestion_window_doubles_per_round_trip_up_to_its_cap_and_waits_when_full() -> None:
    async def scenario() -> None:
        window = CongestionWindow(round_trip=0.04)
        assert await window.room() == INITIAL_WINDOW_BYTES
        window.sent(INITIAL_WINDOW_BYTES, now=0.0)
        waiting = asyncio.create_task(window.room())
        await asyncio.sleep(0)
        assert not waiting.done()  # a full window holds the sender back
        window.acknowledge(INITIAL_WINDOW_BYTES)
        assert await waiting == 2 * INITIAL_WINDOW_BYTES
        for _ in range(20):
            room = await window.room()
            window.sent(room, now=0.0)
            window.acknowledge(room)
        assert window.size == LARGEST_WINDOW_BYTES
        assert window.in_flight == 0

    asyncio.run(scenario())


def test_the_congestion_window_shrinks_after_idling_past_the_retransmission_timeout() -> None:
    window = CongestionWindow(round_trip=0.04)  # timeout 0.24 s
    window.sent(64 * INITIAL_WINDOW_BYTES, now=0.0)
    window.acknowledge(64 * INITIAL_WINDOW_BYTES)
    grown = window.size
    window.restart_if_idle(now=0.2)
    assert window.size == grown  # idle for less than the timeout: kept
    window.restart_if_idle(now=0.5)
    assert window.size == grown // 4  # two timeouts elapsed: halved twice
    window.restart_if_idle(now=100.0)
    assert window.size == INITIAL_WINDOW_BYTES  # never below the initial window
    window.sent(10, now=100.0)
    window.restart_if_idle(now=200.0)
    assert window.size == INITIAL_WINDOW_BYTES and window.in_flight == 10  # bytes in flight: not idle


# --- the sandbox behind the proxies ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """Give a sandbox data folder of this test alone (pytest's numbered folders may be pruned meanwhile)."""
    with tempfile.TemporaryDirectory(prefix="dicom-ingest-latency-") as folder:
        yield Path(folder)


@pytest.fixture(scope="module")
def delayed_sandbox() -> Iterator[Sandbox]:
    """A sandbox with 100 ms added in front of its API and its store."""
    with (
        tempfile.TemporaryDirectory(prefix="dicom-ingest-latency-") as folder,
        running_sandbox(Path(folder), latency_ms=ROUND_TRIP_MS) as sandbox,
    ):
        yield sandbox


def network_of(sandbox: Sandbox) -> dict[str, Any]:
    return sandbox.state()["network"]


def test_the_ready_line_names_the_proxied_api(delayed_sandbox: Sandbox) -> None:
    network = network_of(delayed_sandbox)
    assert network["latency_ms"] == ROUND_TRIP_MS
    assert network["latency_model"] == "tcp"
    assert network["base_url"] == delayed_sandbox.base_url
    assert network["api_upstream"] != delayed_sandbox.base_url
    assert psutil.Process(network["proxy_pid"]).ppid() == delayed_sandbox.pid


def test_a_request_through_the_proxy_takes_at_least_the_round_trip_longer(delayed_sandbox: Sandbox) -> None:
    direct_url = network_of(delayed_sandbox)["api_upstream"]
    with requests.Session() as proxied, requests.Session() as direct:
        for session, base_url in ((proxied, delayed_sandbox.base_url), (direct, direct_url)):
            assert session.get(f"{base_url}/_sandbox/health", timeout=TIMEOUT).status_code == 200
        proxied_times, direct_times = [], []
        for _ in range(3):
            for session, base_url, times in (
                (proxied, delayed_sandbox.base_url, proxied_times),
                (direct, direct_url, direct_times),
            ):
                started = time.perf_counter()
                session.get(f"{base_url}/test-token", timeout=TIMEOUT)
                times.append(time.perf_counter() - started)
    assert min(proxied_times) >= ROUND_TRIP - TIMER_SLACK
    assert min(proxied_times) > min(direct_times)


def test_a_presigned_put_through_the_proxy_is_stored_intact(delayed_sandbox: Sandbox) -> None:
    token = delayed_sandbox.token()
    answer = presign(delayed_sandbox, token)
    store = delayed_sandbox.state()["store"]
    assert urlsplit(answer["url"]).netloc == urlsplit(store["endpoint"]).netloc
    assert store["endpoint"] != store["upstream"]
    body = build_instance(new_uid(), size=256)
    started = time.perf_counter()
    response = put(answer["url"], body)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text
    assert response.headers["ETag"].strip('"') == hashlib.md5(body).hexdigest()
    assert elapsed >= ROUND_TRIP - TIMER_SLACK
    stored = delayed_sandbox.wait_for(
        lambda state: [entry for entry in state["objects"] if entry["key"] == answer["key"]], timeout=10
    )
    assert stored[0]["accepted"] is True
    assert stored[0]["md5"] == hashlib.md5(body).hexdigest()


def test_a_url_tampered_on_the_way_through_the_proxy_is_still_refused(delayed_sandbox: Sandbox) -> None:
    answer = presign(delayed_sandbox, delayed_sandbox.token())
    response = put(answer["url"].replace("X-Amz-Expires=900", "X-Amz-Expires=9000"), b"not stored")
    assert response.status_code == 403


def test_stopping_the_sandbox_stops_the_proxies(data_dir: Path) -> None:
    with running_sandbox(data_dir, latency_ms=20) as sandbox:
        proxy = psutil.Process(network_of(sandbox)["proxy_pid"])
        base_url = sandbox.base_url
    proxy.wait(timeout=TIMEOUT)
    assert not proxy.is_running()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{base_url}/_sandbox/health", timeout=TIMEOUT)


# --- the advertised host and a fixed store port --------------------------------------------------


def test_public_host_and_store_port_go_into_the_ready_line_and_the_presigned_urls(data_dir: Path) -> None:
    store_port = free_port()
    with running_sandbox(data_dir, public_host="localhost", store_port=store_port) as sandbox:
        assert urlsplit(sandbox.base_url).hostname == "localhost"
        assert sandbox.state()["network"]["latency_ms"] == 0
        token = sandbox.token()
        answer = presign(sandbox, token)
        url = urlsplit(answer["url"])
        assert (url.hostname, url.port) == ("localhost", store_port)
        body = build_instance(new_uid())
        response = put(answer["url"], body)
        assert response.status_code == 200, response.text
        assert response.headers["ETag"].strip('"') == hashlib.md5(body).hexdigest()


def test_with_latency_the_fixed_store_port_is_the_proxys(data_dir: Path) -> None:
    store_port = free_port()
    with running_sandbox(data_dir, latency_ms=10, store_port=store_port) as sandbox:
        answer = presign(sandbox, sandbox.token())
        assert urlsplit(answer["url"]).port == store_port
        assert urlsplit(sandbox.state()["store"]["upstream"]).port != store_port
        assert put(answer["url"], build_instance(new_uid())).status_code == 200


def test_a_wildcard_bind_advertises_loopback_unless_a_public_host_is_given() -> None:
    assert SandboxSettings(host="0.0.0.0").advertised_host == "127.0.0.1"
    assert SandboxSettings(host="0.0.0.0", public_host="sandbox").advertised_host == "sandbox"
    assert SandboxSettings(host="::1").advertised_host == "[::1]"
    assert SandboxSettings(public_host="::1").advertised_host == "[::1]"


@pytest.mark.parametrize(
    "flags",
    [
        ["--public-host", "http://sandbox"],
        ["--public-host", "sandbox:8765"],
        ["--public-host", "sandbox/path"],
        ["--latency-ms", "-5"],
    ],
    ids=["scheme", "port", "path", "negative-latency"],
)
def test_bad_network_flags_are_refused_before_anything_starts(
    data_dir: Path, flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert sandbox_main(["--data-dir", str(data_dir), "--port", "0", *flags]) == 2
    assert "invalid settings" in capsys.readouterr().err
    assert not (data_dir / "store.log").exists()
