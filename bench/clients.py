"""The raw clients the product is compared with: presign + PUT and nothing else, no ledger, no metadata.

- :func:`naive_upload`: a sequential loop with plain ``requests`` calls, one presign and one PUT
  per instance, each on a new connection (what a first script against the vendor's API does);
- :func:`pooled_upload`: a thread pool over one pooled ``requests.Session`` (the best raw
  parallel client we know in Python; see the field notes), the ceiling the product aims at;
  with ``verify=True`` it also hashes each body as it streams and checks the store's ETag
  against it, the least a client that checks what arrived must do.

Both stream each file from disk with its length known, as a presigned PUT requires.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO

import requests
from requests.adapters import HTTPAdapter

from bench.datasets import StagedFile

DICOM_CONTENT_TYPE = "application/dicom"
_ERROR_CODE = re.compile(r"<Code>([^<]*)</Code>\s*<Message>([^<]{0,200})")
"""The code and message of an S3 error document."""
_FIRST_SERVER_ERROR = 500
_MAX_CAUSES = 4
"""Exception classes named at most for a dropped connection (the error and what it wraps)."""
REQUEST_TIMEOUT = (10.0, 120.0)


class UploadRefused(RuntimeError):
    """The API or the store refused a call the benchmark relies on.

    :param message: what was refused (never a URL).
    :param status: the HTTP status, 0 when there was none.
    """

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status

    @property
    def transient(self) -> bool:
        """Whether a real client would try again: a 5xx answer."""
        return self.status >= _FIRST_SERVER_ERROR


class ConnectionDropped(UploadRefused):
    """A call's connection failed before an answer; named by exception classes only.

    Their texts are left out: a transport error's text may hold the presigned URL and its signature.

    :param call: the call, e.g. ``PUT``.
    :param error: what ``requests`` raised.
    """

    def __init__(self, call: str, error: requests.ConnectionError) -> None:
        names = [type(error).__name__]
        inner = error.args[0] if error.args else None
        while isinstance(inner, BaseException) and len(names) < _MAX_CAUSES:
            names.append(type(inner).__name__)
            inner = getattr(inner, "reason", None) or (inner.args[-1] if inner.args else None)
        super().__init__(f"{call} lost its connection ({' / '.join(names)})")

    @property
    def transient(self) -> bool:
        """A dropped connection is worth another try."""
        return True


@dataclass(frozen=True)
class VendorApi:
    """Where the vendor's API is and how to authenticate.

    :param base_url: the API's base URL.
    :param client_id: the OAuth2 client id.
    :param client_secret: its secret.
    """

    base_url: str
    client_id: str
    client_secret: str = field(repr=False)

    def token(self) -> str:
        """Get a token the way the vendor documents it (GET, HTTP Basic credentials)."""
        response = requests.get(
            f"{self.base_url}/oauth2/token",
            params={"grant_type": "client_credentials"},
            auth=(self.client_id, self.client_secret),
            timeout=REQUEST_TIMEOUT,
        )
        _check("token", response)
        return response.json()["access_token"]


def _check(call: str, response: requests.Response) -> None:
    """Raise :class:`UploadRefused` on a non-2xx answer, naming the call, status and error (never the URL)."""
    if not response.ok:
        code = _ERROR_CODE.search(response.text)
        detail = f" ({code.group(1)}: {code.group(2)})" if code else ""
        raise UploadRefused(f"{call} answered {response.status_code}{detail}", response.status_code)


HttpCall = Callable[..., requests.Response]


class _HashedBody:
    """A file streamed as a request body (its length known) and MD5-hashed on the way."""

    def __init__(self, stream: BinaryIO, size: int) -> None:
        self._stream = stream
        self._size = size
        self.digest = hashlib.md5(usedforsecurity=False)

    def __len__(self) -> int:
        return self._size

    def read(self, amount: int = -1) -> bytes:
        chunk = self._stream.read(amount)
        self.digest.update(chunk)
        return chunk


@contextmanager
def _drops_named(call: str) -> Iterator[None]:
    """Turn a dropped connection inside the block into :class:`ConnectionDropped` for ``call``."""
    try:
        yield
    except requests.ConnectionError as error:
        raise ConnectionDropped(call, error) from None


def _presign_and_put(
    get: HttpCall, put: HttpCall, api: VendorApi, token: str, staged: StagedFile, *, verify: bool = False
) -> None:
    """Presign one URL and PUT one file to it, once; with ``verify``, check the ETag against the MD5 sent."""
    with _drops_named("GET /upload"):
        presigned = get(
            f"{api.base_url}/upload", headers={"Authorization": f"Bearer {token}"}, timeout=REQUEST_TIMEOUT
        )
    _check("GET /upload", presigned)
    with staged.path.open("rb") as stream, _drops_named("PUT"):
        body = _HashedBody(stream, staged.size) if verify else stream
        stored = put(
            presigned.json()["url"],
            data=body,
            headers={"Content-Type": DICOM_CONTENT_TYPE},
            timeout=REQUEST_TIMEOUT,
        )
    _check("PUT", stored)
    if verify and stored.headers.get("ETag", "").strip('"') != body.digest.hexdigest():
        raise UploadRefused("PUT answered an ETag that is not the MD5 of the body sent")


def _send_one(
    get: HttpCall, put: HttpCall, api: VendorApi, token: str, staged: StagedFile, *, verify: bool = False
) -> str | None:
    """Presign and PUT one file; after a 5xx or a dropped connection, once more with a new URL.

    Any real client retries transient errors; one retry keeps a rare store hiccup from failing a
    whole run without hiding a systematic one.

    :param get: ``requests.get`` or a session's ``get``.
    :param put: ``requests.put`` or a session's ``put``.
    :param api: the vendor's API.
    :param token: a bearer token with the ``upload`` scope.
    :param staged: the file to send.
    :param verify: hash the body and check the store's ETag against it.
    :return: why the file was sent a second time, or ``None`` when once was enough.
    """
    try:
        _presign_and_put(get, put, api, token, staged, verify=verify)
    except UploadRefused as error:
        if not error.transient:
            raise
        reason = str(error)
    else:
        return None
    _presign_and_put(get, put, api, token, staged, verify=verify)
    return reason


def naive_upload(api: VendorApi, files: Sequence[StagedFile]) -> list[str]:
    """Send the files one after another with plain ``requests.get`` / ``requests.put``.

    :param api: the vendor's API.
    :param files: the instances to send.
    :return: why each retried upload was retried.
    """
    token = api.token()
    reasons = (_send_one(requests.get, requests.put, api, token, staged) for staged in files)
    return [reason for reason in reasons if reason is not None]


def pooled_upload(
    api: VendorApi, files: Sequence[StagedFile], workers: int, *, verify: bool = False
) -> list[str]:
    """Send the files with ``workers`` threads sharing one pooled ``requests.Session``.

    :param api: the vendor's API.
    :param files: the instances to send.
    :param workers: parallel uploads.
    :param verify: hash each body and check the store's ETag against it.
    :return: why each retried upload was retried.
    """
    token = api.token()
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=2, pool_maxsize=workers)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    failures: list[BaseException] = []
    retried: list[str] = []
    lock = threading.Lock()

    def send(staged: StagedFile) -> None:
        try:
            reason = _send_one(session.get, session.put, api, token, staged, verify=verify)
        except (requests.RequestException, UploadRefused) as error:
            with lock:
                failures.append(error)
            return
        if reason is not None:
            with lock:
                retried.append(reason)

    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="ceiling") as pool:
            for _ in pool.map(send, files):
                pass
    finally:
        session.close()
    if failures:
        raise UploadRefused(f"{len(failures)} of {len(files)} uploads failed, first: {failures[0]}")
    return retried
