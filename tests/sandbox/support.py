"""Small helpers the sandbox's black-box tests share; they speak plain HTTP."""

from __future__ import annotations

from typing import Any

import requests

from dicom_ingest_sandbox.testing import UPLOAD_CONTENT_TYPE, Sandbox

TIMEOUT = 10.0
FINISHED = ("DELIVERED", "FAILED")


def bearer(token: str) -> dict[str, str]:
    """Return the Authorization header for a bearer token.

    :param token: the access token.
    """
    return {"Authorization": f"Bearer {token}"}


def api_get(sandbox: Sandbox, path: str, token: str | None = None, **params: str) -> requests.Response:
    """GET an API path, with a bearer token when given.

    :param sandbox: the running sandbox.
    :param path: the path, e.g. ``/status``.
    :param token: an access token.
    :param params: query parameters.
    """
    headers = bearer(token) if token else {}
    return requests.get(f"{sandbox.base_url}{path}", params=params, headers=headers, timeout=TIMEOUT)


def patch_metadata(sandbox: Sandbox, token: str, body: Any, **params: str) -> requests.Response:
    """PATCH ``/add-metadata`` with a JSON body.

    :param sandbox: the running sandbox.
    :param token: an access token.
    :param body: the JSON body.
    :param params: ``order_id`` or ``study_uid``.
    """
    return requests.patch(
        f"{sandbox.base_url}/add-metadata", params=params, json=body, headers=bearer(token), timeout=TIMEOUT
    )


def presign(sandbox: Sandbox, token: str) -> dict[str, Any]:
    """Ask ``/upload`` for a presigned URL and return its JSON answer.

    :param sandbox: the running sandbox.
    :param token: an access token with the ``upload`` scope.
    """
    response = api_get(sandbox, "/upload", token)
    assert response.status_code == 200, response.text
    return response.json()


def put(url: str, body: bytes, content_type: str = UPLOAD_CONTENT_TYPE) -> requests.Response:
    """PUT a body to a presigned URL, without any Authorization header.

    :param url: the presigned URL.
    :param body: the bytes to store.
    :param content_type: the Content-Type header to send.
    """
    return requests.put(url, data=body, headers={"Content-Type": content_type}, timeout=TIMEOUT)


def orders_of(state: dict[str, Any], study_uid: str) -> list[dict[str, Any]]:
    """Return a study's orders from a state document, oldest first.

    :param state: ``GET /_sandbox/state``.
    :param study_uid: the StudyInstanceUID.
    """
    return [order for order in state["orders"] if order["study_uid"] == study_uid]


def wait_for_order(sandbox: Sandbox, study_uid: str, count: int = 1, **expected: Any) -> list[dict[str, Any]]:
    """Wait until a study has ``count`` orders and its newest one matches ``expected``; return them.

    :param sandbox: the running sandbox.
    :param study_uid: the StudyInstanceUID.
    :param count: how many orders the study must have.
    :param expected: fields the newest order must have, e.g. ``status="DELIVERED"``.
    """

    def settled(state: dict[str, Any]) -> list[dict[str, Any]] | None:
        orders = orders_of(state, study_uid)
        if len(orders) != count:
            return None
        newest = orders[-1]
        return orders if all(newest.get(name) == value for name, value in expected.items()) else None

    return sandbox.wait_for(settled, timeout=20, interval=0.1)


def events(state: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """Return the audit events of one kind.

    :param state: ``GET /_sandbox/state``.
    :param name: the event name, e.g. ``status_changed``.
    """
    return [event for event in state["audit"] if event["event"] == name]
