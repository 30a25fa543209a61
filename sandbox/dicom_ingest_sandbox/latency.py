"""Emulated wide-area latency: a TCP proxy that delays every byte, in front of the API and the store.

The kernel here has no ``netem`` queueing discipline, so the delay is added in user space. Each
proxied connection forwards bytes both ways unchanged, so HTTP, ``Host`` headers and SigV4
signatures pass through untouched; only time changes:

- each direction is delayed by half the round trip, so a request and its answer take one
  round trip longer than on loopback;
- a new connection waits one more round trip before its first bytes move on, as a TCP
  handshake over the same link would (TLS is not emulated);
- bytes are delayed, not throttled: chunks already in flight do not wait for each other, so
  a long upload still streams at loopback bandwidth once its first byte has crossed.

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

logger = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 1024
"""Most bytes read from one side before they are queued for the other."""
QUEUED_CHUNKS = 32
"""Chunks one direction of a connection may hold in flight (8 MiB), which bounds the proxy's memory."""
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


class DelayingProxy:
    """Forward TCP connections to one address, delaying each direction by half ``round_trip`` seconds.

    :param target_host: the host connections are forwarded to.
    :param target_port: the port connections are forwarded to.
    :param round_trip: the round trip added, in seconds.
    """

    def __init__(self, target_host: str, target_port: int, round_trip: float) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.round_trip = round_trip

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
                _relay(client_reader, upstream_writer, one_way, not_before=handshake_done),
                _relay(upstream_reader, client_writer, one_way),
            )
        finally:
            for writer in (client_writer, upstream_writer):
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()


async def _relay(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, not_before: float = 0.0
) -> None:
    """Copy one direction of a connection, each chunk ``delay`` seconds after it arrived.

    Reading runs ahead of writing (up to :data:`QUEUED_CHUNKS`), so chunks in flight overlap
    instead of each waiting for the previous one: latency is added, bandwidth is kept. The end
    of the stream is passed on as a half-close; a reset on either side aborts the other.

    :param reader: the side bytes come from.
    :param writer: the side they go to.
    :param delay: seconds each chunk is held.
    :param not_before: loop time before which nothing sets off (the end of the emulated handshake).
    """
    loop = asyncio.get_running_loop()
    in_flight: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue(maxsize=QUEUED_CHUNKS)

    async def receive() -> None:
        while True:
            try:
                chunk = await reader.read(CHUNK_BYTES)
            except OSError:
                await in_flight.put((loop.time(), None))
                return
            await in_flight.put((max(loop.time(), not_before) + delay, chunk))
            if chunk == _END_OF_STREAM:
                return

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
    finally:
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiver


async def serve_routes(routes: Sequence[Route], round_trip: float, stop: asyncio.Event) -> None:
    """Serve every route until ``stop`` is set.

    :param routes: the listening sockets and where their connections go.
    :param round_trip: the round trip added, in seconds.
    :param stop: set to stop serving.
    """
    servers = [
        await asyncio.start_server(
            DelayingProxy(route.target_host, route.target_port, round_trip).handle,
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
    """

    def __init__(self, round_trip_ms: float, routes: Sequence[Route]) -> None:
        self.round_trip_ms = round_trip_ms
        self.routes = tuple(routes)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """Return the proxies' process id while it runs."""
        return self._process.pid if self._process else None

    def start(self) -> None:
        """Make the sockets listen and start the child process that serves them."""
        command = [sys.executable, "-m", __name__, "--round-trip-ms", str(self.round_trip_ms)]
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


async def _serve_until_signalled(routes: Sequence[Route], round_trip: float) -> None:
    """Serve the routes until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(stop_signal, stop.set)
    await serve_routes(routes, round_trip, stop)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve inherited listening sockets as delaying proxies; the sandbox starts this.

    :param argv: the arguments (``sys.argv[1:]`` when None).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round-trip-ms", type=float, required=True)
    parser.add_argument("--route", action="append", default=[], help="FD:HOST:PORT of one inherited socket")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    routes = [_parse_route(text) for text in arguments.route]
    asyncio.run(_serve_until_signalled(routes, arguments.round_trip_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
