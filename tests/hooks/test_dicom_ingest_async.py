"""Unit tests of DicomIngestAsyncHook with the transport mocked by ``respx``."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator

import httpx
import pytest
import respx

from dicom_ingest.exceptions import (
    DicomIngestApiError,
    DicomIngestAuthError,
    DicomIngestOrderNotFoundError,
    DicomIngestTransportError,
)
from dicom_ingest.hooks.dicom_ingest import DicomIngestAsyncHook
from tests.hooks.support import API, CLIENT_ID, CLIENT_SECRET, FakeClock, set_connection

pytestmark = pytest.mark.anyio

STATUS = {"order_id": "ord-1", "study_uid": "1.2.3", "status": "UPLOADING", "instances_received": 1}


class AsyncSleeps:
    """An async sleep that records the delays instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=API, assert_all_called=False) as mock:
        yield mock


@pytest.fixture
def tokens(router: respx.MockRouter) -> respx.Route:
    """Issue numbered tokens on GET /oauth2/token."""
    issued = iter(range(1, 1000))
    return router.get("/oauth2/token").mock(
        side_effect=lambda request: httpx.Response(
            200, json={"access_token": f"atok-{next(issued):04d}-abcdefghij", "expires_in": 3600}
        )
    )


@pytest.fixture
def make_async_hook(monkeypatch):
    sleeps = AsyncSleeps()
    clock = FakeClock()

    def build(**extra) -> DicomIngestAsyncHook:
        set_connection(monkeypatch, **extra)
        hook = DicomIngestAsyncHook(sleep=sleeps, clock=clock)
        hook.sleeps = sleeps
        hook.fake_clock = clock
        return hook

    return build


def bearer(request: httpx.Request) -> str:
    return request.headers["Authorization"].removeprefix("Bearer ")


async def test_get_status_fetches_token_with_basic_get_and_parses(router, tokens, make_async_hook):
    status_route = router.get("/status").mock(return_value=httpx.Response(200, json=STATUS))
    hook = make_async_hook(scope="read")

    async with hook:
        status = await hook.get_status(order_id="ord-1")

    assert (status.order_id, status.status, status.is_done, status.is_failed) == (
        "ord-1",
        "UPLOADING",
        False,
        False,
    )
    token_request = tokens.calls.last.request
    assert token_request.method == "GET"
    assert dict(token_request.url.params) == {"grant_type": "client_credentials", "scope": "read"}
    expected = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    assert token_request.headers["Authorization"] == f"Basic {expected}"
    assert dict(status_route.calls.last.request.url.params) == {"order_id": "ord-1"}
    assert bearer(status_route.calls.last.request) == "atok-0001-abcdefghij"


async def test_token_is_cached_and_refreshed_before_expiry(router, tokens, make_async_hook):
    router.get("/status").mock(return_value=httpx.Response(200, json=STATUS))
    hook = make_async_hook()

    async with hook:
        await hook.get_status(order_id="ord-1")
        await hook.get_status(order_id="ord-1")
        assert tokens.call_count == 1
        hook.fake_clock.advance(3600 - 30)
        await hook.get_status(order_id="ord-1")

    assert tokens.call_count == 2


async def test_401_refreshes_once_and_resends(router, tokens, make_async_hook):
    status_route = router.get("/status").mock(
        side_effect=[
            httpx.Response(401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}),
            httpx.Response(200, json=STATUS),
        ]
    )
    hook = make_async_hook()

    async with hook:
        status = await hook.get_status(study_uid="1.2.3")

    assert status.study_uid == "1.2.3"
    assert [bearer(call.request) for call in status_route.calls] == [
        "atok-0001-abcdefghij",
        "atok-0002-abcdefghij",
    ]
    assert hook.sleeps.delays == []


