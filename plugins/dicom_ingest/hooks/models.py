"""Values the DICOM ingest hooks return: a presigned URL, an upload result and an order status."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from dicom_ingest.exceptions import DicomIngestApiError
from dicom_ingest.hooks.transport import redact_url

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

URL_EXPIRY_MARGIN = 1.0
"""Seconds before its stated expiry that a presigned URL is no longer used for a new attempt."""


def _optional_number(value: Any) -> float | None:
    """Return ``value`` as a float when it is a number (or a numeric string), else ``None``."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class PresignedUrl:
    """A write-only, time-limited URL for one instance, as ``GET /upload`` returned it.

    The URL itself (whose query string is the signature) is left out of ``repr``; log
    :attr:`redacted_url` instead.

    :param url: the presigned PUT URL.
    :param key: the object key the URL writes (from the answer, else from the URL's path).
    :param expires_in: the URL's stated lifetime in seconds, if the answer gave one.
    :param issued_at: the hook's clock reading when the URL was received.
    """

    url: str = field(repr=False)
    key: str
    expires_in: float | None = None
    issued_at: float = field(default=0.0, repr=False)

    @classmethod
    def from_response(
        cls, body: Mapping[str, Any], *, issued_at: float, operation: str, request_id: str | None = None
    ) -> PresignedUrl:
        """Parse a ``GET /upload`` answer tolerantly: only ``url`` is required.

        :param body: the parsed JSON object.
        :param issued_at: the hook's clock reading at receipt.
        :param operation: the call that answered, for the error message.
        :param request_id: the answer's request id, for the error message.
        :raises DicomIngestApiError: when the answer has no usable ``url``.
        """
        url = body.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise DicomIngestApiError(f"{operation} answered without a presigned url", request_id=request_id)
        key = body.get("key")
        if not isinstance(key, str) or not key:
            key = unquote(urlsplit(url).path).lstrip("/")
        return cls(url=url, key=key, expires_in=_optional_number(body.get("expires_in")), issued_at=issued_at)

    @property
    def redacted_url(self) -> str:
        """The URL without its query string (safe to log)."""
        return redact_url(self.url)

    def is_usable(self, now: float) -> bool:
        """Tell whether a new attempt may still use this URL.

        :param now: the hook's current clock reading.
        """
        if self.expires_in is None:
            return True
        return now < self.issued_at + self.expires_in - URL_EXPIRY_MARGIN


@dataclass(frozen=True)
class UploadResult:
    """What one instance upload achieved; small and free of URLs, safe to keep or report.

    :param key: the object key the instance was stored under.
    :param size: bytes sent.
    :param md5: hex MD5 of the bytes sent.
    :param etag: the store's ETag (unquoted), equal to ``md5``.
    :param attempts: PUT attempts made, 1 when the first one succeeded.
    :param seconds: wall time of the whole upload including retries.
    """

    key: str
    size: int
    md5: str
    etag: str
    attempts: int
    seconds: float


@dataclass(frozen=True)
class OrderStatus:
    """The state of one vendor order, with ``is_done`` / ``is_failed`` from the connection's status words.

    :param order_id: the vendor's order id.
    :param study_uid: the StudyInstanceUID the order collects.
    :param status: the vendor's status word, e.g. ``UPLOADING``, ``DX_STARTED``, ``DELIVERED``.
    :param instances_received: instances the vendor filed under the order.
    :param metadata_complete: whether the order has all required metadata.
    :param reason: the vendor's reason code for a failure, if any.
    :param created_at: when the order opened (as the vendor wrote it).
    :param updated_at: when the order last changed (as the vendor wrote it).
    :param is_done: the status is one of the connection's done words.
    :param is_failed: the status is one of the connection's failed words.
    """

    order_id: str | None
    study_uid: str | None
    status: str
    instances_received: int | None = None
    metadata_complete: bool | None = None
    reason: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    is_done: bool = False
    is_failed: bool = False

    @classmethod
    def from_response(
        cls,
        body: Mapping[str, Any],
        *,
        done_statuses: Iterable[str],
        failed_statuses: Iterable[str],
        operation: str,
        request_id: str | None = None,
    ) -> OrderStatus:
        """Parse a ``GET /status`` answer; only ``status`` is required.

        :param body: the parsed JSON object.
        :param done_statuses: status words meaning the order is complete.
        :param failed_statuses: status words meaning the order failed.
        :param operation: the call that answered, for the error message.
        :param request_id: the answer's request id, for the error message.
        :raises DicomIngestApiError: when the answer has no status word.
        """
        status = body.get("status")
        if not isinstance(status, str) or not status:
            raise DicomIngestApiError(f"{operation} answered without a status", request_id=request_id)
        word = status.upper()
        received = _optional_number(body.get("instances_received"))
        complete = body.get("metadata_complete")
        return cls(
            order_id=_optional_text(body.get("order_id")),
            study_uid=_optional_text(body.get("study_uid")),
            status=status,
            instances_received=None if received is None else int(received),
            metadata_complete=complete if isinstance(complete, bool) else None,
            reason=_optional_text(body.get("reason")),
            created_at=_optional_text(body.get("created_at")),
            updated_at=_optional_text(body.get("updated_at")),
            is_done=word in done_statuses,
            is_failed=word in failed_statuses,
        )


def _optional_text(value: Any) -> str | None:
    """Return ``value`` as text when present, else ``None``."""
    return None if value is None else str(value)


def order_ids_from_response(
    body: Mapping[str, Any], *, operation: str, request_id: str | None = None
) -> list[str]:
    """Parse a ``GET /orderId`` answer: ``{"study_uid": ..., "order_ids": [...]}``, oldest first.

    :param body: the parsed JSON object.
    :param operation: the call that answered, for the error message.
    :param request_id: the answer's request id, for the error message.
    :raises DicomIngestApiError: when ``order_ids`` is missing or not a list.
    """
    order_ids = body.get("order_ids")
    if not isinstance(order_ids, list):
        raise DicomIngestApiError(f"{operation} answered without an order_ids list", request_id=request_id)
    return [str(order_id) for order_id in order_ids]
