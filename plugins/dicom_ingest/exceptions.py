"""Exceptions raised by the DICOM ingest library.

Every error that crosses the library's boundary is a :class:`DicomIngestError`. Transport
failures are translated at one place (the hooks) and raised ``from`` the transport error (a copy
of it whose text has URL query strings removed), so callers never handle a raw ``requests`` or
``httpx`` exception. The text of these exceptions
never contains a token, the client secret, a presigned URL's query string or any DICOM tag
value other than UIDs.
"""

from __future__ import annotations

RETRYABLE_STATUS_FLOOR = 500
"""HTTP statuses from this value up are server-side failures worth retrying."""

TOO_MANY_REQUESTS = 429


class DicomIngestError(Exception):
    """Base class of every error raised by the DICOM ingest library.

    :param message: a description free of secrets and PHI.
    :param status_code: the HTTP status that caused the error, if any.
    :param request_id: the vendor's ``X-Request-ID`` of the failed call, if any.
    :param error_code: the machine-readable error code from the response body, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        request_id: str | None = None,
        error_code: str | None = None,
    ) -> None:
        self.message = message
        self.status_code = status_code
        self.request_id = request_id
        self.error_code = error_code
        super().__init__(message)

    def __str__(self) -> str:
        details = [
            f"{label} {value}"
            for label, value in (
                ("HTTP", self.status_code),
                ("error", self.error_code),
                ("request id", self.request_id),
            )
            if value is not None
        ]
        return f"{self.message} ({', '.join(details)})" if details else self.message

    @property
    def retryable(self) -> bool:
        """Whether repeating the same call may succeed."""
        return False


class DicomIngestConfigError(DicomIngestError):
    """The connection or the arguments given to the library are invalid."""


class DicomIngestAuthError(DicomIngestError):
    """The vendor refused the credentials or the token (bad secret, revoked token, missing scope)."""


class DicomIngestApiError(DicomIngestError):
    """A call to the vendor's API or object store failed, or its answer made no sense.

    :param retry_after: seconds the server asked the client to wait, from ``Retry-After``.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        request_id: str | None = None,
        error_code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code, request_id=request_id, error_code=error_code)
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """Whether the failure is transient: 429 or a server error."""
        return self.status_code is not None and (
            self.status_code == TOO_MANY_REQUESTS or self.status_code >= RETRYABLE_STATUS_FLOOR
        )


class DicomIngestTransportError(DicomIngestApiError):
    """A request got no HTTP answer: connection refused or dropped, or a timeout."""

    @property
    def retryable(self) -> bool:
        """Whether a new attempt may succeed: always."""
        return True


class DicomIngestRateLimitError(DicomIngestApiError):
    """The vendor answered 429 Too Many Requests; ``retry_after`` says how long to wait, if known."""


class DicomIngestOrderNotFoundError(DicomIngestApiError):
    """No order matches the given order id or study UID (yet).

    The vendor files instances into orders asynchronously, so right after the last upload this is
    expected for a while; the caller decides how long to keep asking.
    """


class DicomIngestIntegrityError(DicomIngestError):
    """What the store received differs from what was sent (ETag is not the MD5 of the stream).

    :param expected_md5: hex MD5 of the bytes the client sent.
    :param etag: the ETag the store answered with, without quotes (``None`` if missing).
    """

    def __init__(self, message: str, *, expected_md5: str, etag: str | None) -> None:
        super().__init__(message)
        self.expected_md5 = expected_md5
        self.etag = etag


class DicomIngestUrlExpiredError(DicomIngestApiError):
    """The store refused a presigned URL because it expired; a fresh URL is needed, not a retry."""

    @property
    def retryable(self) -> bool:
        """Whether a new attempt (with a freshly presigned URL) may succeed: always."""
        return True
