"""Unit tests of DicomIngestHook with the transport mocked by ``responses``."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses
from airflow.sdk import ObjectStoragePath

from dicom_ingest.exceptions import (
    DicomIngestApiError,
    DicomIngestAuthError,
    DicomIngestError,
    DicomIngestIntegrityError,
    DicomIngestOrderNotFoundError,
    DicomIngestRateLimitError,
    DicomIngestTransportError,
)
from tests.hooks.fake_vendor import FakeVendor, bearer_of, json_answer, query_of
from tests.hooks.support import API, CLIENT_ID, CLIENT_SECRET, SIGNATURE, STORE, presigned_url

STATUS_BODY = {
    "order_id": "ord-1",
    "study_uid": "1.2.826.0.1.3680043.8.498.1",
    "status": "DELIVERED",
    "instances_received": 3,
    "metadata_complete": True,
    "reason": None,
    "created_at": "2026-11-28T00:00:00Z",
    "updated_at": "2026-11-28T00:05:00Z",
}
RCLONE_EXPIRED = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>The difference between '
    "the request time and the server&#39;s time exceeds the maximum allowed.</Message></Error>"
)
AWS_EXPIRED = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Request has expired'
    "</Message><X-Amz-Expires>900</X-Amz-Expires><Expires>2026-11-28T00:15:00Z</Expires>"
    "<ServerTime>2026-11-28T01:00:00Z</ServerTime><RequestId>R1</RequestId></Error>"
)
AWS_BAD_SIGNATURE = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SignatureDoesNotMatch</Code><Message>The request '
    "signature we calculated does not match the signature you provided.</Message>"
    f"<SignatureProvided>{SIGNATURE}</SignatureProvided><StringToSign>AWS4-HMAC-SHA256</StringToSign></Error>"
)


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def vendor(mocked: responses.RequestsMock) -> FakeVendor:
    return FakeVendor(mocked)


def serve_presign(vendor: FakeVendor, *urls: str) -> None:
    """Answer ``GET /upload`` with the given presigned URLs in turn."""
    vendor.answers("GET", "/upload", *(json_answer(200, {"url": url, "expires_in": 900}) for url in urls))


def serve_store(mocked: responses.RequestsMock, url: str, *answers: tuple[int, dict[str, str], str]) -> list:
    """Answer PUTs to ``url`` (query ignored) in turn and return the received bodies."""
    bodies: list[bytes] = []
    remaining = list(answers)

    def put(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        bodies.append(request.body)
        return remaining.pop(0) if len(remaining) > 1 else remaining[0]

    mocked.add_callback("PUT", url.split("?")[0], callback=put)
    return bodies


def etag_answer(data: bytes) -> tuple[int, dict[str, str], str]:
    return 200, {"ETag": f'"{hashlib.md5(data).hexdigest()}"'}, ""


def assert_no_secrets(text: str, vendor: FakeVendor | None = None) -> None:
    """Fail when ``text`` contains the client secret, the signature or any issued token."""
    assert CLIENT_SECRET not in text
    assert SIGNATURE not in text
    for token in vendor.issued if vendor else []:
        assert token not in text


def error_texts(exc: BaseException) -> str:
    """Return the text of an exception and of every exception in its chain."""
    texts = []
    current: BaseException | None = exc
    while current is not None:
        texts.append(f"{current!s} {current!r}")
        current = current.__cause__ or current.__context__
    return "\n".join(texts)


# -- tokens ---------------------------------------------------------------------------------------


def test_token_is_fetched_by_get_with_basic_credentials(make_hook, vendor):
    vendor.answers("GET", "/status", json_answer(200, STATUS_BODY))
    hook = make_hook(scope="read metadata")

    status = hook.get_status(order_id="ord-1")

    assert status.is_done and not status.is_failed
    (token_request,) = vendor.token_requests
    assert token_request.method == "GET"
    assert parse_qs(token_request.url.split("?", 1)[1]) == {
        "grant_type": ["client_credentials"],
        "scope": ["read metadata"],
    }
    basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    assert token_request.headers["Authorization"] == f"Basic {basic}"
    (status_request,) = vendor.requests_to("/status")
    assert bearer_of(status_request) == vendor.issued[0]
    assert query_of(status_request) == {"order_id": ["ord-1"]}


def test_token_is_fetched_by_post_form_when_configured(make_hook, vendor):
    vendor.answers("GET", "/status", json_answer(200, STATUS_BODY))
    hook = make_hook(token_method="post")

    hook.get_status(study_uid="1.2.3")

    (token_request,) = vendor.token_requests
    assert token_request.method == "POST"
    assert "?" not in token_request.url
    assert parse_qs(token_request.body) == {"grant_type": ["client_credentials"]}
    assert token_request.headers["Authorization"].startswith("Basic ")


def test_token_url_extra_is_used(make_hook, mocked):
    custom = "https://auth.vendor.test/auth/token"
    mocked.get(custom, json={"access_token": "tok-custom-0123456789", "expires_in": 3600})
    mocked.get(f"{API}/test-token", json={"ok": True})
    hook = make_hook(token_url=custom)

    assert hook.test_connection() == (True, "Connection successfully tested")
    assert mocked.calls[1].request.headers["Authorization"] == "Bearer tok-custom-0123456789"


def test_token_is_cached_across_calls(make_hook, vendor):
    vendor.answers("GET", "/status", json_answer(200, STATUS_BODY))
    vendor.answers("GET", "/orderId", json_answer(200, {"study_uid": "1.2.3", "order_ids": ["a", "b"]}))
    hook = make_hook()

    hook.get_status(order_id="ord-1")
    assert hook.order_ids("1.2.3") == ["a", "b"]
    hook.get_status(order_id="ord-1")

    assert len(vendor.token_requests) == 1
    assert {bearer_of(request) for request in vendor.api_requests} == {vendor.issued[0]}


def test_token_is_refreshed_shortly_before_expiry(make_hook, vendor, clock):
    vendor.answers("GET", "/status", json_answer(200, STATUS_BODY))
    hook = make_hook()
    hook.get_status(order_id="ord-1")

    clock.advance(3600 - 61)  # more than the 60 s margin left: still used
    hook.get_status(order_id="ord-1")
    assert len(vendor.token_requests) == 1

    clock.advance(2)  # less than 60 s left: replaced before the API could refuse it
    hook.get_status(order_id="ord-1")
    assert len(vendor.token_requests) == 2
    assert bearer_of(vendor.api_requests[-1]) == vendor.issued[1]
    assert all(request.headers.get("Authorization") != "" for request in vendor.api_requests)


def test_a_401_fetches_one_new_token_and_resends_once(make_hook, vendor):
    vendor.answers("GET", "/status", json_answer(200, STATUS_BODY))
    hook = make_hook()
    hook.get_status(order_id="ord-1")
    vendor.revoke_all()

    status = hook.get_status(order_id="ord-1")

    assert status.order_id == "ord-1"
    assert len(vendor.token_requests) == 2
    _before_revocation, refused, resent = vendor.requests_to("/status")
    assert bearer_of(refused) == vendor.issued[0]
    assert bearer_of(resent) == vendor.issued[1]


def test_repeated_401_raises_auth_error_after_one_resend(make_hook, vendor, sleeps):
    vendor.api(
        "GET",
        "/status",
        lambda request: (401, {"WWW-Authenticate": 'Bearer error="invalid_token"'}, ""),
    )
    hook = make_hook()

    with pytest.raises(DicomIngestAuthError) as caught:
        hook.get_status(order_id="ord-1")

    assert caught.value.status_code == 401
    assert caught.value.error_code == "invalid_token"
    assert len(vendor.requests_to("/status")) == 2
    assert len(vendor.token_requests) == 2
    assert sleeps.delays == []
    assert_no_secrets(error_texts(caught.value), vendor)


def test_insufficient_scope_is_an_auth_error_without_retry(make_hook, vendor):
    vendor.answers(
        "GET", "/upload", json_answer(403, {"error": "insufficient_scope"}, **{"X-Request-ID": "r-9"})
    )
    hook = make_hook()

    with pytest.raises(DicomIngestAuthError) as caught:
        hook.presign()

    assert (caught.value.status_code, caught.value.error_code, caught.value.request_id) == (
        403,
        "insufficient_scope",
        "r-9",
    )
    assert len(vendor.requests_to("/upload")) == 1


def test_bad_secret_fails_test_connection_without_revealing_it(make_hook, mocked):
    mocked.get(f"{API}/oauth2/token", status=401, json={"error": "invalid_client"})
    hook = make_hook(password="wrong-secret-value-123")

    ok, message = hook.test_connection()

    assert not ok
    assert "invalid_client" in message
    assert "wrong-secret-value-123" not in message
    assert len(mocked.calls) == 1


def test_test_connection_checks_the_token(make_hook, vendor):
    vendor.answers("GET", "/test-token", json_answer(200, {"valid": True}))
    hook = make_hook()

    assert hook.test_connection() == (True, "Connection successfully tested")
    assert bearer_of(vendor.requests_to("/test-token")[0]) == vendor.issued[0]


def test_many_threads_finding_no_token_fetch_it_once(make_hook, mocked):
    vendor = FakeVendor(mocked, token_delay=0.05)
    vendor.answers("GET", "/status", json_answer(200, STATUS_BODY))
    hook = make_hook()

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda _: hook.get_status(order_id="ord-1"), range(32)))

    assert len(vendor.token_requests) == 1


def test_many_threads_refused_at_once_refresh_once(make_hook, mocked):
    vendor = FakeVendor(mocked, token_delay=0.05)
    vendor.answers("GET", "/status", json_answer(200, STATUS_BODY))
    hook = make_hook()
    hook.get_status(order_id="ord-1")
    vendor.revoke_all()

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda _: hook.get_status(order_id="ord-1"), range(32)))

    assert len(vendor.token_requests) == 2


# -- retry classification -------------------------------------------------------------------------


def test_503_is_retried_with_backoff(make_hook, vendor, sleeps, caplog):
    vendor.answers(
        "GET", "/status", json_answer(503, {"error": "unavailable"}), json_answer(200, STATUS_BODY)
    )
    hook = make_hook(backoff_base=0.25, backoff_max=4)

    with caplog.at_level(logging.WARNING):
        status = hook.get_status(order_id="ord-1")

    assert status.status == "DELIVERED"
    assert len(vendor.requests_to("/status")) == 2
    (delay,) = sleeps.delays
    assert 0 <= delay <= 0.5  # first step of full-jitter backoff: up to base * 2
    assert "[Try 1 of 6] GET /status failed" in caplog.text
    assert_no_secrets(caplog.text, vendor)


def test_429_honours_retry_after(make_hook, vendor, sleeps):
    vendor.answers(
        "GET",
        "/status",
        json_answer(429, {"error": "slow_down"}, **{"Retry-After": "7"}),
        json_answer(200, STATUS_BODY),
    )
    hook = make_hook()

    hook.get_status(order_id="ord-1")

    assert sleeps.delays == [7.0]


def test_retry_after_is_capped(make_hook, vendor, sleeps):
    vendor.answers(
        "GET", "/status", json_answer(429, {}, **{"Retry-After": "3600"}), json_answer(200, STATUS_BODY)
    )
    hook = make_hook(retry_after_max=12)

    hook.get_status(order_id="ord-1")

    assert sleeps.delays == [12.0]


def test_retries_stop_after_the_configured_limit(make_hook, vendor, sleeps):
    vendor.answers("GET", "/status", json_answer(429, {}, **{"Retry-After": "1"}))
    hook = make_hook(max_retries=3)

    with pytest.raises(DicomIngestRateLimitError) as caught:
        hook.get_status(order_id="ord-1")

    assert caught.value.retry_after == 1.0
    assert len(vendor.requests_to("/status")) == 4
    assert sleeps.delays == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("status", "path", "call", "error"),
    [
        (400, "/upload", lambda hook: hook.presign(), DicomIngestApiError),
        (404, "/status", lambda hook: hook.get_status(order_id="nope"), DicomIngestOrderNotFoundError),
        (404, "/orderId", lambda hook: hook.order_ids("1.2.3"), DicomIngestOrderNotFoundError),
        (
            404,
            "/add-metadata",
            lambda hook: hook.add_metadata(order_id="nope", metadata={"patient_age": 40}),
            DicomIngestOrderNotFoundError,
        ),
        (
            422,
            "/add-metadata",
            lambda hook: hook.add_metadata(study_uid="1.2", metadata={}),
            DicomIngestApiError,
        ),
    ],
)
def test_other_4xx_are_not_retried(make_hook, vendor, sleeps, status, path, call, error):
    method = "PATCH" if path == "/add-metadata" else "GET"
    vendor.answers(method, path, json_answer(status, {"error": "order_not_found"}, **{"X-Request-ID": "r-7"}))
    hook = make_hook()

    with pytest.raises(error) as caught:
        call(hook)

    assert type(caught.value) is error
    assert caught.value.status_code == status
    assert caught.value.request_id == "r-7"
    assert not caught.value.retryable
    assert len(vendor.requests_to(path)) == 1
    assert sleeps.delays == []


def test_connection_errors_are_retried_and_reported_without_the_url(make_hook, vendor, mocked, sleeps):
    vendor.answers("GET", "/status", json_answer(200, STATUS_BODY))
    failure = requests.ConnectionError(f"Max retries exceeded with url: /status?token={SIGNATURE} (refused)")
    mocked.add("GET", f"{API}/orderId", body=failure)
    hook = make_hook(max_retries=2)

    with pytest.raises(DicomIngestTransportError) as caught:
        hook.order_ids("1.2.3")

    assert caught.value.status_code is None and caught.value.retryable
    assert len(sleeps.delays) == 2
    assert isinstance(caught.value.__cause__, requests.ConnectionError)
    assert_no_secrets(error_texts(caught.value), vendor)


def test_malformed_json_is_an_api_error_not_retried(make_hook, vendor, sleeps):
    vendor.answers("GET", "/status", (200, {"Content-Type": "application/json"}, "{not json"))
    hook = make_hook()

    with pytest.raises(DicomIngestApiError, match="not a JSON object"):
        hook.get_status(order_id="ord-1")

    assert len(vendor.requests_to("/status")) == 1
    assert sleeps.delays == []


def test_status_without_a_status_word_is_an_api_error(make_hook, vendor):
    vendor.answers("GET", "/status", json_answer(200, {"order_id": "ord-1"}))

    with pytest.raises(DicomIngestApiError, match="without a status"):
        make_hook().get_status(order_id="ord-1")


def test_token_answer_that_is_not_json_is_an_api_error(make_hook, mocked):
    mocked.get(f"{API}/oauth2/token", body="<html>gateway</html>", status=200)
    hook = make_hook()

    with pytest.raises(DicomIngestApiError, match="not JSON"):
        hook.get_status(order_id="ord-1")


def test_token_endpoint_503_is_retried(make_hook, mocked, sleeps):
    mocked.get(f"{API}/oauth2/token", status=503, json={"error": "unavailable"})
    mocked.get(f"{API}/oauth2/token", json={"access_token": "tok-after-503-0123456789", "expires_in": 60})
    mocked.get(f"{API}/status", json=STATUS_BODY)
    hook = make_hook()

    assert hook.get_status(order_id="ord-1").status == "DELIVERED"
    assert len(sleeps.delays) == 1


# -- presign and upload ---------------------------------------------------------------------------


def test_presign_parses_tolerantly(make_hook, vendor):
    url = presigned_url("incoming/a%20b.dcm")
    vendor.answers("GET", "/upload", json_answer(200, {"url": url}))
    hook = make_hook()

    target = hook.presign()

    assert target.url == url
    assert target.key == "bucket/incoming/a b.dcm"
    assert target.expires_in is None
    assert SIGNATURE not in repr(target)
    assert target.redacted_url == f"{STORE}/bucket/incoming/a%20b.dcm"


def test_presign_without_url_is_an_api_error(make_hook, vendor, sleeps):
    vendor.answers("GET", "/upload", json_answer(200, {"key": "k", "expires_in": 900}))

    with pytest.raises(DicomIngestApiError, match="without a presigned url"):
        make_hook().presign()

    assert sleeps.delays == []


def test_upload_streams_with_content_type_and_checks_etag(make_hook, vendor, mocked, tmp_path):
    data = b"DICM" + bytes(range(256)) * 40
    path = tmp_path / "instance.dcm"
    path.write_bytes(data)
    url = presigned_url()
    vendor.answers(
        "GET", "/upload", json_answer(200, {"url": url, "key": "incoming/obj-1.dcm", "expires_in": 900})
    )
    bodies = serve_store(mocked, url, etag_answer(data))
    hook = make_hook()

    result = hook.upload_instance(path)

    assert bodies == [data]
    put = next(call.request for call in mocked.calls if call.request.method == "PUT")
    assert put.headers["Content-Type"] == "application/dicom"
    assert put.headers["Content-Length"] == str(len(data))
    assert "Authorization" not in put.headers
    assert put.url == url
    assert (result.key, result.size, result.md5, result.etag, result.attempts) == (
        "incoming/obj-1.dcm",
        len(data),
        hashlib.md5(data).hexdigest(),
        hashlib.md5(data).hexdigest(),
        1,
    )
    assert SIGNATURE not in repr(result)
    assert SIGNATURE not in json.dumps(dataclasses.asdict(result))


def test_proxy_settings_are_read_from_the_environment_once_per_origin(make_hook, vendor, mocked, monkeypatch):
    proxy = "http://proxy.hospital.invalid:3128"
    monkeypatch.setenv("HTTPS_PROXY", proxy)
    monkeypatch.setenv("NO_PROXY", urlsplit(STORE).hostname)
    scanned: list[str] = []
    scan = requests.sessions.get_environ_proxies

    def counting_scan(url: str, no_proxy: str | None = None) -> dict[str, str]:
        scanned.append(urlsplit(url).netloc)
        return scan(url, no_proxy=no_proxy)

    monkeypatch.setattr(requests.sessions, "get_environ_proxies", counting_scan)
    data = b"DICM" + b"\0" * 100
    urls = [presigned_url(f"incoming/obj-{number}.dcm") for number in range(3)]
    serve_presign(vendor, *urls)
    for url in urls:
        serve_store(mocked, url, etag_answer(data))
    hook = make_hook()

    for _ in urls:
        hook.upload_instance(io.BytesIO(data))

    assert sorted(scanned) == sorted({urlsplit(API).netloc, urlsplit(STORE).netloc})
    session = hook.get_conn()
    api_settings = session.merge_environment_settings(f"{API}/upload", {}, None, None, None)
    api_settings["proxies"].clear()  # a caller changing its copy does not change the next answer
    assert (
        session.merge_environment_settings(f"{API}/upload", {}, None, None, None)["proxies"]["https"] == proxy
    )
    assert "https" not in session.merge_environment_settings(urls[0], {}, None, None, None)["proxies"]
    assert len(scanned) == 2


def test_upload_from_a_file_object_sends_from_its_position(make_hook, vendor, mocked):
    data = b"preamble-" + b"DICM-body" * 100
    stream = io.BytesIO(data)
    stream.seek(9)
    url = presigned_url()
    serve_presign(vendor, url)
    bodies = serve_store(mocked, url, (503, {}, ""), etag_answer(data[9:]))

    result = make_hook().upload_instance(stream)

    assert bodies == [data[9:], data[9:]]  # the retry starts again from the instance's start
    assert result.attempts == 2
    assert result.md5 == hashlib.md5(data[9:]).hexdigest()
    assert not stream.closed


def test_upload_with_explicit_size_sends_only_that_many_bytes(make_hook, vendor, mocked):
    data = b"x" * 1000
    url = presigned_url()
    serve_presign(vendor, url)
    bodies = serve_store(mocked, url, etag_answer(data[:100]))

    result = make_hook().upload_instance(io.BytesIO(data), size=100)

    assert bodies == [data[:100]]
    assert result.size == 100


def test_upload_from_object_storage_path(make_hook, vendor, mocked, tmp_path):
    data = b"DICM" * 500
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "one.dcm").write_bytes(data)
    url = presigned_url()
    serve_presign(vendor, url)
    bodies = serve_store(mocked, url, etag_answer(data))

    result = make_hook().upload_instance(ObjectStoragePath(f"file://{tmp_path}/study/one.dcm"))

    assert bodies == [data]
    assert result.size == len(data)


def test_put_503_is_retried_on_the_same_url(make_hook, vendor, mocked, sleeps):
    data = b"DICM-same-url"
    url = presigned_url()
    serve_presign(vendor, url)
    serve_store(mocked, url, (503, {}, ""), etag_answer(data))

    result = make_hook().upload_instance(io.BytesIO(data))

    assert result.attempts == 2
    assert len(vendor.requests_to("/upload")) == 1
    assert len(sleeps.delays) == 1


def test_source_shorter_than_its_size_fails_at_once(make_hook, vendor, mocked, sleeps):
    url = presigned_url()
    serve_presign(vendor, url)
    serve_store(mocked, url, etag_answer(b"DICM"))

    with pytest.raises(DicomIngestIntegrityError, match="ended after 4 of 10 bytes"):
        make_hook().upload_instance(io.BytesIO(b"DICM"), size=10)

    assert sleeps.delays == []


def test_put_is_not_retried_from_a_stream_that_cannot_seek(make_hook, vendor, mocked):
    class OneWayStream(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self._data = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            chunk = self._data.read(len(buffer))
            buffer[: len(chunk)] = chunk
            return len(chunk)

    url = presigned_url()
    serve_presign(vendor, url)
    bodies = serve_store(mocked, url, (503, {}, ""))

    with pytest.raises(DicomIngestError, match="cannot seek"):
        make_hook().upload_instance(OneWayStream(b"DICM-once"), size=9)

    assert len(bodies) == 1


@pytest.mark.parametrize(
    ("status", "body"), [(400, RCLONE_EXPIRED), (403, AWS_EXPIRED)], ids=["rclone", "aws"]
)
def test_expired_url_gets_a_fresh_presign(make_hook, vendor, mocked, sleeps, status, body):
    data = b"DICM-expired-once"
    dead, fresh = presigned_url("incoming/dead.dcm"), presigned_url("incoming/fresh.dcm")
    serve_presign(vendor, dead, fresh)
    dead_bodies = serve_store(mocked, dead, (status, {"Content-Type": "application/xml"}, body))
    fresh_bodies = serve_store(mocked, fresh, etag_answer(data))

    result = make_hook().upload_instance(io.BytesIO(data))

    assert (len(dead_bodies), len(fresh_bodies)) == (1, 1)
    assert len(vendor.requests_to("/upload")) == 2
    assert result.key == "bucket/incoming/fresh.dcm"
    assert result.attempts == 2
    assert sleeps.delays == [0.0]


def test_url_past_its_stated_expiry_is_not_reused(make_hook, vendor, mocked, clock):
    data = b"DICM-slow"
    first, second = presigned_url("incoming/first.dcm"), presigned_url("incoming/second.dcm")
    serve_presign(vendor, first, second)
    hook = make_hook()

    def put_slowly(request):
        clock.advance(901)  # the URL (expires_in 900) runs out while this attempt fails
        return 503, {}, ""

    mocked.add_callback("PUT", first.split("?")[0], callback=put_slowly)
    serve_store(mocked, second, etag_answer(data))

    assert hook.upload_instance(io.BytesIO(data)).key == "bucket/incoming/second.dcm"


def test_signature_mismatch_is_not_retried_and_not_echoed(make_hook, vendor, mocked, sleeps):
    url = presigned_url()
    serve_presign(vendor, url)
    serve_store(mocked, url, (403, {"X-Amz-Request-Id": "S3REQ1"}, AWS_BAD_SIGNATURE))

    with pytest.raises(DicomIngestApiError) as caught:
        make_hook().upload_instance(io.BytesIO(b"DICM"))

    assert (caught.value.status_code, caught.value.error_code, caught.value.request_id) == (
        403,
        "SignatureDoesNotMatch",
        "S3REQ1",
    )
    assert sleeps.delays == []
    assert_no_secrets(error_texts(caught.value), vendor)


def test_etag_mismatch_is_an_integrity_error(make_hook, vendor, mocked):
    url = presigned_url()
    serve_presign(vendor, url)
    serve_store(mocked, url, (200, {"ETag": '"00000000000000000000000000000000"'}, ""))

    with pytest.raises(DicomIngestIntegrityError) as caught:
        make_hook().upload_instance(io.BytesIO(b"DICM-payload"))

    assert caught.value.expected_md5 == hashlib.md5(b"DICM-payload").hexdigest()
    assert caught.value.etag == "00000000000000000000000000000000"


def test_missing_etag_is_an_integrity_error(make_hook, vendor, mocked):
    url = presigned_url()
    serve_presign(vendor, url)
    serve_store(mocked, url, (200, {}, ""))

    with pytest.raises(DicomIngestIntegrityError):
        make_hook().upload_instance(io.BytesIO(b"DICM-payload"))


def test_put_connection_error_never_reveals_the_signature(make_hook, vendor, mocked, caplog):
    url = presigned_url()
    serve_presign(vendor, url)
    mocked.add("PUT", url.split("?")[0], body=requests.ConnectionError(f"Connection aborted for url: {url}"))
    hook = make_hook(max_retries=1)

    with caplog.at_level(logging.DEBUG), pytest.raises(DicomIngestTransportError) as caught:
        hook.upload_instance(io.BytesIO(b"DICM"))

    assert caught.value.status_code is None
    assert "store.vendor.test/bucket/incoming/obj-1.dcm" in str(caught.value)
    assert_no_secrets(error_texts(caught.value), vendor)
    assert_no_secrets(caplog.text, vendor)


def test_put_concurrency_is_capped(make_hook, vendor, mocked):
    serve_presign(vendor, presigned_url())
    in_flight = peak = 0
    lock = threading.Lock()
    data = b"DICM-concurrent"

    def put(request):
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        threading.Event().wait(0.02)
        with lock:
            in_flight -= 1
        return etag_answer(data)

    mocked.add_callback("PUT", presigned_url().split("?")[0], callback=put)
    hook = make_hook(upload_concurrency=3)

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda _: hook.upload_instance(io.BytesIO(data)), range(24)))

    assert len(results) == 24
    assert peak == 3


def test_presigning_ahead_asks_for_each_url_once_while_uploads_are_sending(make_hook, vendor, mocked):
    urls = [presigned_url(f"incoming/obj-{n}.dcm") for n in range(1, 7)]
    serve_presign(vendor, *urls)
    data = b"DICM-ahead"
    for url in urls:
        serve_store(mocked, url, etag_answer(data))
    hook = make_hook(upload_concurrency=2)

    with hook.presigning_ahead() as supply:
        supply.expect(6)
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda _: hook.upload_instance(io.BytesIO(data)), range(6)))

    assert len(vendor.requests_to("/upload")) == 6
    assert supply.handed_out == 6
    expected_keys = sorted(f"bucket/incoming/obj-{n}.dcm" for n in range(1, 7))
    assert sorted(result.key for result in results) == expected_keys


def test_presigning_ahead_requests_no_more_urls_than_the_uploads_run_at_once(make_hook, vendor):
    serve_presign(vendor, *(presigned_url(f"incoming/obj-{n}.dcm") for n in range(1, 7)))
    hook = make_hook(upload_concurrency=20)

    with hook.presigning_ahead(2) as supply:
        supply.expect(6)
        deadline = time.monotonic() + 5
        while supply.fetched < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # time for any further request to go out
        requested = len(vendor.requests_to("/upload"))

    assert requested == 2


def test_presign_ahead_can_be_switched_off(make_hook, vendor, mocked):
    serve_presign(vendor, presigned_url())
    data = b"DICM-one-at-a-time"
    serve_store(mocked, presigned_url(), etag_answer(data))
    hook = make_hook(presign_ahead="false")

    with hook.presigning_ahead() as supply:
        supply.expect(3)
        assert vendor.requests_to("/upload") == []
        for _ in range(3):
            hook.upload_instance(io.BytesIO(data))

    assert len(vendor.requests_to("/upload")) == 3
    assert (supply.fetched, supply.handed_out) == (0, 0)


# -- metadata, status, order ids ------------------------------------------------------------------


def test_add_metadata_patches_json_by_order_id(make_hook, vendor):
    vendor.answers(
        "PATCH", "/add-metadata", json_answer(200, {"order_id": "ord-1", "metadata_complete": True})
    )
    hook = make_hook()

    answer = hook.add_metadata(order_id="ord-1", metadata={"patient_age": 42, "patient_sex": "F"})

    assert answer == {"order_id": "ord-1", "metadata_complete": True}
    (request,) = vendor.requests_to("/add-metadata")
    assert query_of(request) == {"order_id": ["ord-1"]}
    assert json.loads(request.body) == {"patient_age": 42, "patient_sex": "F"}
    assert request.headers["Content-Type"] == "application/json"


def test_add_metadata_accepts_an_empty_answer(make_hook, vendor):
    vendor.answers("PATCH", "/add-metadata", (204, {}, ""))

    assert make_hook().add_metadata(study_uid="1.2.3", metadata={"patient_sex": "M"}) == {}
    assert query_of(vendor.requests_to("/add-metadata")[0]) == {"study_uid": ["1.2.3"]}


@pytest.mark.parametrize("names", [{}, {"order_id": "o", "study_uid": "s"}])
def test_exactly_one_order_reference_is_required(make_hook, names):
    hook = make_hook()
    with pytest.raises(ValueError, match="exactly one"):
        hook.get_status(**names)
    with pytest.raises(ValueError, match="exactly one"):
        hook.add_metadata(metadata={}, **names)


def test_status_words_come_from_the_connection(make_hook, vendor):
    vendor.answers("GET", "/status", json_answer(200, {**STATUS_BODY, "status": "complete"}))
    hook = make_hook(done_statuses="COMPLETE,DELIVERED", failed_statuses=["FAILED"])

    status = hook.get_status(order_id="ord-1")

    assert status.is_done and not status.is_failed
    assert status.instances_received == 3 and status.metadata_complete is True


def test_failed_status_carries_its_reason(make_hook, vendor):
    vendor.answers(
        "GET", "/status", json_answer(200, {**STATUS_BODY, "status": "FAILED", "reason": "metadata_timeout"})
    )

    status = make_hook().get_status(study_uid="1.2.3")

    assert status.is_failed and not status.is_done
    assert status.reason == "metadata_timeout"


def test_custom_paths_are_used(make_hook, mocked):
    mocked.get(f"{API}/oauth2/token", json={"access_token": "tok-paths-0123456789", "expires_in": 3600})
    mocked.get(f"{API}/v2/orders/status", json=STATUS_BODY)
    hook = make_hook(status_path="v2/orders/status")

    assert hook.get_status(order_id="ord-1").order_id == "ord-1"
