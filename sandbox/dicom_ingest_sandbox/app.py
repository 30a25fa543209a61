"""The sandbox's HTTP API: the vendor's endpoints plus the admin endpoints under ``/_sandbox``."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Receive, Scope, Send

from dicom_ingest_sandbox.audit import AuditLog
from dicom_ingest_sandbox.auth import (
    SCOPES,
    TokenGrant,
    TokenService,
    invalid_client,
    parse_basic_credentials,
)
from dicom_ingest_sandbox.config import Clocks, SandboxSettings
from dicom_ingest_sandbox.errors import ApiError
from dicom_ingest_sandbox.faults import (
    API_ENDPOINTS,
    ConnectionDropped,
    FaultBoard,
    RevokeTokensFault,
    cutting_send,
    parse_fault_specs,
)
from dicom_ingest_sandbox.ingest import StoreWatcher
from dicom_ingest_sandbox.orders import Order, OrderBook, OrderStatus
from dicom_ingest_sandbox.store import BUCKET, ObjectStore, Presigner

logger = logging.getLogger(__name__)

GRANT_TYPE = "client_credentials"
ENDPOINT_BY_PATH = {
    "/oauth2/token": "token",
    "/upload": "upload",
    "/add-metadata": "add-metadata",
    "/status": "status",
    "/orderId": "orderId",
    "/test-token": "test-token",
}
_FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"


@dataclass(frozen=True)
class NetworkInfo:
    """How clients reach the sandbox, and the latency added in front of it.

    :param base_url: the API as clients reach it (the ready line's URL).
    :param store_url: the store as presigned URLs name it.
    :param latency_ms: the round trip added in front of the API and the store (0: none).
    :param latency_model: how the proxies add it (``tcp`` or ``delay``); None without proxies.
    :param api_upstream: the API's own address behind the delaying proxy, when there is one.
    :param proxy_pid: the delaying proxies' process id, when they run.
    """

    base_url: str
    store_url: str
    latency_ms: float = 0.0
    latency_model: str | None = None
    api_upstream: str | None = None
    proxy_pid: int | None = None

    def document(self) -> dict[str, Any]:
        """Return the ``network`` part of the state."""
        return {
            "base_url": self.base_url,
            "latency_ms": self.latency_ms,
            "latency_model": self.latency_model,
            "api_upstream": self.api_upstream,
            "proxy_pid": self.proxy_pid,
        }


@dataclass
class SandboxRuntime:
    """Everything the API works on while the sandbox runs."""

    settings: SandboxSettings
    store: ObjectStore
    network: NetworkInfo
    presigner: Presigner
    tokens: TokenService
    audit: AuditLog
    orders: OrderBook
    watcher: StoreWatcher
    clocks: Clocks
    faults: FaultBoard = field(default_factory=FaultBoard)
    calls: Counter[str] = field(default_factory=Counter)
    ingest_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def calls_document(self) -> dict[str, int]:
        """Return how many calls each API endpoint received."""
        return {endpoint: self.calls[endpoint] for endpoint in API_ENDPOINTS}

    def state_document(self) -> dict[str, Any]:
        """Return the whole state for ``GET /_sandbox/state``."""
        required = self.clocks.required_metadata
        return {
            "orders": self.orders.orders_state(required),
            "objects": self.orders.objects_state(),
            "audit": self.audit.events(),
            "calls": self.calls_document(),
            "faults": self.faults.describe(),
            "clocks": self.clocks.model_dump(),
            "store": self.store_document(),
            "network": self.network.document(),
        }

    def store_document(self) -> dict[str, Any]:
        """Return the ``store`` part of the state: its advertised and its own address, its pid."""
        return {
            "endpoint": self.network.store_url,
            "upstream": self.store.endpoint_url,
            "bucket": BUCKET,
            "pid": self.store.pid,
        }

    def summary_document(self) -> dict[str, Any]:
        """Return counts only, for ``GET /_sandbox/summary``: cheap to ask for while many objects arrive."""
        objects = self.orders.objects_state()
        accepted = sum(1 for entry in objects if entry["accepted"])
        orders = self.orders.orders_state(self.clocks.required_metadata)
        return {
            "objects": {"received": len(objects), "accepted": accepted, "rejected": len(objects) - accepted},
            "orders": dict(Counter(order["status"] for order in orders)),
            "studies": len({order["study_uid"] for order in orders}),
            "instances": sum(order["instances_received"] for order in orders),
            "calls": self.calls_document(),
            "store": self.store_document(),
            "network": self.network.document(),
        }

    async def reset(self) -> None:
        """Forget faults, call counts, orders, objects and audit events, and empty the store."""
        async with self.ingest_lock:
            self.faults.clear()
            self.calls.clear()
            self.orders.clear()
            self.audit.clear()
            await asyncio.to_thread(self.store.remove_objects)
            self.watcher.forget()


class ApiCallMiddleware:
    """Give every response an ``X-Request-ID``; count API calls and apply the faults planned for them.

    :param app: the application to wrap.
    :param runtime: the sandbox's runtime.
    """

    def __init__(self, app: ASGIApp, runtime: SandboxRuntime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex

        async def send_with_request_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("X-Request-ID", request_id)
            await send(message)

        endpoint = ENDPOINT_BY_PATH.get(scope["path"])
        if endpoint is None:
            await self.app(scope, receive, send_with_request_id)
            return
        self.runtime.calls[endpoint] += 1
        plan = self.runtime.faults.plan(endpoint)
        if plan.delay_seconds:
            await asyncio.sleep(plan.delay_seconds)
        if plan.answer is not None:
            headers = {}
            if plan.answer.retry_after is not None:
                headers["Retry-After"] = str(plan.answer.retry_after)
            error = ApiError(plan.answer.status, "injected_fault", "fault injected by the sandbox", headers)
            await _error_response(error)(scope, receive, send_with_request_id)
            return
        if plan.drop_connection:
            logger.info("cutting the connection of a call to %s", endpoint)
            await self.app(scope, receive, cutting_send(send_with_request_id))
            return
        await self.app(scope, receive, send_with_request_id)


class _HideDroppedConnections(logging.Filter):
    """Keep deliberate connection cuts out of the server's error log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], ConnectionDropped))


def _error_response(error: ApiError) -> JSONResponse:
    """Turn an :class:`ApiError` into its JSON response."""
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.headers)


