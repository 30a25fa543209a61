"""``dicom-ingest-sandbox``: run the vendor sandbox in the foreground until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import FrameType

import requests
import uvicorn

from dicom_ingest_sandbox.app import NetworkInfo, build_runtime, create_app
from dicom_ingest_sandbox.config import (
    ADMIN_TOKEN_ENV,
    CLIENT_SECRET_ENV,
    DEFAULT_DATA_DIR,
    DEFAULT_HOST,
    DEFAULT_PORT,
    DEMO_ADMIN_TOKEN,
    DEMO_CLIENT_ID,
    DEMO_CLIENT_SECRET,
    READY_PREFIX,
    Clocks,
    SandboxSettings,
    bracketed,
    reachable_host,
    url_host,
)
from dicom_ingest_sandbox.ingest import quiet_pydicom
from dicom_ingest_sandbox.latency import LATENCY_MODELS, LatencyProxies, Route
from dicom_ingest_sandbox.store import BUCKET, ObjectStore, StoreError

logger = logging.getLogger("dicom_ingest_sandbox")

_READY_TIMEOUT_SECONDS = 15.0
_GRACEFUL_SHUTDOWN_SECONDS = 2


def build_parser() -> argparse.ArgumentParser:
    """Return the command line parser; every flag has a default that works on its own."""
    defaults = Clocks()
    parser = argparse.ArgumentParser(
        prog="dicom-ingest-sandbox",
        description="Run a local stand-in for the vendor's DICOM ingestion REST API and its object store.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="address the API and the store listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="API port (0 picks a free one)")
    parser.add_argument("--store-port", type=int, default=0, help="object store port (0 picks a free one)")
    parser.add_argument(
        "--public-host",
        default=None,
        help="host name put in presigned URLs and the ready line, for clients that reach the sandbox "
        "by another name (e.g. a container's service name); default: the --host address, or "
        "127.0.0.1 when it is a wildcard",
    )
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="round trip added in front of the API and the store by a delaying TCP proxy, "
        "to emulate a wide-area link (0: none)",
    )
    parser.add_argument(
        "--latency-model",
        choices=LATENCY_MODELS,
        default="tcp",
        help="with --latency-ms: 'tcp' also holds each connection to the congestion window TCP would "
        "have over such a link (slow start from 10 segments, restarted after idling), 'delay' only "
        "delays bytes (default: %(default)s)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="folder for the store's objects and the audit log",
    )
    parser.add_argument("--client-id", default=DEMO_CLIENT_ID, help="OAuth2 client id accepted")
    # No default shown for the secrets: it may come from the environment.
    parser.add_argument(
        "--client-secret",
        default=argparse.SUPPRESS,
        help=f"that client's secret (default: ${CLIENT_SECRET_ENV}, which keeps it out of process "
        f"listings, else {DEMO_CLIENT_SECRET})",
    )
    parser.add_argument(
        "--admin-token",
        default=argparse.SUPPRESS,
        help=f"X-Admin-Token for /_sandbox/* (default: ${ADMIN_TOKEN_ENV}, else {DEMO_ADMIN_TOKEN})",
    )
    parser.add_argument("--token-ttl", type=int, default=defaults.token_ttl, help="token lifetime, seconds")
    parser.add_argument(
        "--url-ttl", type=int, default=defaults.url_ttl, help="presigned URL lifetime, seconds"
    )
    parser.add_argument(
        "--metadata-deadline",
        type=float,
        default=defaults.metadata_deadline,
        help="seconds after an order opens before it fails for missing metadata",
    )
    parser.add_argument(
        "--overwrite-window",
        type=float,
        default=defaults.overwrite_window,
        help="an instance joins its study's order if the order received one less than this many seconds ago",
    )
    parser.add_argument(
        "--quiet-period",
        type=float,
        default=defaults.quiet_period,
        help="seconds without a new instance before a complete order starts processing",
    )
    parser.add_argument(
        "--processing-time",
        type=float,
        default=defaults.processing_time,
        help="seconds from DX_STARTED to DELIVERED",
    )
    parser.add_argument(
        "--required-metadata",
        default=",".join(defaults.required_metadata),
        help='comma-separated required metadata fields ("" for none)',
    )
    parser.add_argument("--log-level", default="INFO", help="log level of the sandbox's own messages")
    return parser


def _flag_or_environment(arguments: argparse.Namespace, name: str, variable: str, default: str) -> str:
    """Return a secret from its flag, else from its environment variable, else the demo value."""
    return getattr(arguments, name, None) or os.environ.get(variable) or default


def settings_from_args(arguments: argparse.Namespace) -> SandboxSettings:
    """Validate the parsed flags into settings.

    :param arguments: the parsed command line.
    """
    clocks = Clocks(
        token_ttl=arguments.token_ttl,
        url_ttl=arguments.url_ttl,
        metadata_deadline=arguments.metadata_deadline,
        overwrite_window=arguments.overwrite_window,
        quiet_period=arguments.quiet_period,
        processing_time=arguments.processing_time,
        required_metadata=arguments.required_metadata,
    )
    return SandboxSettings(
        host=arguments.host,
        port=arguments.port,
        store_port=arguments.store_port,
        public_host=arguments.public_host,
        latency_ms=arguments.latency_ms,
        latency_model=arguments.latency_model,
        data_dir=arguments.data_dir.resolve(),
        client_id=arguments.client_id,
        client_secret=_flag_or_environment(arguments, "client_secret", CLIENT_SECRET_ENV, DEMO_CLIENT_SECRET),
        admin_token=_flag_or_environment(arguments, "admin_token", ADMIN_TOKEN_ENV, DEMO_ADMIN_TOKEN),
        clocks=clocks,
    )


class ListenError(RuntimeError):
    """The API's address cannot be listened on."""


