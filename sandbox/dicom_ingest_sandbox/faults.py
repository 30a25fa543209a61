"""Fault injection: error answers, latency, dropped connections, expired URLs and token revocation.

Faults are posted as JSON to ``/_sandbox/faults``, one object or a list. Each call to an API
endpoint asks the :class:`FaultBoard` for a :class:`CallPlan`: how long to stall, and whether to
answer with an error status or cut the connection instead of answering normally.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, TypeAdapter

API_ENDPOINTS = ("token", "upload", "add-metadata", "status", "orderId", "test-token")
EndpointName = Literal["token", "upload", "add-metadata", "status", "orderId", "test-token", "*"]
MAX_LATENCY_SECONDS = 300.0


class _CallFault(BaseModel):
    """Fields shared by faults that act on calls to an endpoint.

    ``count`` is how many calls the fault acts on (default 1; with ``rate`` and no ``count``,
    until cleared); ``after`` skips that many matching calls first; ``rate`` makes each
    matching call a fault with that probability.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: EndpointName
    count: PositiveInt | None = None
    after: NonNegativeInt = 0
    rate: Annotated[float, Field(ge=0.0, le=1.0)] | None = None

    def matches(self, endpoint: str) -> bool:
        """Tell whether a call to ``endpoint`` is one this fault acts on.

        :param endpoint: the called endpoint's name.
        """
        return self.endpoint in ("*", endpoint)

    def initial_budget(self) -> int | None:
        """Return how many calls the fault may act on; None for no limit."""
        if self.count is not None:
            return self.count
        return None if self.rate is not None else 1


class StatusFault(_CallFault):
    """Answer matching calls with an error status (and ``Retry-After`` when given)."""

    kind: Literal["status"] = "status"
    status: Literal[429, 500, 502, 503, 504]
    retry_after: NonNegativeInt | None = None


class LatencyFault(_CallFault):
    """Hold matching calls for ``seconds`` before handling them."""

    kind: Literal["latency"]
    seconds: Annotated[PositiveFloat, Field(le=MAX_LATENCY_SECONDS)]


class DropConnectionFault(_CallFault):
    """Handle matching calls, then cut the connection half-way through the response body."""

    kind: Literal["drop_connection"]


class ExpiredUrlsFault(BaseModel):
    """Make the next ``count`` ``/upload`` answers carry URLs that have already expired."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["expired_urls"]
    count: PositiveInt = 1


class RevokeTokensFault(BaseModel):
    """Invalidate every token issued so far (applied at once, not kept)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["revoke_tokens"]


FaultSpec = Annotated[
    StatusFault | LatencyFault | DropConnectionFault | ExpiredUrlsFault | RevokeTokensFault,
    Field(discriminator="kind"),
]
_SPECS = TypeAdapter(list[FaultSpec])


def parse_fault_specs(payload: Any) -> list[FaultSpec]:
    """Validate one fault object or a list of them; a missing ``kind`` means ``status``.

    :param payload: the decoded JSON body.
    :raises pydantic.ValidationError: for anything that is not a valid fault.
    """
    items = payload if isinstance(payload, list) else [payload]
    normalised = [{"kind": "status", **item} if isinstance(item, dict) else item for item in items]
    return _SPECS.validate_python(normalised)


@dataclass
class ActiveFault:
    """A fault on the board with what is left of it."""

    fault_id: int
    spec: StatusFault | LatencyFault | DropConnectionFault | ExpiredUrlsFault
    remaining: int | None
    skipped: int = 0
    fired: int = 0

    def describe(self) -> dict[str, Any]:
        """Return the fault as ``/_sandbox/state`` lists it."""
        return {
            "id": self.fault_id,
            **self.spec.model_dump(exclude_none=True),
            "remaining": self.remaining,
            "fired": self.fired,
        }


@dataclass(frozen=True)
class CallPlan:
    """What the faults do to one call: stall first, then answer an error, cut, or go on."""

    delay_seconds: float = 0.0
    answer: StatusFault | None = None
    drop_connection: bool = False


class FaultBoard:
    """The faults in force and the bookkeeping of which calls they hit.

    :param rng: the random source for ``rate`` faults.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._faults: list[ActiveFault] = []
        self._ids = itertools.count(1)

    def add(self, spec: StatusFault | LatencyFault | DropConnectionFault | ExpiredUrlsFault) -> ActiveFault:
        """Put a fault on the board.

        :param spec: the validated fault.
        """
        budget = spec.count if isinstance(spec, ExpiredUrlsFault) else spec.initial_budget()
        fault = ActiveFault(next(self._ids), spec, budget)
        self._faults.append(fault)
        return fault

    def clear(self) -> None:
        """Remove every fault."""
        self._faults.clear()

    def describe(self) -> list[dict[str, Any]]:
        """Return the faults in force."""
        return [fault.describe() for fault in self._faults]

    def plan(self, endpoint: str) -> CallPlan:
        """Decide what the faults do to one call, and count the call against them.

        Latency faults add up; of the error and drop faults, the oldest that fires decides
        the answer, and the others are left for later calls.

        :param endpoint: the called endpoint's name.
        """
        delay = 0.0
        answer: StatusFault | None = None
        drop = False
        for fault in list(self._faults):
            spec = fault.spec
            if isinstance(spec, ExpiredUrlsFault) or not spec.matches(endpoint):
                continue
            if fault.skipped < spec.after:
                fault.skipped += 1
                continue
            if spec.rate is not None and self._rng.random() >= spec.rate:
                continue
            if isinstance(spec, LatencyFault):
                delay += spec.seconds
            elif answer is None and not drop:
                answer = spec if isinstance(spec, StatusFault) else None
                drop = isinstance(spec, DropConnectionFault)
            else:
                continue
            self._spend(fault)
        return CallPlan(delay_seconds=delay, answer=answer, drop_connection=drop)

    def take_expired_url(self) -> bool:
        """Tell whether the URL being issued must be an expired one, and count it."""
        for fault in self._faults:
            if isinstance(fault.spec, ExpiredUrlsFault):
                self._spend(fault)
                return True
        return False

    def _spend(self, fault: ActiveFault) -> None:
        """Count one firing of a fault and retire it when its budget is used up."""
        fault.fired += 1
        if fault.remaining is not None:
            fault.remaining -= 1
            if fault.remaining <= 0:
                self._faults.remove(fault)


class ConnectionDropped(Exception):
    """Raised to make the server close a connection half-way through a response."""


Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]


def cutting_send(send: Send) -> Send:
    """Wrap an ASGI ``send`` so the response stops half-way through its body, then the connection closes.

    The status line and headers (with the full ``Content-Length``) go out, then half of the
    first body chunk, then :class:`ConnectionDropped` is raised so the server closes the socket:
    the client sees a truncated response, a transport error rather than an HTTP status.

    :param send: the server's send callable.
    """

    async def send_then_cut(message: Message) -> None:
        if message["type"] != "http.response.body":
            await send(message)
            return
        body = message.get("body", b"")
        await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
        raise ConnectionDropped

    return send_then_cut
