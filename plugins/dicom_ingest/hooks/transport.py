"""Pieces shared by the sync (requests) and async (httpx) hooks that do not depend on the HTTP library.

* translation of an HTTP answer into the library's exception hierarchy,
* redaction of URLs and transport error texts (presigned URLs carry their signature in the query),
* the retry policy (tenacity), so both hooks classify and back off the same way,
* the cached bearer token and when to replace it.

Responses are duck-typed: ``requests.Response`` and ``httpx.Response`` both offer
``status_code``, case-insensitive ``headers`` and ``text``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from tenacity import RetryCallState, retry_if_exception, stop_after_attempt, wait_random_exponential
from tenacity.wait import wait_base

from dicom_ingest.exceptions import (
    TOO_MANY_REQUESTS,
    DicomIngestApiError,
    DicomIngestAuthError,
    DicomIngestError,
    DicomIngestRateLimitError,
    DicomIngestTransportError,
    DicomIngestUrlExpiredError,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from dicom_ingest.hooks.connection import DicomIngestConnectionConfig

REQUEST_ID_HEADER = "X-Request-ID"
STORE_REQUEST_ID_HEADER = "X-Amz-Request-Id"
HTTP_UNAUTHORIZED = 401
HTTP_FORBIDDEN = 403
HTTP_NOT_FOUND = 404
HTTP_ERROR_FLOOR = 400

TOKEN_REFRESH_MARGIN = 60.0
"""Replace a token this many seconds before it expires ..."""
TOKEN_REFRESH_FRACTION = 0.1
"""... or, for short-lived tokens, when less than this fraction of its lifetime is left."""

_ERROR_CODE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_BEARER_ERROR = re.compile(r'error="([^"]*)"')
_XML_CODE = re.compile(r"<Code>([^<]{1,64})</Code>")
_XML_MESSAGE = re.compile(r"<Message>([^<]{0,500})</Message>")
_EXPIRY_CODES = frozenset({"AccessDenied", "RequestTimeTooSkewed", "ExpiredToken"})
_EXPIRY_MESSAGE = re.compile(r"expired|request time", re.IGNORECASE)
_URL_QUERY = re.compile(r"\?[^\s'\"()<>]*")


class HttpResponse(Protocol):
    """The part of a ``requests`` or ``httpx`` response the translation needs."""

    status_code: int

    @property
    def headers(self) -> Mapping[str, str]:
        """Response headers, looked up case-insensitively."""
        ...

    @property
    def text(self) -> str:
        """Decoded response body."""
        ...


def redact_url(url: str) -> str:
    """Return ``url`` without its query string and fragment (where a presigned URL keeps its signature).

    :param url: any URL.
    """
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def redact_text(text: str) -> str:
    """Remove every URL query string from a free text such as a transport error message.

    :param text: the text, e.g. ``str()`` of a ``requests.ConnectionError``.
    """
    return _URL_QUERY.sub("?<redacted>", text)


def redacted_copy(exc: BaseException) -> BaseException:
    """Return an exception of the same type whose text has its URL query strings removed.

    Transport exceptions quote the request URL, which for a presigned PUT includes the signature;
    the library raises its own errors ``from`` this copy instead of the original.

    :param exc: the transport exception.
    """
    try:
        copy = type(exc)(redact_text(str(exc)))
    except Exception:
        copy = RuntimeError(f"{type(exc).__name__}: {redact_text(str(exc))}")
    copy.__suppress_context__ = True
    return copy


class QueryStringRedactor(logging.Filter):
    """Remove URL query strings from log records, e.g. urllib3's debug line of every request URL."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's message without query strings; never drop the record.

        :param record: the log record.
        """
        message = record.getMessage()
        if "?" in message:
            record.msg, record.args = redact_text(message), None
        return True


TRANSPORT_LOGGERS = ("urllib3.connectionpool",)
"""Loggers that write request URLs (a presigned URL's query is its signature)."""


def redact_transport_logs() -> None:
    """Make the transport libraries' loggers drop URL query strings (idempotent, process-wide)."""
    for name in TRANSPORT_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, QueryStringRedactor) for existing in logger.filters):
            logger.addFilter(QueryStringRedactor())