def _bind(host: str, port: int) -> socket.socket:
    """Bind the API's listening socket now, so a busy port fails before anything starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise ListenError(f"cannot listen on {bracketed(host)}:{port}: {error.strerror}") from error
    return listener


def _prepare_data_dir(settings: SandboxSettings) -> None:
    """Create the data folder and empty the store: the sandbox starts with no orders."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(settings.store_root, ignore_errors=True)


def _port_of(listener: socket.socket) -> int:
    """Return the port a bound socket listens on."""
    return listener.getsockname()[1]


def _banner(settings: SandboxSettings, network: NetworkInfo, store: ObjectStore) -> str:
    """Describe the running sandbox; secrets are shown only when they are the public demo ones."""
    secret = settings.client_secret if settings.uses_demo_credentials else "(as given)"
    admin_token = settings.admin_token if settings.uses_demo_credentials else "(as given)"
    clocks = " ".join(f"{name}={value}" for name, value in settings.clocks.model_dump().items())
    lines = [
        "dicom-ingest-sandbox",
        f"  API:           {network.base_url}   (OpenAPI docs at {network.base_url}/docs)",
        f"  object store:  {network.store_url}   (bucket {BUCKET!r})",
    ]
    if network.latency_ms:
        lines.append(
            f"  latency:       {network.latency_ms:g} ms round trip ({network.latency_model} model) added in "
            f"front of both (API itself at {network.api_upstream}, store at {store.endpoint_url})"
        )
    lines += [
        f"  data dir:      {settings.data_dir}",
        f"  client id:     {settings.client_id}",
        f"  client secret: {secret}",
        f"  admin token:   {admin_token}",
        f"  clocks:        {clocks}",
    ]
    return "\n".join(lines)


