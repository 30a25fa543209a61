"""Tokens by GET and POST, refused for bad clients, grants and scopes; bearer checks on each endpoint."""

from __future__ import annotations

import time

import pytest
import requests

from dicom_ingest_sandbox.testing import Sandbox
from tests.sandbox.support import TIMEOUT, api_get, bearer, patch_metadata

pytestmark = pytest.mark.sandbox

ALL_SCOPES = "upload metadata read"
# (method, path, the scope it needs); the query names an order that does not exist, so a
# call that passes the token checks answers 404 (or 200 for /upload).
PROTECTED = [
    ("GET", "/upload", "upload"),
    ("PATCH", "/add-metadata?order_id=unknown", "metadata"),
    ("GET", "/status?order_id=unknown", "read"),
    ("GET", "/orderId?study_uid=1.2.3", "read"),
]


def token_by_get(sandbox: Sandbox, **params: str) -> requests.Response:
    return requests.get(f"{sandbox.base_url}/oauth2/token", params=params, timeout=TIMEOUT)


def call(sandbox: Sandbox, method: str, path: str, headers: dict[str, str]) -> requests.Response:
    return requests.request(method, f"{sandbox.base_url}{path}", json={}, headers=headers, timeout=TIMEOUT)


def assert_token_answer(response: requests.Response, scope: str = ALL_SCOPES) -> str:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["scope"] == scope
    assert body["expires_in"] == 3600
    assert response.headers["Cache-Control"] == "no-store"
    return body["access_token"]


def assert_token_works(sandbox: Sandbox, token: str) -> None:
    answer = api_get(sandbox, "/test-token", token)
    assert answer.status_code == 200, answer.text
    assert answer.json()["active"] is True


def test_get_with_basic_credentials_issues_a_working_token(sandbox: Sandbox) -> None:
    response = requests.get(
        f"{sandbox.base_url}/oauth2/token",
        params={"grant_type": "client_credentials"},
        auth=(sandbox.client_id, sandbox.client_secret),
        timeout=TIMEOUT,
    )
    assert_token_works(sandbox, assert_token_answer(response))


def test_get_with_credentials_in_the_query_issues_a_working_token(sandbox: Sandbox) -> None:
    response = token_by_get(
        sandbox,
        grant_type="client_credentials",
        client_id=sandbox.client_id,
        client_secret=sandbox.client_secret,
    )
    assert_token_works(sandbox, assert_token_answer(response))


def test_post_form_with_basic_credentials_issues_a_working_token(sandbox: Sandbox) -> None:
    response = requests.post(
        f"{sandbox.base_url}/oauth2/token",
        data={"grant_type": "client_credentials"},
        auth=(sandbox.client_id, sandbox.client_secret),
        timeout=TIMEOUT,
    )
    assert_token_works(sandbox, assert_token_answer(response))


def test_post_form_with_credentials_in_the_body_issues_a_working_token(sandbox: Sandbox) -> None:
    form = {
        "grant_type": "client_credentials",
        "client_id": sandbox.client_id,
        "client_secret": sandbox.client_secret,
        "scope": "read",
    }
    response = requests.post(f"{sandbox.base_url}/oauth2/token", data=form, timeout=TIMEOUT)
    assert_token_works(sandbox, assert_token_answer(response, scope="read"))


@pytest.mark.parametrize("how", ["get-basic", "get-query", "post-basic", "post-form"])
@pytest.mark.parametrize("wrong", ["secret", "client id"])
def test_wrong_client_credentials_are_401_invalid_client(sandbox: Sandbox, how: str, wrong: str) -> None:
    client_id = "someone-else" if wrong == "client id" else sandbox.client_id
    secret = sandbox.client_secret + "x" if wrong == "secret" else sandbox.client_secret
    url = f"{sandbox.base_url}/oauth2/token"
    grant = {"grant_type": "client_credentials"}
    credentials = {"client_id": client_id, "client_secret": secret}
    if how == "get-basic":
        response = requests.get(url, params=grant, auth=(client_id, secret), timeout=TIMEOUT)
    elif how == "get-query":
        response = requests.get(url, params={**grant, **credentials}, timeout=TIMEOUT)
    elif how == "post-basic":
        response = requests.post(url, data=grant, auth=(client_id, secret), timeout=TIMEOUT)
    else:
        response = requests.post(url, data={**grant, **credentials}, timeout=TIMEOUT)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"
    assert "access_token" not in response.json()
    assert response.headers["WWW-Authenticate"].startswith("Basic")


