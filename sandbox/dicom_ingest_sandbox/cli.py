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
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import requests
import uvicorn

from dicom_ingest_sandbox.app import build_runtime, create_app
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
)
from dicom_ingest_sandbox.ingest import quiet_pydicom
from dicom_ingest_sandbox.store import BUCKET, ObjectStore, StoreError, bracketed, url_host

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


def _banner(settings: SandboxSettings, base_url: str, store: ObjectStore) -> str:
    """Describe the running sandbox; secrets are shown only when they are the public demo ones."""
    secret = settings.client_secret if settings.uses_demo_credentials else "(as given)"
    admin_token = settings.admin_token if settings.uses_demo_credentials else "(as given)"
    clocks = " ".join(f"{name}={value}" for name, value in settings.clocks.model_dump().items())
    return "\n".join(
        [
            "dicom-ingest-sandbox",
            f"  API:           {base_url}   (OpenAPI docs at {base_url}/docs)",
            f"  object store:  {store.endpoint_url}   (bucket {BUCKET!r})",
            f"  data dir:      {settings.data_dir}",
            f"  client id:     {settings.client_id}",
            f"  client secret: {secret}",
            f"  admin token:   {admin_token}",
            f"  clocks:        {clocks}",
        ]
    )


async def _announce_when_ready(server: uvicorn.Server, base_url: str) -> None:
    """Print the ready line once the API answers and reports the store answering too."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _READY_TIMEOUT_SECONDS
    while loop.time() < deadline and not server.should_exit:
        if server.started:
            try:
                answer = await asyncio.to_thread(requests.get, f"{base_url}/_sandbox/health", timeout=2.0)
            except requests.RequestException:
                answer = None
            if answer is not None and answer.status_code == 200:
                print(f"{READY_PREFIX} {base_url}", flush=True)
                return
        await asyncio.sleep(0.05)
    logger.error("the sandbox did not become ready; stopping")
    server.should_exit = True


async def _serve(server: uvicorn.Server, listener: socket.socket, base_url: str) -> None:
    """Serve until told to stop, announcing readiness on the way."""
    announcer = asyncio.create_task(_announce_when_ready(server, base_url))
    try:
        await server.serve(sockets=[listener])
    finally:
        announcer.cancel()


def run(settings: SandboxSettings) -> None:
    """Start the store and the API, serve until SIGINT/SIGTERM, then stop both.

    :param settings: the run's settings.
    """
    listener = _bind(settings.host, settings.port)
    base_url = f"http://{url_host(settings.host)}:{listener.getsockname()[1]}"
    _prepare_data_dir(settings)
    with ObjectStore(settings.store_root, settings.host, settings.data_dir / "store.log") as store:
        runtime = build_runtime(settings, store)
        print(_banner(settings, base_url, store), flush=True)
        config = uvicorn.Config(
            create_app(runtime),
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_SECONDS,
        )
        asyncio.run(_serve(uvicorn.Server(config), listener, base_url))
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