@contextmanager
def _client_network(
    settings: SandboxSettings,
    store: ObjectStore,
    api: socket.socket,
    delayed_listeners: tuple[socket.socket, socket.socket] | None,
) -> Iterator[NetworkInfo]:
    """Yield the addresses clients use, with the delaying proxies running in front when asked for.

    :param settings: the run's settings.
    :param store: the started object store.
    :param api: the socket the API itself listens on.
    :param delayed_listeners: the public API and store sockets the proxies serve; None for no proxy.
    """
    host = settings.advertised_host
    if delayed_listeners is None:
        yield NetworkInfo(base_url=f"http://{host}:{_port_of(api)}", store_url=f"http://{host}:{store.port}")
        return
    public_api, public_store = delayed_listeners
    target = reachable_host(settings.host)
    routes = [Route(public_api, target, _port_of(api)), Route(public_store, target, store.port)]
    with LatencyProxies(settings.latency_ms, routes, settings.latency_model) as proxies:
        yield NetworkInfo(
            base_url=f"http://{host}:{_port_of(public_api)}",
            store_url=f"http://{host}:{_port_of(public_store)}",
            latency_ms=settings.latency_ms,
            latency_model=settings.latency_model,
            api_upstream=f"http://{url_host(settings.host)}:{_port_of(api)}",
            proxy_pid=proxies.pid,
        )


async def _announce_when_ready(server: uvicorn.Server, base_url: str, health_url: str) -> None:
    """Print the ready line once the API answers and reports the store answering too.

    :param server: the API's server.
    :param base_url: the URL announced.
    :param health_url: the health endpoint, reached the way clients reach it.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _READY_TIMEOUT_SECONDS
    while loop.time() < deadline and not server.should_exit:
        if server.started:
            try:
                answer = await asyncio.to_thread(requests.get, health_url, timeout=2.0)
            except requests.RequestException:
                answer = None
            if answer is not None and answer.status_code == 200:
                print(f"{READY_PREFIX} {base_url}", flush=True)
                return
        await asyncio.sleep(0.05)
    logger.error("the sandbox did not become ready; stopping")
    server.should_exit = True


async def _serve(server: uvicorn.Server, listener: socket.socket, base_url: str, health_url: str) -> None:
    """Serve until told to stop, announcing readiness on the way."""
    announcer = asyncio.create_task(_announce_when_ready(server, base_url, health_url))
    try:
        await server.serve(sockets=[listener])
    finally:
        announcer.cancel()


def run(settings: SandboxSettings) -> None:
    """Start the store and the API (behind the delaying proxies when asked), serve until SIGINT/SIGTERM.

    Every public port is bound before anything starts, so a busy one fails fast.

    :param settings: the run's settings.
    """
    delayed = settings.latency_ms > 0
    public_api = _bind(settings.host, settings.port)
    with ExitStack() as stack:
        stack.callback(public_api.close)
        delayed_listeners = None
        api = public_api
        if delayed:
            public_store = _bind(settings.host, settings.store_port)
            stack.callback(public_store.close)
            api = _bind(settings.host, 0)
            stack.callback(api.close)
            delayed_listeners = (public_api, public_store)
        _prepare_data_dir(settings)
        store = stack.enter_context(
            ObjectStore(
                settings.store_root,
                settings.host,
                settings.data_dir / "store.log",
                port=0 if delayed else settings.store_port,
            )
        )
        network = stack.enter_context(_client_network(settings, store, api, delayed_listeners))
        runtime = build_runtime(settings, store, network)
        print(_banner(settings, network, store), flush=True)
        config = uvicorn.Config(
            create_app(runtime),
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_SECONDS,
        )
        health_url = f"http://{url_host(settings.host)}:{_port_of(public_api)}/_sandbox/health"
        asyncio.run(_serve(uvicorn.Server(config), api, network.base_url, health_url))
    logger.info("sandbox stopped")


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM into a normal exit, so every started process is stopped on the way out."""
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sandbox from the command line; return the exit status.

    :param argv: the arguments (``sys.argv[1:]`` when None).
    """
    arguments = build_parser().parse_args(argv)
    logging.basicConfig(
        level=arguments.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        settings = settings_from_args(arguments)
    except ValueError as error:
        print(f"dicom-ingest-sandbox: invalid settings: {error}", file=sys.stderr)
        return 2
    quiet_pydicom()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        run(settings)
    except KeyboardInterrupt:
        logger.info("sandbox stopped")
    except (ListenError, StoreError) as error:
        print(f"dicom-ingest-sandbox: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