def test_missing_client_credentials_are_401_invalid_client(sandbox: Sandbox) -> None:
    response = token_by_get(sandbox, grant_type="client_credentials")
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_other_grant_types_are_400_unsupported_grant_type(sandbox: Sandbox, method: str) -> None:
    fields = {"grant_type": "password", "username": "u", "password": "p"}
    response = requests.request(
        method,
        f"{sandbox.base_url}/oauth2/token",
        params=fields if method == "GET" else None,
        data=fields if method == "POST" else None,
        auth=(sandbox.client_id, sandbox.client_secret),
        timeout=TIMEOUT,
    )
    assert response.status_code == 400
    assert response.json()["error"] == "unsupported_grant_type"


def test_missing_grant_type_is_400_invalid_request(sandbox: Sandbox) -> None:
    response = token_by_get(sandbox, client_id=sandbox.client_id, client_secret=sandbox.client_secret)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"


def test_unknown_scope_is_400_invalid_scope(sandbox: Sandbox) -> None:
    response = token_by_get(
        sandbox,
        grant_type="client_credentials",
        scope="upload admin",
        client_id=sandbox.client_id,
        client_secret=sandbox.client_secret,
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_scope"


@pytest.mark.parametrize(("method", "path", "scope"), PROTECTED)
def test_missing_token_is_401_invalid_token(sandbox: Sandbox, method: str, path: str, scope: str) -> None:
    response = call(sandbox, method, path, headers={})
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


@pytest.mark.parametrize(("method", "path", "scope"), PROTECTED)
def test_tampered_token_is_401_invalid_token(
    sandbox: Sandbox, token: str, method: str, path: str, scope: str
) -> None:
    header, payload, signature = token.split(".")
    forged = f"{header}.{payload}.{signature[:-4]}AAAA"
    response = call(sandbox, method, path, headers=bearer(forged))
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"


@pytest.mark.parametrize(("method", "path", "scope"), PROTECTED)
def test_token_without_the_endpoints_scope_is_403(
    sandbox: Sandbox, method: str, path: str, scope: str
) -> None:
    other_scopes = " ".join(name for name in ALL_SCOPES.split() if name != scope)
    response = call(sandbox, method, path, headers=bearer(sandbox.token(other_scopes)))
    assert response.status_code == 403
    assert response.json()["error"] == "insufficient_scope"
    assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]


@pytest.mark.parametrize(("method", "path", "scope"), PROTECTED)
def test_token_with_only_the_endpoints_scope_passes(
    sandbox: Sandbox, method: str, path: str, scope: str
) -> None:
    response = call(sandbox, method, path, headers=bearer(sandbox.token(scope)))
    assert response.status_code in (200, 404), response.text


def test_expired_token_is_401_and_a_fresh_one_works(sandbox: Sandbox) -> None:
    with sandbox.clocks(token_ttl=2):
        short_lived = sandbox.token()
    assert api_get(sandbox, "/test-token", short_lived).status_code == 200
    time.sleep(2.5)
    response = api_get(sandbox, "/status", short_lived, order_id="unknown")
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"
    assert "expired" in response.json()["error_description"]
    assert api_get(sandbox, "/status", sandbox.token(), order_id="unknown").status_code == 404


def test_test_token_describes_a_valid_token(sandbox: Sandbox) -> None:
    response = api_get(sandbox, "/test-token", sandbox.token("read upload"))
    assert response.status_code == 200
    body = response.json()
    assert body["active"] is True
    assert body["scope"] == "upload read"
    assert 0 < body["expires_in"] <= 3600


def test_test_token_refuses_a_garbage_token(sandbox: Sandbox) -> None:
    response = api_get(sandbox, "/test-token", "not-a-token")
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_token"


def test_credentials_in_two_places_at_once_are_refused(sandbox: Sandbox) -> None:
    response = requests.get(
        f"{sandbox.base_url}/oauth2/token",
        params={"grant_type": "client_credentials", "client_id": sandbox.client_id},
        auth=(sandbox.client_id, sandbox.client_secret),
        timeout=TIMEOUT,
    )
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


def test_every_answer_carries_its_own_request_id(sandbox: Sandbox, token: str) -> None:
    answers = [
        api_get(sandbox, "/test-token", token),
        api_get(sandbox, "/status", token, order_id="unknown"),
        api_get(sandbox, "/upload"),
        patch_metadata(sandbox, token, [], order_id="unknown"),
        requests.get(f"{sandbox.base_url}/_sandbox/state", timeout=TIMEOUT),
    ]
    request_ids = [answer.headers["X-Request-ID"] for answer in answers]
    assert all(len(request_id) == 32 and int(request_id, 16) >= 0 for request_id in request_ids)
    assert len(set(request_ids)) == len(request_ids)
