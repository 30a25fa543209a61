"""Emulated wide-area latency: a TCP proxy that delays every byte, in front of the API and the store.

The kernel here has no ``netem`` queueing discipline, so the delay is added in user space. Each
proxied connection forwards bytes both ways unchanged, so HTTP, ``Host`` headers and SigV4
signatures pass through untouched; only time changes:

- each direction is delayed by half the round trip, so a request and its answer take one
  round trip longer than on loopback;
- a new connection waits one more round trip before its first bytes move on, as a TCP
  handshake over the same link would (TLS is not emulated);
- with the ``tcp`` model (the default), each direction also keeps to the congestion window
  Linux's TCP would have over such a link without loss (:class:`CongestionWindow`): a new
  connection starts with 10 segments in flight and doubles them every round trip, so a large
  upload on a fresh connection takes several round trips to reach speed, while one on a
  connection kept open streams at once. On loopback the kernel's own window opens in
  microseconds, so without this a fresh connection would cost the handshake alone;
- with the ``delay`` model, bytes are only delayed, never held back: chunks already in flight do
  not wait for each other, so every upload streams at loopback bandwidth once its first byte
  has crossed.

The proxies run in a child process of the sandbox (``python -m dicom_ingest_sandbox.latency``),
so their CPU time is neither the API's nor the store's, and their listening sockets are bound by
the sandbox before it starts them: clients never see a port that is not yet listening.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

logger = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 1024
"""Most bytes read from one side before they are queued for the other."""
QUEUED_CHUNKS = 32
"""Chunks one direction of a connection may hold in flight (8 MiB) with the ``delay`` model, which
bounds the proxy's memory; with the ``tcp`` model the congestion window bounds it."""
SEGMENT_BYTES = 1448
"""A TCP segment's payload on an Ethernet path (MSS 1460 less the timestamp option)."""
INITIAL_WINDOW_BYTES = 10 * SEGMENT_BYTES
"""The initial congestion window, 10 segments (RFC 6928, Linux's default)."""
LARGEST_WINDOW_BYTES = 4 * 2**20
"""The most one direction keeps unacknowledged: Linux's default largest send buffer (``tcp_wmem``)."""
MIN_RETRANSMISSION_TIMEOUT = 0.2
"""Linux's ``TCP_RTO_MIN``; the timeout is this plus the round trip on a link of steady delay."""
LatencyModel = Literal["tcp", "delay"]
LATENCY_MODELS: tuple[LatencyModel, ...] = ("tcp", "delay")
LISTEN_BACKLOG = 256
_PR_SET_PDEATHSIG = 1
_STOP_GRACE_SECONDS = 5.0
_END_OF_STREAM = b""


@dataclass(frozen=True)
class Route:
    """One proxied address: a listening socket and the address its connections are forwarded to.

    :param listener: a bound socket; :class:`LatencyProxies` makes it listen.
    :param target_host: the host the connections are forwarded to.
    :param target_port: the port they are forwarded to.
    """

    listener: socket.socket
    target_host: str
    target_port: int

    @property
    def port(self) -> int:
        """Return the port clients connect to."""
        return self.listener.getsockname()[1]


