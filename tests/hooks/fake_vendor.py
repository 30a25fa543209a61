"""A transport-level stand-in for the vendor's API for unit tests of one hook (``responses`` for requests).

It issues numbered tokens, refuses unknown or revoked ones with 401, and lets each test script
the answers of the API paths and of the store's presigned URLs.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import responses
from requests import PreparedRequest

from tests.hooks.support import API, CLIENT_ID, CLIENT_SECRET

Answer = tuple[int, dict[str, str], str]
Handler = Callable[[PreparedRequest], Answer]

TOKEN_URL = f"{API}/oauth2/token"


def json_answer(status: int, body: Any, **headers: str) -> Answer:
    """Return a JSON answer for a ``responses`` callback."""
    return status, {"Content-Type": "application/json", **headers}, json.dumps(body)


def bearer_of(request: PreparedRequest) -> str | None:
    """Return the bearer token a request carries, if any."""
    header = request.headers.get("Authorization", "")
    return header.removeprefix("Bearer ") if header.startswith("Bearer ") else None


def query_of(request: PreparedRequest) -> dict[str, list[str]]:
    """Return a request's query parameters."""
    return parse_qs(urlsplit(request.url).query)


class FakeVendor:
    """Scriptable vendor API behind ``responses``.

    :param mock: the active ``responses.RequestsMock``.
    :param expires_in: the lifetime the token endpoint announces.
    :param token_delay: seconds the token endpoint takes (widens race windows in thread tests).
    """

    def __init__(
        self, mock: responses.RequestsMock, *, expires_in: int = 3600, token_delay: float = 0.0
    ) -> None:
        self.mock = mock
        self.expires_in = expires_in
        self.token_delay = token_delay
        self.issued: list[str] = []
        self.revoked: set[str] = set()
        self.token_requests: list[PreparedRequest] = []
        self.api_requests: list[PreparedRequest] = []
        self._lock = threading.Lock()
        for method in ("GET", "POST"):
            mock.add_callback(method, TOKEN_URL, callback=self._token)

    def _token(self, request: PreparedRequest) -> Answer:
        expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        if request.headers.get("Authorization") != expected:
            return json_answer(401, {"error": "invalid_client"}, **{"X-Request-ID": "req-token-1"})
        if self.token_delay:
            threading.Event().wait(self.token_delay)
        with self._lock:
            self.token_requests.append(request)
            token = f"tok-{len(self.issued) + 1:04d}-0123456789abcdefghij"
            self.issued.append(token)
        return json_answer(
            200,
            {"access_token": token, "token_type": "Bearer", "expires_in": self.expires_in, "scope": "read"},
        )

    def revoke_all(self) -> None:
        """Make every token issued so far invalid."""
        self.revoked.update(self.issued)

    def api(self, method: str, path: str, handler: Handler) -> None:
        """Serve ``method path``: 401 for a missing, unknown or revoked token, else ``handler``."""

        def authorised(request: PreparedRequest) -> Answer:
            with self._lock:
                self.api_requests.append(request)
            token = bearer_of(request)
            if token not in self.issued or token in self.revoked:
                return (
                    401,
                    {"WWW-Authenticate": 'Bearer error="invalid_token"', "X-Request-ID": "req-401"},
                    json.dumps({"error": "invalid_token"}),
                )
            return handler(request)

        self.mock.add_callback(method, f"{API}{path}", callback=authorised)

    def answers(self, method: str, path: str, *answers: Answer) -> None:
        """Serve ``method path`` with the given answers in turn, repeating the last one."""
        remaining = list(answers)

        def next_answer(request: PreparedRequest) -> Answer:
            return remaining.pop(0) if len(remaining) > 1 else remaining[0]

        self.api(method, path, next_answer)

    def requests_to(self, path: str) -> list[PreparedRequest]:
        """Return the API requests made to ``path``."""
        return [request for request in self.api_requests if urlsplit(request.url).path == path]