def transport_error(operation: str, exc: BaseException) -> DicomIngestTransportError:
    """Describe a failure that produced no HTTP answer (refused, dropped, timed out).

    :param operation: what was attempted, e.g. ``"GET /upload"``.
    :param exc: the transport exception; only its type name is used.
    """
    return DicomIngestTransportError(f"{operation} got no answer ({type(exc).__name__})")


def request_id_of(response: HttpResponse) -> str | None:
    """Return the vendor's or the store's request id of a response, if any.

    :param response: the HTTP response.
    """
    value = response.headers.get(REQUEST_ID_HEADER) or response.headers.get(STORE_REQUEST_ID_HEADER)
    return value if value and _ERROR_CODE.match(value) else None


def retry_after_of(response: HttpResponse) -> float | None:
    """Return the seconds a ``Retry-After`` header asks for (delta seconds or an HTTP date).

    :param response: the HTTP response.
    """
    value = (response.headers.get("Retry-After") or "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = (moment - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _safe_code(value: Any) -> str | None:
    """Keep a server-provided error code only if it looks like one (no free text echoed back)."""
    return value if isinstance(value, str) and _ERROR_CODE.match(value) else None


def error_code_of(response: HttpResponse) -> str | None:
    """Return the OAuth2-style ``error`` code of an API error answer (body or ``WWW-Authenticate``).

    :param response: the HTTP response.
    """
    try:
        body = json.loads(response.text)
    except ValueError:
        body = None
    candidates: list[Any] = []
    if isinstance(body, dict):
        detail = body.get("detail")
        candidates += [body.get("error"), detail.get("error") if isinstance(detail, dict) else None]
    if match := _BEARER_ERROR.search(response.headers.get("WWW-Authenticate", "")):
        candidates.append(match.group(1))
    return next((code for candidate in candidates if (code := _safe_code(candidate))), None)


def error_from_response(
    operation: str,
    response: HttpResponse,
    *,
    not_found: type[DicomIngestApiError] = DicomIngestApiError,
) -> DicomIngestError:
    """Translate an error answer of the vendor's API into the library's exception.

    :param operation: what was attempted, e.g. ``"GET /status"``.
    :param response: the HTTP response, status 400 or above.
    :param not_found: the exception class for a 404 (order lookups use the order-not-found error).
    """
    status = response.status_code
    details: dict[str, Any] = {
        "status_code": status,
        "request_id": request_id_of(response),
        "error_code": error_code_of(response),
    }
    if status in (HTTP_UNAUTHORIZED, HTTP_FORBIDDEN):
        return DicomIngestAuthError(f"{operation} was refused", **details)
    if status == HTTP_NOT_FOUND:
        return not_found(f"{operation} found nothing", **details)
    if status == TOO_MANY_REQUESTS:
        return DicomIngestRateLimitError(
            f"{operation} was rate limited", retry_after=retry_after_of(response), **details
        )
    return DicomIngestApiError(f"{operation} failed", retry_after=retry_after_of(response), **details)


def store_error_from_response(operation: str, response: HttpResponse) -> DicomIngestApiError:
    """Translate an error answer of the object store (S3-style XML) into the library's exception.

    An expired presigned URL is recognised from the body, not the status: AWS answers 403
    ``AccessDenied`` "Request has expired", rclone 400 ``AccessDenied`` about the request time.
    The store's message is never copied into the exception (AWS echoes the signature in some).

    :param operation: what was attempted, e.g. ``"PUT <store>/bucket/key"``.
    :param response: the HTTP response, status 400 or above.
    """
    text = response.text
    code_match = _XML_CODE.search(text)
    message_match = _XML_MESSAGE.search(text)
    code = code_match.group(1) if code_match else None
    details: dict[str, Any] = {
        "status_code": response.status_code,
        "request_id": request_id_of(response),
        "error_code": _safe_code(code),
    }
    if code in _EXPIRY_CODES and message_match and _EXPIRY_MESSAGE.search(message_match.group(1)):
        return DicomIngestUrlExpiredError(f"{operation} was refused: the presigned URL expired", **details)
    if response.status_code == TOO_MANY_REQUESTS:
        return DicomIngestRateLimitError(
            f"{operation} was rate limited", retry_after=retry_after_of(response), **details
        )
    return DicomIngestApiError(f"{operation} failed", retry_after=retry_after_of(response), **details)


def json_object_of(operation: str, response: HttpResponse) -> dict[str, Any]:
    """Return a successful answer's JSON object body.

    :param operation: what was attempted, for the error message.
    :param response: the HTTP response.
    :raises DicomIngestApiError: when the body is not a JSON object.
    """
    try:
        body = json.loads(response.text)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise DicomIngestApiError(
            f"{operation} answered with a body that is not a JSON object",
            status_code=response.status_code,
            request_id=request_id_of(response),
        )
    return body


def is_retryable(exc: BaseException) -> bool:
    """Classify an exception for the retry policy: only transient library errors are retried.

    :param exc: the exception an attempt raised.
    """
    return isinstance(exc, DicomIngestError) and exc.retryable


class WaitRetryAfterOrBackoff(wait_base):
    """Wait as the server asked (``Retry-After``, capped), not at all before a fresh URL, else back off.

    :param backoff: the strategy used when the server gave no hint.
    :param retry_after_max: the longest ``Retry-After`` honoured, in seconds.
    """

    def __init__(self, backoff: wait_base, retry_after_max: float) -> None:
        self.backoff = backoff
        self.retry_after_max = retry_after_max

    def __call__(self, retry_state: RetryCallState) -> float:
        """Return the seconds to sleep before the next attempt.

        :param retry_state: tenacity's state of the call being retried.
        """
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, DicomIngestUrlExpiredError):
            return 0.0
        if isinstance(exc, DicomIngestApiError) and exc.retry_after is not None:
            return min(exc.retry_after, self.retry_after_max)
        return self.backoff(retry_state)