async def _run_periodically(interval: float, step: Callable[[], Awaitable[None]], name: str) -> None:
    """Run ``step`` every ``interval`` seconds until cancelled, logging (not raising) its failures."""
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("the %s loop failed; it carries on", name)
        await asyncio.sleep(interval)


def build_runtime(
    settings: SandboxSettings, store: ObjectStore, network: NetworkInfo | None = None
) -> SandboxRuntime:
    """Assemble the runtime around a started object store.

    :param settings: the run's settings.
    :param store: the started object store.
    :param network: how clients reach the API and the store; by default directly, at the
        store's own address.
    """
    network = network or NetworkInfo(base_url="", store_url=store.endpoint_url)
    audit = AuditLog(settings.audit_path)
    return SandboxRuntime(
        settings=settings,
        store=store,
        network=network,
        presigner=Presigner(network.store_url, store.access_key, store.secret_key),
        tokens=TokenService(settings.client_id, settings.client_secret),
        audit=audit,
        orders=OrderBook(audit),
        watcher=StoreWatcher(store.bucket_dir),
        clocks=settings.clocks,
    )


def _runtime(request: Request) -> SandboxRuntime:
    """Return the runtime the application serves."""
    return request.app.state.runtime


RuntimeDep = Annotated[SandboxRuntime, Depends(_runtime)]
AuthorizationHeader = Annotated[str | None, Header()]


def _token_with_scope(required_scope: str | None) -> Callable[..., TokenGrant]:
    """Return a dependency that verifies the bearer token and its scope (any scope when None)."""

    def verify(runtime: RuntimeDep, authorization: AuthorizationHeader = None) -> TokenGrant:
        return runtime.tokens.verify(authorization, required_scope)

    return verify