class CongestionWindow:
    """The bytes one direction of an emulated TCP connection may have sent and not yet seen acknowledged.

    Slow start as Linux runs it on a link that loses nothing: the window starts at
    :data:`INITIAL_WINDOW_BYTES` and grows by every byte acknowledged, so it doubles each round
    trip, up to :data:`LARGEST_WINDOW_BYTES`. A connection that sent nothing for longer than the
    retransmission timeout restarts from a smaller window: halved for each timeout elapsed, never
    below the initial one (RFC 2861, Linux's ``tcp_slow_start_after_idle``).

    :param round_trip: the link's round trip, in seconds.
    """

    def __init__(self, round_trip: float) -> None:
        self.size = INITIAL_WINDOW_BYTES
        self.in_flight = 0
        self._timeout = round_trip + MIN_RETRANSMISSION_TIMEOUT
        self._last_sent: float | None = None
        self._acknowledged = asyncio.Event()

    async def room(self) -> int:
        """Wait until the window has room, then return how many bytes may be sent now."""
        while self.in_flight >= self.size:
            self._acknowledged.clear()
            await self._acknowledged.wait()
        return self.size - self.in_flight

    def restart_if_idle(self, now: float) -> None:
        """Shrink the window of a connection that has been idle for longer than the timeout.

        :param now: the loop time at which new bytes are about to be sent.
        """
        if self.in_flight or self._last_sent is None:
            return
        idle = now - self._last_sent
        while idle > self._timeout and self.size > INITIAL_WINDOW_BYTES:
            self.size = max(self.size // 2, INITIAL_WINDOW_BYTES)
            idle -= self._timeout

    def sent(self, size: int, now: float) -> None:
        """Count ``size`` bytes as sent at ``now``."""
        self.in_flight += size
        self._last_sent = now

    def acknowledge(self, size: int) -> None:
        """Take ``size`` bytes out of flight and grow the window by as much."""
        self.in_flight -= size
        self.size = min(self.size + size, LARGEST_WINDOW_BYTES)
        self._acknowledged.set()


class DelayingProxy:
    """Forward TCP connections to one address, delaying each direction by half ``round_trip`` seconds.

    :param target_host: the host connections are forwarded to.
    :param target_port: the port connections are forwarded to.
    :param round_trip: the round trip added, in seconds.
    :param model: ``tcp`` to also keep each direction to TCP's congestion window, ``delay`` to
        delay bytes only.
    """

    def __init__(
        self, target_host: str, target_port: int, round_trip: float, model: LatencyModel = "tcp"
    ) -> None:
        if model not in LATENCY_MODELS:
            raise ValueError(f"unknown latency model {model!r}; expected one of {', '.join(LATENCY_MODELS)}")
        self.target_host = target_host
        self.target_port = target_port
        self.round_trip = round_trip
        self.model = model

    def _window(self) -> CongestionWindow | None:
        """Return a fresh congestion window for one direction, or None when only delaying."""
        return CongestionWindow(self.round_trip) if self.model == "tcp" else None

    async def handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        """Serve one client connection until both directions have ended.

        :param client_reader: the client's side, read.
        :param client_writer: the client's side, written.
        """
        loop = asyncio.get_running_loop()
        handshake_done = loop.time() + self.round_trip
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                self.target_host, self.target_port, limit=2 * CHUNK_BYTES
            )
        except OSError as error:
            logger.warning("cannot reach %s:%d: %s", self.target_host, self.target_port, error)
            client_writer.transport.abort()
            return
        one_way = self.round_trip / 2
        try:
            await asyncio.gather(
                _relay(client_reader, upstream_writer, one_way, self._window(), not_before=handshake_done),
                _relay(upstream_reader, client_writer, one_way, self._window()),
            )
        except asyncio.CancelledError:
            # The proxies are stopping with this connection still open (a client's pooled one):
            # drop it and end quietly; a cancelled connection task makes asyncio log an error.
            for writer in (client_writer, upstream_writer):
                writer.transport.abort()
        finally:
            for writer in (client_writer, upstream_writer):
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()


async def _relay(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    delay: float,
    window: CongestionWindow | None,
    not_before: float = 0.0,
) -> None:
    """Copy one direction of a connection, each chunk ``delay`` seconds after it set off.

    Reading runs ahead of writing, so chunks in flight overlap instead of each waiting for the
    previous one. Without a ``window`` up to :data:`QUEUED_CHUNKS` are in flight: latency is added,
    bandwidth is kept. With one, bytes set off only while the window has room, and each chunk is
    acknowledged ``delay`` after it was delivered, so the sender feels the round trip as TCP would.
    The end of the stream is passed on as a half-close; a reset on either side aborts the other.

    :param reader: the side bytes come from.
    :param writer: the side they go to.
    :param delay: seconds each chunk is held (half the round trip).
    :param window: the direction's congestion window; None to delay only.
    :param not_before: loop time before which nothing sets off (the end of the emulated handshake).
    """
    loop = asyncio.get_running_loop()
    in_flight: asyncio.Queue[tuple[float, bytes | memoryview | None]] = asyncio.Queue(
        maxsize=QUEUED_CHUNKS if window is None else 0
    )

    async def set_off(chunk: bytes) -> None:
        """Queue a chunk for delivery, in pieces that fit the window when there is one."""
        if window is None:
            await in_flight.put((max(loop.time(), not_before) + delay, chunk))
            return
        rest = memoryview(chunk)
        while rest:
            window.restart_if_idle(loop.time())
            room = await window.room()
            piece, rest = rest[:room], rest[room:]
            now = loop.time()
            window.sent(len(piece), now)
            await in_flight.put((max(now, not_before) + delay, piece))

    async def receive() -> None:
        while True:
            try:
                chunk = await reader.read(CHUNK_BYTES)
            except OSError:
                await in_flight.put((loop.time(), None))
                return
            if chunk == _END_OF_STREAM:
                await in_flight.put((max(loop.time(), not_before) + delay, chunk))
                return
            await set_off(chunk)

    receiver = asyncio.create_task(receive())
    try:
        while True:
            due, chunk = await in_flight.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if chunk is None:
                writer.transport.abort()
                return
            if chunk == _END_OF_STREAM:
                if writer.can_write_eof() and not writer.transport.is_closing():
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                return
            writer.write(chunk)
            try:
                await writer.drain()
            except OSError:
                return
            if window is not None:
                loop.call_later(delay, window.acknowledge, len(chunk))
    finally:
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiver


async def serve_routes(
    routes: Sequence[Route], round_trip: float, stop: asyncio.Event, model: LatencyModel = "tcp"
) -> None:
    """Serve every route until ``stop`` is set.

    :param routes: the listening sockets and where their connections go.
    :param round_trip: the round trip added, in seconds.
    :param stop: set to stop serving.
    :param model: the latency model (see :class:`DelayingProxy`).
    """
    servers = [
        await asyncio.start_server(
            DelayingProxy(route.target_host, route.target_port, round_trip, model).handle,
            sock=route.listener,
            limit=2 * CHUNK_BYTES,
        )
        for route in routes
    ]
    try:
        await stop.wait()
    finally:
        for server in servers:
            server.close()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM the proxies if the sandbox dies without stopping them."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class LatencyProxies:
    """Run :class:`DelayingProxy` servers in a child process for a set of routes.

    :param round_trip_ms: the round trip added, in milliseconds.
    :param routes: the listening sockets (already bound) and where their connections go.
    :param model: the latency model (see :class:`DelayingProxy`).
    """

    def __init__(self, round_trip_ms: float, routes: Sequence[Route], model: LatencyModel = "tcp") -> None:
        self.round_trip_ms = round_trip_ms
        self.model = model
        self.routes = tuple(routes)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """Return the proxies' process id while it runs."""
        return self._process.pid if self._process else None

    def start(self) -> None:
        """Make the sockets listen and start the child process that serves them."""
        command = [sys.executable, "-m", __name__, "--round-trip-ms", str(self.round_trip_ms)]
        command += ["--model", self.model]
        for route in self.routes:
            route.listener.listen(LISTEN_BACKLOG)
            command += ["--route", f"{route.listener.fileno()}:{route.target_host}:{route.target_port}"]
        self._process = subprocess.Popen(
            command,
            pass_fds=[route.listener.fileno() for route in self.routes],
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    def stop(self) -> None:
        """Stop the child process (SIGTERM, then SIGKILL after a grace period) and close the sockets."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=_STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for route in self.routes:
            route.listener.close()

    def __enter__(self) -> LatencyProxies:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _parse_route(text: str) -> Route:
    """Read ``FD:HOST:PORT`` (the host may itself contain colons, as IPv6 addresses do)."""
    descriptor, rest = text.split(":", 1)
    host, port = rest.rsplit(":", 1)
    return Route(socket.socket(fileno=int(descriptor)), host, int(port))


async def _serve_until_signalled(routes: Sequence[Route], round_trip: float, model: LatencyModel) -> None:
    """Serve the routes until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(stop_signal, stop.set)
    await serve_routes(routes, round_trip, stop, model)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve inherited listening sockets as delaying proxies; the sandbox starts this.

    :param argv: the arguments (``sys.argv[1:]`` when None).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round-trip-ms", type=float, required=True)
    parser.add_argument("--model", choices=LATENCY_MODELS, default="tcp")
    parser.add_argument("--route", action="append", default=[], help="FD:HOST:PORT of one inherited socket")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    routes = [_parse_route(text) for text in arguments.route]
    asyncio.run(_serve_until_signalled(routes, arguments.round_trip_ms / 1000, arguments.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