def retry_arguments(
    config: DicomIngestConnectionConfig,
    operation: str,
    logger: logging.Logger,
    sleep: Callable[[float], Any],
) -> dict[str, Any]:
    """Return the keyword arguments of a tenacity ``Retrying`` / ``AsyncRetrying`` for one call.

    Connection errors, timeouts, 429 and 5xx are retried with full-jitter exponential backoff
    (``Retry-After`` honoured up to ``retry_after_max``); other answers are raised at once.

    :param config: the connection settings (retry limits and backoff).
    :param operation: what is attempted, for the log lines.
    :param logger: where ``[Try n of m]`` lines go.
    :param sleep: the sleep function (``time.sleep`` or ``asyncio.sleep``; tests pin it).
    """
    total = config.max_retries + 1

    def log_retry(retry_state: RetryCallState) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        delay = retry_state.next_action.sleep if retry_state.next_action else 0.0
        logger.warning(
            "[Try %d of %d] %s failed: %s; retrying in %.2f s",
            retry_state.attempt_number,
            total,
            operation,
            exc,
            delay,
        )

    return {
        "stop": stop_after_attempt(total),
        "wait": WaitRetryAfterOrBackoff(
            wait_random_exponential(multiplier=config.backoff_base, max=config.backoff_max),
            config.retry_after_max,
        ),
        "retry": retry_if_exception(is_retryable),
        "before_sleep": log_retry,
        "sleep": sleep,
        "reraise": True,
    }


@dataclass(frozen=True)
class IssuedToken:
    """An access token and the moment (on the hook's clock) it should be replaced.

    :param value: the bearer token.
    :param replace_at: clock reading after which the token is considered stale.
    """

    value: str = field(repr=False)
    replace_at: float

    @classmethod
    def from_response(cls, token: Mapping[str, Any], now: float) -> IssuedToken:
        """Read a token endpoint answer.

        :param token: the parsed token response (``access_token``, optional ``expires_in``).
        :param now: the current clock reading.
        :raises DicomIngestAuthError: when the answer carries no usable token.
        """
        value = token.get("access_token")
        if not isinstance(value, str) or not value:
            raise DicomIngestAuthError("The token endpoint answered without an access_token")
        try:
            lifetime = float(token.get("expires_in") or math.inf)
        except (TypeError, ValueError):
            lifetime = math.inf
        margin = min(TOKEN_REFRESH_MARGIN, lifetime * TOKEN_REFRESH_FRACTION)
        return cls(value=value, replace_at=now + lifetime - margin)

    def is_fresh(self, now: float) -> bool:
        """Tell whether the token may still be used.

        :param now: the current clock reading.
        """
        return now < self.replace_at