AnyToken = Annotated[TokenGrant, Depends(_token_with_scope(None))]
UploadToken = Annotated[TokenGrant, Depends(_token_with_scope("upload"))]
MetadataToken = Annotated[TokenGrant, Depends(_token_with_scope("metadata"))]
ReadToken = Annotated[TokenGrant, Depends(_token_with_scope("read"))]


def _require_admin(runtime: RuntimeDep, x_admin_token: Annotated[str | None, Header()] = None) -> None:
    """Refuse admin calls without the right ``X-Admin-Token`` (401 when missing, 403 when wrong)."""
    if x_admin_token is None:
        raise ApiError(401, "admin_token_required", "send the X-Admin-Token header")
    if not hmac.compare_digest(x_admin_token.encode(), runtime.settings.admin_token.encode()):
        raise ApiError(403, "forbidden", "wrong admin token")


vendor = APIRouter(tags=["vendor"])
admin = APIRouter(prefix="/_sandbox", tags=["sandbox"])
admin_only = APIRouter(prefix="/_sandbox", tags=["sandbox"], dependencies=[Depends(_require_admin)])


def _client_credentials(
    authorization: str | None, client_id: str | None, client_secret: str | None
) -> tuple[str | None, str | None]:
    """Return the client credentials from the Basic header or the parameters (not both)."""
    basic = parse_basic_credentials(authorization)
    if basic is not None and (client_id is not None or client_secret is not None):
        raise invalid_client("use one way of sending client credentials, not two")
    return basic if basic is not None else (client_id, client_secret)


