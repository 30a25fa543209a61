"""Hooks for the vendor's DICOM ingestion API: the only code in the product that speaks HTTP to it.

:class:`DicomIngestHook` (requests) serves the upload tasks and is safe to share across a thread
pool inside one task; :class:`DicomIngestAsyncHook` (httpx) serves triggers. Both read the same
``dicom_ingest`` connection, obtain OAuth2 client-credentials tokens through authlib, refresh a
token shortly before it expires and once when the API refuses it, and retry transient failures
with the same policy (:func:`dicom_ingest.hooks.transport.retry_arguments`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx
import requests
from airflow.sdk import BaseHook
from airflow.sdk.log import amask_secret, mask_secret
from authlib.deprecate import AuthlibDeprecationWarning
from authlib.integrations.base_client import OAuthError
from authlib.integrations.requests_client import OAuth2Session
from requests.adapters import HTTPAdapter
from tenacity import AsyncRetrying, Retrying

from dicom_ingest.exceptions import (
    DicomIngestApiError,
    DicomIngestAuthError,
    DicomIngestError,
    DicomIngestOrderNotFoundError,
)
from dicom_ingest.hooks.connection import DicomIngestConnectionConfig
from dicom_ingest.hooks.models import OrderStatus, PresignedUrl, UploadResult, order_ids_from_response
from dicom_ingest.hooks.presign import PresignedUrlSupply
from dicom_ingest.hooks.transport import (
    HTTP_ERROR_FLOOR,
    HTTP_UNAUTHORIZED,
    HttpResponse,
    IssuedToken,
    error_from_response,
    json_object_of,
    redact_transport_logs,
    redact_url,
    redacted_copy,
    request_id_of,
    retry_arguments,
    store_error_from_response,
    transport_error,
)
from dicom_ingest.hooks.upload import (
    HashingReader,
    SinglePutUpload,
    UploadSource,
    UploadStrategy,
    open_source,
)

with warnings.catch_warnings():
    # authlib prefers the "httpx2" distribution and warns when it falls back to httpx, which is
    # the one Airflow ships; the fallback is fully supported.
    warnings.simplefilter("ignore", AuthlibDeprecationWarning)
    from authlib.integrations.httpx_client import AsyncOAuth2Client

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping

log = logging.getLogger(__name__)
"""Module logger (standard logging, which Airflow routes through its secret masker into task logs)."""

DICOM_CONTENT_TYPE = "application/dicom"
TOKEN_GRANT = "client_credentials"
TOKEN_CLIENT_AUTH = "client_secret_basic"
"""Client credentials go in an HTTP Basic header, for GET (the vendor's documents) and POST alike."""
CONNECTION_OK_MESSAGE = "Connection successfully tested"
EXTRA_POOL_CONNECTIONS = 4
"""Connections kept beyond the upload concurrency for API calls made while all PUT slots are busy."""
HOST_POOLS = 4
"""Per-host pools kept: the API, the token endpoint and the store may each be a different host."""
BODY_BLOCK_SIZE = 256 * 1024
"""Bytes of a streamed request body read, hashed and sent at a time (urllib3's default is 16 KiB)."""
MAX_REMEMBERED_ORIGINS = 16
"""Origins whose environment settings a session keeps; more than the hook ever talks to."""


def _order_query(order_id: str | None, study_uid: str | None) -> dict[str, str]:
    """Return the query that names one order, by order id or by study UID (exactly one).

    :param order_id: the vendor's order id.
    :param study_uid: the StudyInstanceUID (the vendor answers for the study's most recent order).
    """
    if (order_id is None) == (study_uid is None):
        raise ValueError("Give exactly one of order_id and study_uid")
    return {"order_id": order_id} if order_id is not None else {"study_uid": study_uid}


def _token_is_usable(token: IssuedToken | None, refused: str | None, now: float) -> bool:
    """Tell whether a cached token may be sent: present, not the one just refused, not about to expire.

    :param token: the cached token, if any.
    :param refused: a token the API just answered 401 to, if any.
    :param now: the current clock reading.
    """
    return token is not None and token.value != refused and token.is_fresh(now)


def _empty_or_json_object(operation: str, response: HttpResponse) -> dict[str, Any]:
    """Return the JSON object of an answer that may also come without a body (204).

    :param operation: what was attempted, for the error message.
    :param response: the HTTP response.
    """
    return json_object_of(operation, response) if response.text.strip() else {}


class _LargeBlockAdapter(HTTPAdapter):
    """A pooled adapter whose connections stream request bodies in :data:`BODY_BLOCK_SIZE` blocks.

    Each block of an upload costs one read of the staged file, one MD5 update and one ``sendall``
    in Python; a 512 KiB instance takes 2 blocks instead of 32. At most one block per upload in
    flight is held in memory.
    """

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        """Create the pool manager with the larger body block size.

        :param connections: per-host pools to keep.
        :param maxsize: connections kept per pool.
        :param block: whether a full pool makes callers wait.
        :param pool_kwargs: further arguments of urllib3's ``PoolManager``.
        """
        pool_kwargs.setdefault("blocksize", BODY_BLOCK_SIZE)
        super().init_poolmanager(connections, maxsize, block=block, **pool_kwargs)


class _EnvironmentOnceSession(OAuth2Session):
    """authlib's ``requests`` session, reading proxy and CA-bundle settings once per origin.

    ``requests`` looks for proxies by scanning every environment variable on each request (see
    psf/requests#5600), which costs more than the rest of a small API call where the environment
    is large. The hook talks to a handful of origins (API, token endpoint, store) and the task's
    environment does not change while it runs, so the settings found for an origin are kept for
    the session's life.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._environment_settings: dict[tuple[Any, ...], dict[str, Any]] = {}

    def merge_environment_settings(
        self, url: str, proxies: Mapping[str, str | None] | None, stream: Any, verify: Any, cert: Any
    ) -> dict[str, Any]:
        """Return what ``requests`` would, computed once per origin and per set of options.

        :param url: the request's URL (only its scheme and host matter here).
        :param proxies: proxies given with the request.
        :param stream: the request's ``stream`` option.
        :param verify: the request's ``verify`` option.
        :param cert: the request's ``cert`` option.
        """
        scheme, netloc, *_ = urlsplit(url)
        key = (
            scheme,
            netloc,
            tuple(sorted((proxies or {}).items())),
            stream,
            verify,
            cert,
            tuple(sorted(self.proxies.items())),
            self.trust_env,
            self.verify,
            self.cert,
        )
        settings = self._environment_settings.get(key)
        if settings is None:
            settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
            if len(self._environment_settings) < MAX_REMEMBERED_ORIGINS:
                self._environment_settings[key] = settings
        return {**settings, "proxies": dict(settings["proxies"])}


class _DicomIngestHookBase(BaseHook):
    """Connection handling and response parsing shared by the sync and the async hook.

    :param dicom_ingest_conn_id: the ``dicom_ingest`` connection to use.
    :param clock: a monotonic clock in seconds (token and URL expiry, upload timing).
    """

    conn_name_attr = "dicom_ingest_conn_id"
    default_conn_name = "dicom_ingest_default"
    conn_type = "dicom_ingest"
    hook_name = "DICOM Ingest"

    def __init__(
        self,
        dicom_ingest_conn_id: str = default_conn_name,
        *,
        clock: Callable[[], float] = time.monotonic,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.dicom_ingest_conn_id = dicom_ingest_conn_id
        self._clock = clock
        self._config: DicomIngestConnectionConfig | None = None
        self._token: IssuedToken | None = None

    def clock(self) -> float:
        """Return the hook's clock reading in seconds."""
        return self._clock()

    @staticmethod
    def _operation(method: str, path: str) -> str:
        """Name a call for messages and logs by method and path (or URL), never by query.

        :param method: the HTTP method.
        :param path: the configured API path, or a full URL.
        """
        return f"{method} {redact_url(path)}" if "://" in path else f"{method} /{path.lstrip('/')}"

    def _build_oauth_kwargs(self, config: DicomIngestConnectionConfig) -> dict[str, Any]:
        """Return the authlib client arguments common to the requests and the httpx client.

        :param config: the connection settings.
        """
        return {
            "client_id": config.client_id,
            "client_secret": config.client_secret.get_secret_value(),
            "token_endpoint_auth_method": TOKEN_CLIENT_AUTH,
            "scope": config.scope,
        }

    def _check_token_response(self, response: HttpResponse) -> HttpResponse:
        """Raise the library's error for a failed token request before authlib parses it.

        Registered as authlib's ``access_token_response`` compliance hook.

        :param response: the token endpoint's answer.
        """
        if response.status_code >= HTTP_ERROR_FLOOR:
            raise error_from_response("token request", response)
        return response

    def _issue(self, token: Mapping[str, Any]) -> IssuedToken:
        """Turn a token endpoint answer into a cached token.

        :param token: authlib's parsed token.
        """
        issued = IssuedToken.from_response(token, self._clock())
        log.info("Obtained an access token for connection %s", self.dicom_ingest_conn_id)
        return issued

    def _order_status(self, operation: str, response: HttpResponse) -> OrderStatus:
        """Parse a status answer with the connection's done and failed words.

        :param operation: the call that answered.
        :param response: the HTTP response.
        """
        config = self._require_config()
        return OrderStatus.from_response(
            json_object_of(operation, response),
            done_statuses=config.done_statuses,
            failed_statuses=config.failed_statuses,
            operation=operation,
            request_id=request_id_of(response),
        )

    def _order_ids(self, operation: str, response: HttpResponse) -> list[str]:
        """Parse an order-id list answer.

        :param operation: the call that answered.
        :param response: the HTTP response.
        """
        return order_ids_from_response(
            json_object_of(operation, response), operation=operation, request_id=request_id_of(response)
        )

    def _require_config(self) -> DicomIngestConnectionConfig:
        """Return the loaded connection settings."""
        if self._config is None:
            raise DicomIngestError("The connection has not been loaded yet")
        return self._config


class DicomIngestHook(_DicomIngestHookBase):
    """Talk to the vendor's ingestion API: tokens, presigned URLs, uploads, metadata and order status.

    One instance may be shared by the threads of a pool: it keeps one pooled ``requests`` session
    sized to the upload concurrency, fetches one token when many threads find it expired at once,
    and lets at most ``upload_concurrency`` PUTs run at the same time.

    :param dicom_ingest_conn_id: the ``dicom_ingest`` connection to use.
    :param upload_strategy: how an instance's bytes reach the store (default: one presigned PUT).
    :param sleep: the function that waits between retries (tests pin it).
    :param clock: a monotonic clock in seconds (token and URL expiry, upload timing).
    """

    def __init__(
        self,
        dicom_ingest_conn_id: str = _DicomIngestHookBase.default_conn_name,
        *,
        upload_strategy: UploadStrategy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        **kwargs: Any,
    ) -> None:
        super().__init__(dicom_ingest_conn_id, clock=clock, **kwargs)
        self.upload_strategy = upload_strategy or SinglePutUpload()
        self._sleep = sleep
        self._session: OAuth2Session | None = None
        self._upload_slots: threading.BoundedSemaphore | None = None
        self._url_supply: PresignedUrlSupply | None = None
        self._setup_lock = threading.Lock()
        self._token_lock = threading.Lock()

    def __enter__(self) -> DicomIngestHook:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def config(self) -> DicomIngestConnectionConfig:
        """The validated connection settings (loaded on first use)."""
        self.get_conn()
        return self._require_config()

    def get_conn(self) -> OAuth2Session:
        """Return the pooled session, loading the connection and building the session on first use."""
        if self._session is None:
            with self._setup_lock:
                if self._session is None:
                    connection = self.get_connection(self.dicom_ingest_conn_id)
                    config = DicomIngestConnectionConfig.from_connection(connection)
                    mask_secret(config.client_secret.get_secret_value())
                    self._upload_slots = threading.BoundedSemaphore(config.upload_concurrency)
                    self._config = config
                    self._session = self._build_session(config)
        return self._session

    def _build_session(self, config: DicomIngestConnectionConfig) -> OAuth2Session:
        """Build one authlib session (a ``requests.Session``) with a pool sized to the upload concurrency.

        :param config: the connection settings.
        """
        redact_transport_logs()
        session = _EnvironmentOnceSession(**self._build_oauth_kwargs(config))
        session.verify = config.verify
        adapter = _LargeBlockAdapter(
            pool_connections=HOST_POOLS,
            pool_maxsize=config.upload_concurrency + EXTRA_POOL_CONNECTIONS,
        )
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        session.register_compliance_hook("access_token_response", self._check_token_response)
        return session

    def close(self) -> None:
        """Close the pooled connections; the hook reconnects (and fetches a token) on next use."""
        with self._setup_lock:
            if self._session is not None:
                self._session.close()
            self._session = None
            self._token = None

    def retrying(self, operation: str) -> Retrying:
        """Return the connection's retry policy for one logical operation.

        :param operation: what is attempted, for the ``[Try n of m]`` log lines.
        """
        return Retrying(**retry_arguments(self.config, operation, log, self._sleep))

    # -- tokens -------------------------------------------------------------------------------

    def _fetch_token(self) -> IssuedToken:
        """Ask the token endpoint for a new client-credentials token (one attempt)."""
        session, config = self.get_conn(), self.config
        try:
            token = session.fetch_token(
                config.token_endpoint,
                method=config.token_method,
                grant_type=TOKEN_GRANT,
                timeout=config.timeout,
            )
        except OAuthError as exc:
            raise DicomIngestAuthError(
                "The token endpoint refused the request", error_code=exc.error
            ) from exc
        except requests.RequestException as exc:
            raise transport_error("token request", exc) from redacted_copy(exc)
        except ValueError as exc:
            raise DicomIngestApiError("The token endpoint answered with a body that is not JSON") from exc
        issued = self._issue(token)
        mask_secret(issued.value)
        return issued

    def _token_value(self, refused: str | None = None) -> str:
        """Return a usable token, fetching one (once, under a lock) when none is.

        :param refused: a token the API just refused; it is replaced unless another thread already did.
        """
        cached = self._token
        if cached is not None and _token_is_usable(cached, refused, self._clock()):
            return cached.value
        with self._token_lock:
            if not _token_is_usable(self._token, refused, self._clock()):
                self._token = self._fetch_token()
            return self._token.value

    # -- API calls ----------------------------------------------------------------------------

    def _send(
        self, operation: str, method: str, url: str, token: str, **request_kwargs: Any
    ) -> requests.Response:
        """Send one authorised API request.

        :param operation: the call's name for errors.
        :param method: the HTTP method.
        :param url: the absolute URL.
        :param token: the bearer token.
        :param request_kwargs: ``params`` / ``json`` for ``requests``.
        """
        try:
            return self.get_conn().request(
                method,
                url,
                headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
                timeout=self.config.timeout,
                withhold_token=True,
                **request_kwargs,
            )
        except requests.RequestException as exc:
            raise transport_error(operation, exc) from redacted_copy(exc)

    def _call_once(
        self,
        method: str,
        path: str,
        *,
        not_found: type[DicomIngestApiError] = DicomIngestApiError,
        **request_kwargs: Any,
    ) -> requests.Response:
        """Make one API call; on a 401 fetch a new token and re-send once.

        :param method: the HTTP method.
        :param path: the configured API path.
        :param not_found: the exception class for a 404.
        :param request_kwargs: ``params`` / ``json`` for ``requests``.
        """
        operation = self._operation(method, path)
        url = self.config.url_for(path)
        token = self._token_value()
        response = self._send(operation, method, url, token, **request_kwargs)
        if response.status_code == HTTP_UNAUTHORIZED:
            log.info("%s: the token was refused; re-sending once with a new token", operation)
            response = self._send(operation, method, url, self._token_value(refused=token), **request_kwargs)
        if response.status_code >= HTTP_ERROR_FLOOR:
            raise error_from_response(operation, response, not_found=not_found)
        return response

    def _call(self, method: str, path: str, **call_kwargs: Any) -> requests.Response:
        """Make an API call under the retry policy.

        :param method: the HTTP method.
        :param path: the configured API path.
        :param call_kwargs: passed to :meth:`_call_once`.
        """
        return self.retrying(self._operation(method, path))(self._call_once, method, path, **call_kwargs)

    # -- public API ---------------------------------------------------------------------------

    def presign_once(self) -> PresignedUrl:
        """Ask for one presigned PUT URL in a single attempt (the upload strategy retries)."""
        path = self.config.upload_path
        response = self._call_once("GET", path)
        operation = self._operation("GET", path)
        return PresignedUrl.from_response(
            json_object_of(operation, response),
            issued_at=self._clock(),
            operation=operation,
            request_id=request_id_of(response),
        )

    def next_presigned_url(self) -> PresignedUrl:
        """Return a URL for a new instance: one requested ahead if any, else a new one (one attempt)."""
        supply = self._url_supply
        url = supply.take() if supply is not None else None
        return url if url is not None else self.presign_once()

    @contextmanager
    def presigning_ahead(self, uploads_at_once: int | None = None) -> Iterator[PresignedUrlSupply]:
        """Within the block, request presigned URLs while earlier uploads are still sending.

        Announce the uploads to come with the supply's ``expect``; up to ``uploads_at_once`` URLs
        (never more than the connection's ``upload_concurrency``) are then kept ready or requested,
        never more than announced. Without the connection's ``presign_ahead`` setting the supply
        requests nothing and uploads presign as usual.

        :param uploads_at_once: how many uploads run at once in the block (a batch's concurrency);
            ``None``: the connection's ``upload_concurrency``.
        """
        config = self.config
        depth = min(uploads_at_once or config.upload_concurrency, config.upload_concurrency)
        supply = PresignedUrlSupply(
            self.presign_once,
            self._clock,
            depth=depth if config.presign_ahead else 0,
            wait_limit=sum(config.timeout),
        )
        previous, self._url_supply = self._url_supply, supply
        try:
            yield supply
        finally:
            self._url_supply = previous
            supply.close()
            log.debug("Presigned URLs: %d requested ahead, %d used", supply.fetched, supply.handed_out)

    def presign(self) -> PresignedUrl:
        """Ask the vendor for a presigned PUT URL for one new instance, with retries."""
        return self.retrying(self._operation("GET", self.config.upload_path))(self.presign_once)

    def put_object(self, target: PresignedUrl, body: HashingReader) -> str:
        """PUT a stream to a presigned URL in a single attempt, within the concurrency cap.

        :param target: the presigned URL.
        :param body: the instance stream at its start.
        :return: the store's ETag without quotes.
        """
        operation = f"PUT {target.redacted_url}"
        session, config = self.get_conn(), self.config
        with self._upload_slots:
            try:
                response = session.request(
                    "PUT",
                    target.url,
                    data=body,
                    headers={"Content-Type": DICOM_CONTENT_TYPE},
                    timeout=config.timeout,
                    allow_redirects=False,
                    withhold_token=True,
                )
            except requests.RequestException as exc:
                raise transport_error(operation, exc) from redacted_copy(exc)
        if response.status_code >= HTTP_ERROR_FLOOR:
            raise store_error_from_response(operation, response)
        return response.headers.get("ETag", "").strip().strip('"')

    def upload_instance(self, source: UploadSource, *, size: int | None = None) -> UploadResult:
        """Stream one DICOM instance to the vendor and check what the store received.

        :param source: a local path, an ``ObjectStoragePath``, or a binary file object positioned
            at the instance's start (left open).
        :param size: bytes to send; by default the whole file (or the rest of the stream).
        :raises DicomIngestIntegrityError: when the store's ETag is not the MD5 of the bytes sent.
        """
        with open_source(source, size) as body:
            result = self.upload_strategy.upload(self, body)
        log.debug(
            "Uploaded %s (%d bytes) in %d attempt(s), %.2f s",
            result.key,
            result.size,
            result.attempts,
            result.seconds,
        )
        return result

    def add_metadata(
        self, *, order_id: str | None = None, study_uid: str | None = None, metadata: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Merge JSON metadata into an order, named by order id (preferred) or study UID.

        The answer may echo metadata values: keep it out of logs and XCom.

        :param order_id: the vendor's order id.
        :param study_uid: the StudyInstanceUID (the vendor picks the study's most recent order).
        :param metadata: the fields to merge, e.g. ``{"patient_age": 42, "patient_sex": "F"}``.
        :raises DicomIngestOrderNotFoundError: when the vendor has no such order (yet).
        """
        path = self.config.metadata_path
        response = self._call(
            "PATCH",
            path,
            params=_order_query(order_id, study_uid),
            json=dict(metadata),
            not_found=DicomIngestOrderNotFoundError,
        )
        return _empty_or_json_object(self._operation("PATCH", path), response)

    def get_status(self, *, order_id: str | None = None, study_uid: str | None = None) -> OrderStatus:
        """Return an order's status, named by order id or study UID (its most recent order).

        :param order_id: the vendor's order id.
        :param study_uid: the StudyInstanceUID.
        :raises DicomIngestOrderNotFoundError: when the vendor has no such order (yet).
        """
        path = self.config.status_path
        response = self._call(
            "GET", path, params=_order_query(order_id, study_uid), not_found=DicomIngestOrderNotFoundError
        )
        return self._order_status(self._operation("GET", path), response)

    def order_ids(self, study_uid: str) -> list[str]:
        """Return the ids of all orders of a study, oldest first.

        :param study_uid: the StudyInstanceUID.
        :raises DicomIngestOrderNotFoundError: when the vendor knows no order of the study.
        """
        path = self.config.order_ids_path
        response = self._call(
            "GET", path, params={"study_uid": study_uid}, not_found=DicomIngestOrderNotFoundError
        )
        return self._order_ids(self._operation("GET", path), response)

    def test_connection(self) -> tuple[bool, str]:
        """Fetch a token and check it with the test-token endpoint; never reveals the secret."""
        try:
            self._call_once("GET", self.config.test_token_path)
        except DicomIngestError as exc:
            return False, str(exc)
        return True, CONNECTION_OK_MESSAGE


class DicomIngestAsyncHook(_DicomIngestHookBase):
    """Asynchronous twin of :class:`DicomIngestHook` for triggers: order status and order ids.

    Same connection, same token and retry rules, on ``httpx.AsyncClient`` through authlib.

    :param dicom_ingest_conn_id: the ``dicom_ingest`` connection to use.
    :param sleep: the coroutine function that waits between retries (tests pin it).
    :param clock: a monotonic clock in seconds (token expiry).
    """

    def __init__(
        self,
        dicom_ingest_conn_id: str = _DicomIngestHookBase.default_conn_name,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        **kwargs: Any,
    ) -> None:
        super().__init__(dicom_ingest_conn_id, clock=clock, **kwargs)
        self._sleep = sleep
        self._client: AsyncOAuth2Client | None = None
        self._setup_lock = asyncio.Lock()
        self._token_lock = asyncio.Lock()

    async def __aenter__(self) -> DicomIngestAsyncHook:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def get_async_conn(self) -> AsyncOAuth2Client:
        """Return the client, loading the connection with the async API on first use."""
        if self._client is None:
            async with self._setup_lock:
                if self._client is None:
                    connection = await self.aget_connection(self.dicom_ingest_conn_id)
                    extras = await connection.aextra_dejson()
                    config = DicomIngestConnectionConfig.from_connection(connection, extras)
                    await amask_secret(config.client_secret.get_secret_value())
                    self._config = config
                    self._client = self._build_client(config)
        return self._client

    def _build_client(self, config: DicomIngestConnectionConfig) -> AsyncOAuth2Client:
        """Build the authlib ``httpx.AsyncClient``.

        :param config: the connection settings.
        """
        client = AsyncOAuth2Client(
            **self._build_oauth_kwargs(config),
            verify=config.verify,
            timeout=httpx.Timeout(config.read_timeout, connect=config.connect_timeout),
            limits=httpx.Limits(max_connections=config.upload_concurrency + EXTRA_POOL_CONNECTIONS),
        )
        client.register_compliance_hook("access_token_response", self._check_token_response)
        return client

    async def aclose(self) -> None:
        """Close the client; the hook reconnects on next use."""
        if self._client is not None:
            await self._client.aclose()
        self._client = None
        self._token = None

    def _retrying(self, operation: str) -> AsyncRetrying:
        """Return the connection's retry policy for one call.

        :param operation: what is attempted, for the ``[Try n of m]`` log lines.
        """
        return AsyncRetrying(**retry_arguments(self._require_config(), operation, log, self._sleep))

    async def _fetch_token(self) -> IssuedToken:
        """Ask the token endpoint for a new client-credentials token (one attempt)."""
        client = await self.get_async_conn()
        config = self._require_config()
        try:
            token = await client.fetch_token(
                config.token_endpoint, method=config.token_method, grant_type=TOKEN_GRANT
            )
        except OAuthError as exc:
            raise DicomIngestAuthError(
                "The token endpoint refused the request", error_code=exc.error
            ) from exc
        except httpx.HTTPError as exc:
            raise transport_error("token request", exc) from redacted_copy(exc)
        except ValueError as exc:
            raise DicomIngestApiError("The token endpoint answered with a body that is not JSON") from exc
        issued = self._issue(token)
        await amask_secret(issued.value)
        return issued

    async def _token_value(self, refused: str | None = None) -> str:
        """Return a usable token, fetching one (once, under a lock) when none is.

        :param refused: a token the API just refused; it is replaced unless another task already did.
        """
        cached = self._token
        if cached is not None and _token_is_usable(cached, refused, self._clock()):
            return cached.value
        async with self._token_lock:
            if not _token_is_usable(self._token, refused, self._clock()):
                self._token = await self._fetch_token()
            return self._token.value

    async def _send(self, operation: str, url: str, token: str, params: Mapping[str, str]) -> httpx.Response:
        """Send one authorised GET.

        :param operation: the call's name for errors.
        :param url: the absolute URL.
        :param token: the bearer token.
        :param params: the query parameters.
        """
        client = await self.get_async_conn()
        try:
            return await client.request(
                "GET",
                url,
                params=params,
                headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
                withhold_token=True,
            )
        except httpx.HTTPError as exc:
            raise transport_error(operation, exc) from redacted_copy(exc)

    async def _get_once(self, path: str, params: Mapping[str, str]) -> httpx.Response:
        """Make one GET; on a 401 fetch a new token and re-send once.

        :param path: the configured API path.
        :param params: the query parameters.
        """
        operation = self._operation("GET", path)
        url = self._require_config().url_for(path)
        token = await self._token_value()
        response = await self._send(operation, url, token, params)
        if response.status_code == HTTP_UNAUTHORIZED:
            log.info("%s: the token was refused; re-sending once with a new token", operation)
            response = await self._send(operation, url, await self._token_value(refused=token), params)
        if response.status_code >= HTTP_ERROR_FLOOR:
            raise error_from_response(operation, response, not_found=DicomIngestOrderNotFoundError)
        return response

    async def _get(self, path: str, params: Mapping[str, str]) -> httpx.Response:
        """Make a GET under the retry policy.

        :param path: the configured API path.
        :param params: the query parameters.
        """
        await self.get_async_conn()
        return await self._retrying(self._operation("GET", path))(self._get_once, path, params)

    async def get_status(self, *, order_id: str | None = None, study_uid: str | None = None) -> OrderStatus:
        """Return an order's status, named by order id or study UID (its most recent order).

        :param order_id: the vendor's order id.
        :param study_uid: the StudyInstanceUID.
        :raises DicomIngestOrderNotFoundError: when the vendor has no such order (yet).
        """
        await self.get_async_conn()
        path = self._require_config().status_path
        response = await self._get(path, _order_query(order_id, study_uid))
        return self._order_status(self._operation("GET", path), response)

    async def order_ids(self, study_uid: str) -> list[str]:
        """Return the ids of all orders of a study, oldest first.

        :param study_uid: the StudyInstanceUID.
        :raises DicomIngestOrderNotFoundError: when the vendor knows no order of the study.
        """
        await self.get_async_conn()
        path = self._require_config().order_ids_path
        response = await self._get(path, {"study_uid": study_uid})
        return self._order_ids(self._operation("GET", path), response)

    async def get_statuses(
        self, order_ids: Iterable[str], *, concurrency: int | None = None
    ) -> dict[str, OrderStatus]:
        """Return the status of many orders, at most ``concurrency`` requests in flight.

        All requests run to completion; if any failed, the first failure (in the order given) is
        raised after the others finished.

        :param order_ids: the vendor's order ids.
        :param concurrency: the most requests at once; defaults to the connection's upload concurrency.
        :raises DicomIngestOrderNotFoundError: when the vendor has no order with one of the ids.
        """
        await self.get_async_conn()
        ids = list(dict.fromkeys(order_ids))
        slots = asyncio.Semaphore(concurrency or self._require_config().upload_concurrency)

        async def one(order_id: str) -> OrderStatus:
            async with slots:
                return await self.get_status(order_id=order_id)

        outcomes = await asyncio.gather(*(one(order_id) for order_id in ids), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return dict(zip(ids, outcomes, strict=True))