async def test_repeated_401_is_an_auth_error(router, tokens, make_async_hook):
    status_route = router.get("/status").mock(
        return_value=httpx.Response(401, json={"error": "invalid_token"})
    )
    hook = make_async_hook()

    async with hook:
        with pytest.raises(DicomIngestAuthError) as caught:
            await hook.get_status(order_id="ord-1")

    assert caught.value.error_code == "invalid_token"
    assert status_route.call_count == 2
    assert tokens.call_count == 2
    assert "atok-" not in str(caught.value)


async def test_503_and_429_are_retried_with_pinned_sleep(router, tokens, make_async_hook):
    router.get("/orderId").mock(
        side_effect=[
            httpx.Response(503),
            httpx.Response(429, headers={"Retry-After": "3"}),
            httpx.Response(200, json={"study_uid": "1.2.3", "order_ids": ["o1", "o2"]}),
        ]
    )
    hook = make_async_hook(backoff_base=0.1, backoff_max=1)

    async with hook:
        assert await hook.order_ids("1.2.3") == ["o1", "o2"]

    first, second = hook.sleeps.delays
    assert 0 <= first <= 0.2
    assert second == 3.0


async def test_connection_errors_are_retried_then_raised(router, tokens, make_async_hook):
    router.get("/status").mock(side_effect=httpx.ConnectError("refused"))
    hook = make_async_hook(max_retries=2)

    async with hook:
        with pytest.raises(DicomIngestTransportError):
            await hook.get_status(order_id="ord-1")

    assert len(hook.sleeps.delays) == 2


async def test_404_is_order_not_found_without_retry(router, tokens, make_async_hook):
    route = router.get("/status").mock(return_value=httpx.Response(404, json={"error": "order_not_found"}))
    hook = make_async_hook()

    async with hook:
        with pytest.raises(DicomIngestOrderNotFoundError) as caught:
            await hook.get_status(order_id="missing")

    assert caught.value.error_code == "order_not_found"
    assert route.call_count == 1


async def test_malformed_answer_is_an_api_error(router, tokens, make_async_hook):
    router.get("/status").mock(return_value=httpx.Response(200, text="<html>"))
    hook = make_async_hook()

    async with hook:
        with pytest.raises(DicomIngestApiError, match="not a JSON object"):
            await hook.get_status(order_id="ord-1")

    assert hook.sleeps.delays == []


async def test_get_statuses_bounds_concurrency_and_maps_ids(router, tokens, make_async_hook):
    in_flight = peak = 0

    async def answer(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        order_id = request.url.params["order_id"]
        return httpx.Response(200, json={"order_id": order_id, "status": "DELIVERED"})

    router.get("/status").mock(side_effect=answer)
    hook = make_async_hook()
    ids = [f"ord-{n}" for n in range(12)]

    async with hook:
        statuses = await hook.get_statuses(ids, concurrency=3)

    assert list(statuses) == ids
    assert all(statuses[order_id].order_id == order_id and statuses[order_id].is_done for order_id in ids)
    assert peak == 3
    assert tokens.call_count == 1


async def test_get_statuses_raises_the_first_failure(router, tokens, make_async_hook):
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.params["order_id"] == "gone":
            return httpx.Response(404, json={"error": "order_not_found"})
        return httpx.Response(200, json={"order_id": request.url.params["order_id"], "status": "UPLOADING"})

    router.get("/status").mock(side_effect=answer)
    hook = make_async_hook()

    async with hook:
        with pytest.raises(DicomIngestOrderNotFoundError):
            await hook.get_statuses(["a", "gone", "b"])


async def test_bad_secret_is_an_auth_error_without_the_secret(router, make_async_hook):
    router.get("/oauth2/token").mock(return_value=httpx.Response(401, json={"error": "invalid_client"}))
    hook = make_async_hook(password="another-wrong-secret-42")

    async with hook:
        with pytest.raises(DicomIngestAuthError) as caught:
            await hook.get_status(order_id="ord-1")

    assert caught.value.error_code == "invalid_client"
    assert "another-wrong-secret-42" not in f"{caught.value!s} {caught.value!r} {caught.value.__cause__!r}"