def _issue_token(
    runtime: SandboxRuntime,
    grant_type: str | None,
    scope: str | None,
    credentials: tuple[str | None, str | None],
) -> JSONResponse:
    """Authenticate the client, check the grant and scope, and answer with a new token."""
    try:
        client = runtime.tokens.authenticate_client(*credentials)
    except ApiError:
        runtime.audit.record("token_refused", reason="invalid_client")
        raise
    if grant_type is None:
        raise ApiError(400, "invalid_request", "grant_type is required")
    if grant_type != GRANT_TYPE:
        raise ApiError(400, "unsupported_grant_type", f"only {GRANT_TYPE} is supported")
    scopes = runtime.tokens.granted_scopes(scope)
    issued = runtime.tokens.issue(client, scopes, runtime.clocks.token_ttl)
    runtime.audit.record("token_issued", client_id=client, scope=issued.scope)
    return JSONResponse(issued.response(), headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


@vendor.get("/oauth2/token", summary="Get a token (the vendor's documented form)")
async def token_by_get(
    runtime: RuntimeDep,
    grant_type: str | None = None,
    scope: str | None = None,
    client_id: str | None = None,
    client_secret: str | None = None,
    authorization: AuthorizationHeader = None,
) -> JSONResponse:
    """Issue a token for credentials in an HTTP Basic header or in the query."""
    credentials = _client_credentials(authorization, client_id, client_secret)
    return _issue_token(runtime, grant_type, scope, credentials)


@vendor.post("/oauth2/token", summary="Get a token (RFC 6749 form body)")
async def token_by_post(
    runtime: RuntimeDep, request: Request, authorization: AuthorizationHeader = None
) -> JSONResponse:
    """Issue a token for a form body, credentials in an HTTP Basic header or in the form."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != _FORM_CONTENT_TYPE:
        raise ApiError(400, "invalid_request", f"the body must be {_FORM_CONTENT_TYPE}")
    form = {name: values[0] for name, values in parse_qs((await request.body()).decode()).items()}
    credentials = _client_credentials(authorization, form.get("client_id"), form.get("client_secret"))
    return _issue_token(runtime, form.get("grant_type"), form.get("scope"), credentials)


@vendor.get("/test-token", summary="Check a token")
async def test_token(runtime: RuntimeDep, grant: AnyToken) -> dict[str, Any]:
    """Describe a valid token."""
    return {
        "active": True,
        "client_id": grant.client_id,
        "scope": " ".join(scope for scope in SCOPES if scope in grant.scopes),
        "expires_in": runtime.tokens.seconds_left(grant),
    }


@vendor.get("/upload", summary="Get a presigned PUT URL for one instance")
async def presign_upload(runtime: RuntimeDep, _: UploadToken) -> dict[str, Any]:
    """Return a presigned PUT URL for a new object key."""
    key = runtime.presigner.new_key()
    ttl = runtime.clocks.url_ttl
    expired = runtime.faults.take_expired_url()
    if expired:
        url = runtime.presigner.presign_expired_put(key, ttl)
    else:
        url = runtime.presigner.presign_put(key, ttl)
    runtime.audit.record("url_issued", key=key, expires_in=ttl, expired=expired)
    return {"url": url, "expires_in": ttl, "key": key}


def _find_order(runtime: SandboxRuntime, order_id: str | None, study_uid: str | None) -> Order:
    """Return the order named by id, or a study's most recent order (exactly one must be given)."""
    if (order_id is None) == (study_uid is None):
        raise ApiError(400, "invalid_request", "give exactly one of order_id and study_uid")
    if order_id is not None:
        order = runtime.orders.get(order_id)
    else:
        order = runtime.orders.latest_of_study(str(study_uid))
    if order is None:
        raise ApiError(404, "order_not_found", "no such order")
    return order


@vendor.patch("/add-metadata", summary="Merge JSON metadata into an active order")
async def add_metadata(
    runtime: RuntimeDep,
    request: Request,
    _: MetadataToken,
    order_id: str | None = None,
    study_uid: str | None = None,
) -> dict[str, Any]:
    """Merge a JSON object into an ``UPLOADING`` order's metadata and return the order's status."""
    order = _find_order(runtime, order_id, study_uid)
    try:
        fields = json.loads(await request.body())
    except ValueError:
        fields = None
    if not isinstance(fields, dict):
        raise ApiError(422, "invalid_metadata", "the body must be a JSON object")
    if order.status is not OrderStatus.UPLOADING:
        raise ApiError(
            409,
            "order_not_active",
            "metadata can only be added to an UPLOADING order",
            details={"order_id": order.order_id, "status": order.status.value},
        )
    runtime.orders.patch_metadata(order, fields)
    return order.status_document(runtime.clocks.required_metadata)


@vendor.get("/status", summary="An order's status (a study's most recent order)")
async def order_status(
    runtime: RuntimeDep, _: ReadToken, order_id: str | None = None, study_uid: str | None = None
) -> dict[str, Any]:
    """Return the status document of an order."""
    return _find_order(runtime, order_id, study_uid).status_document(runtime.clocks.required_metadata)


@vendor.get("/orderId", summary="A study's order ids, oldest first")
async def order_ids(runtime: RuntimeDep, _: ReadToken, study_uid: str | None = None) -> dict[str, Any]:
    """List a study's order ids, oldest first."""
    if study_uid is None:
        raise ApiError(400, "invalid_request", "study_uid is required")
    orders = runtime.orders.orders_of_study(study_uid)
    if not orders:
        raise ApiError(404, "study_not_found", "no order for this study")
    return {"study_uid": study_uid, "order_ids": [order.order_id for order in orders]}


@admin.get("/health", summary="Whether the API and the store answer")
async def health(runtime: RuntimeDep) -> JSONResponse:
    """Answer 200 when the object store answers too, else 503."""
    store_ok = await asyncio.to_thread(runtime.store.is_answering)
    body = {"api": "ok", "store": "ok" if store_ok else "down"}
    return JSONResponse(body, status_code=200 if store_ok else 503)


@admin_only.get("/state", summary="Every order, object, audit event, call count and fault")
async def state(runtime: RuntimeDep) -> dict[str, Any]:
    """Return the whole state."""
    return runtime.state_document()


@admin_only.get("/summary", summary="Counts of objects, orders by status and calls; process ids")
async def summary(runtime: RuntimeDep) -> dict[str, Any]:
    """Return counts only (no lists), plus the store and network descriptions."""
    return runtime.summary_document()


@admin_only.post("/faults", summary="Inject one fault or a list of faults")
async def add_faults(runtime: RuntimeDep, request: Request) -> dict[str, Any]:
    """Validate and apply fault specs; ``revoke_tokens`` acts at once, the others wait for calls."""
    try:
        specs = parse_fault_specs(await request.json())
    except ValueError as error:
        raise ApiError(422, "invalid_fault", str(error)) from None
    for spec in specs:
        if isinstance(spec, RevokeTokensFault):
            runtime.tokens.revoke_all()
            runtime.audit.record("tokens_revoked")
        else:
            runtime.faults.add(spec)
    return {"faults": runtime.faults.describe()}


@admin_only.delete("/faults", summary="Remove every fault")
async def clear_faults(runtime: RuntimeDep) -> dict[str, Any]:
    """Remove every fault."""
    runtime.faults.clear()
    return {"faults": []}


@admin_only.get("/config", summary="The clocks and required metadata in force")
async def read_config(runtime: RuntimeDep) -> dict[str, Any]:
    """Return the clocks in force."""
    return runtime.clocks.model_dump()


@admin_only.post("/config", summary="Change clocks or required metadata at run time")
async def change_config(runtime: RuntimeDep, request: Request) -> dict[str, Any]:
    """Apply a JSON object of clock changes and return the clocks now in force."""
    try:
        changes = await request.json()
        if not isinstance(changes, dict):
            raise ValueError("the body must be a JSON object")
        runtime.clocks = runtime.clocks.updated(changes)
    except ValueError as error:
        raise ApiError(422, "invalid_config", str(error)) from None
    runtime.audit.record("config_changed", fields=sorted(changes))
    return runtime.clocks.model_dump()


@admin_only.post("/reset", summary="Forget faults, calls, orders, objects and audit events")
async def reset(runtime: RuntimeDep) -> dict[str, str]:
    """Reset the sandbox to a fresh state (clocks are kept)."""
    await runtime.reset()
    return {"reset": "ok"}


async def _answer_api_error(_: Request, error: Exception) -> JSONResponse:
    """Answer an :class:`ApiError` raised by a route or a dependency."""
    assert isinstance(error, ApiError)
    return _error_response(error)


async def _answer_validation_error(_: Request, error: Exception) -> JSONResponse:
    """Answer malformed parameters with the sandbox's error document."""
    assert isinstance(error, RequestValidationError)
    return _error_response(ApiError(400, "invalid_request", str(error.errors()[:3])))


def create_app(runtime: SandboxRuntime) -> FastAPI:
    """Build the FastAPI application over a runtime; its lifespan runs the ingest and clock loops.

    :param runtime: the sandbox's runtime.
    """

    async def ingest_new_objects() -> None:
        async with runtime.ingest_lock:
            for received in await asyncio.to_thread(runtime.watcher.scan):
                runtime.orders.receive(received, runtime.clocks)

    async def advance_orders() -> None:
        runtime.orders.advance(runtime.clocks)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        settings = runtime.settings
        loops = [
            asyncio.create_task(_run_periodically(settings.scan_interval, ingest_new_objects, "ingest")),
            asyncio.create_task(_run_periodically(settings.tick_interval, advance_orders, "clock")),
        ]
        try:
            yield
        finally:
            for task in loops:
                task.cancel()
            for task in loops:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app = FastAPI(
        title="DICOM ingest vendor sandbox",
        description="A local stand-in for the vendor's DICOM ingestion REST API.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.add_middleware(ApiCallMiddleware, runtime=runtime)
    app.add_exception_handler(ApiError, _answer_api_error)
    app.add_exception_handler(RequestValidationError, _answer_validation_error)
    for router in (vendor, admin, admin_only):
        app.include_router(router)
    logging.getLogger("uvicorn.error").addFilter(_HideDroppedConnections())
    return app
