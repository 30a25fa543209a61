"""Tests of the transport-independent pieces: error translation, redaction, Retry-After, token freshness."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
import requests

from dicom_ingest.exceptions import (
    DicomIngestApiError,
    DicomIngestAuthError,
    DicomIngestRateLimitError,
    DicomIngestUrlExpiredError,
)
from dicom_ingest.hooks.transport import (
    IssuedToken,
    QueryStringRedactor,
    error_from_response,
    redact_url,
    redacted_copy,
    retry_after_of,
    store_error_from_response,
)
from tests.hooks.support import SIGNATURE, presigned_url


def response(status: int, text: str = "", **headers: str) -> requests.Response:
    answer = requests.Response()
    answer.status_code = status
    answer._content = text.encode()
    answer.headers.update(headers)
    return answer


@pytest.mark.parametrize(
    ("header", "expected"),
    [("5", 5.0), ("0.5", 0.5), ("-3", 0.0), ("soon", None), ("", None), ("nan", None)],
)
def test_retry_after_in_seconds(header, expected):
    assert retry_after_of(response(429, **{"Retry-After": header})) == expected


def test_retry_after_as_http_date():
    moment = datetime.now(UTC) + timedelta(seconds=30)

    seconds = retry_after_of(response(503, **{"Retry-After": format_datetime(moment, usegmt=True)}))

    assert 25 <= seconds <= 30


def test_error_codes_are_kept_only_when_they_look_like_codes():
    free_text = response(400, '{"error": "patient DOE^JANE has no order"}', **{"X-Request-ID": "r-1"})
    bearer = response(401, "", **{"WWW-Authenticate": 'Bearer error="invalid_token", error_description="x"'})

    assert error_from_response("GET /status", free_text).error_code is None
    assert "DOE" not in str(error_from_response("GET /status", free_text))
    assert error_from_response("GET /status", bearer).error_code == "invalid_token"


@pytest.mark.parametrize(
    ("status", "error"),
    [(401, DicomIngestAuthError), (403, DicomIngestAuthError), (429, DicomIngestRateLimitError)],
)
def test_statuses_map_to_the_hierarchy(status, error):
    assert type(error_from_response("GET /upload", response(status))) is error


def test_server_errors_are_retryable_client_errors_not():
    assert error_from_response("GET /upload", response(502)).retryable
    assert not error_from_response("GET /upload", response(409)).retryable


@pytest.mark.parametrize(
    "body",
    [
        "<Error><Code>RequestTimeTooSkewed</Code><Message>The difference between the request time and the "
        "current time is too large.</Message></Error>",
        "<Error><Code>ExpiredToken</Code><Message>The provided token has expired.</Message></Error>",
    ],
)
def test_other_expiry_answers_of_s3_stores(body):
    assert isinstance(store_error_from_response("PUT x", response(403, body)), DicomIngestUrlExpiredError)


def test_access_denied_for_another_reason_is_not_expiry():
    body = "<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"

    error = store_error_from_response("PUT x", response(403, body))

    assert type(error) is DicomIngestApiError
    assert not error.retryable


def test_redaction_removes_the_query_string():
    assert redact_url(presigned_url()) == "https://store.vendor.test/bucket/incoming/obj-1.dcm"
    copy = redacted_copy(requests.ConnectionError(f"failed for url: {presigned_url()} (reset)"))
    assert isinstance(copy, requests.ConnectionError)
    assert SIGNATURE not in str(copy)
    assert "(reset)" in str(copy)


def test_transport_log_lines_lose_their_query_string():
    record = logging.LogRecord(
        "urllib3.connectionpool",
        logging.DEBUG,
        __file__,
        1,
        '"%s %s HTTP/1.1" %s',
        ("PUT", presigned_url(), 200),
        None,
    )

    assert QueryStringRedactor().filter(record)

    assert SIGNATURE not in record.getMessage()
    assert record.getMessage().startswith(
        '"PUT https://store.vendor.test/bucket/incoming/obj-1.dcm?<redacted>'
    )


@pytest.mark.parametrize(("expires_in", "fresh_until"), [(3600, 3540), (100, 90)])
def test_tokens_are_replaced_a_margin_before_expiry(expires_in, fresh_until):
    token = IssuedToken.from_response({"access_token": "tok-value-123", "expires_in": expires_in}, now=0.0)

    assert token.replace_at == fresh_until
    assert token.is_fresh(fresh_until - 1) and not token.is_fresh(fresh_until)
    assert "tok-value-123" not in repr(token)


def test_token_without_expiry_is_kept_until_refused():
    token = IssuedToken.from_response({"access_token": "tok-value-123"}, now=0.0)

    assert token.is_fresh(10**12)


def test_token_answer_without_access_token_is_an_auth_error():
    with pytest.raises(DicomIngestAuthError):
        IssuedToken.from_response({"token_type": "Bearer"}, now=0.0)
