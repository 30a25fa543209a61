"""Fault injection and the admin endpoints: each fault kind, its count/after/rate, and admin access."""

from __future__ import annotations

import pytest
import requests

from dicom_ingest_sandbox.testing import Sandbox, build_instance, new_uid
from tests.sandbox.support import TIMEOUT, api_get, presign, put

pytestmark = pytest.mark.sandbox


def check_token(sandbox: Sandbox, token: str) -> int:
    """Call /test-token and return the HTTP status."""
    return api_get(sandbox, "/test-token", token).status_code


@pytest.mark.parametrize(("status", "retry_after"), [(429, 7), (500, None), (503, 2)])
def test_status_fault_answers_the_next_n_calls_then_lets_calls_through(
    sandbox: Sandbox, token: str, status: int, retry_after: int | None
) -> None:
    spec = {"endpoint": "upload", "status": status, "count": 2}
    if retry_after is not None:
        spec["retry_after"] = retry_after
    sandbox.faults(spec)

    faulted = [api_get(sandbox, "/upload", token) for _ in range(2)]
    recovered = api_get(sandbox, "/upload", token)

    for answer in faulted:
        assert answer.status_code == status
        assert answer.json()["error"] == "injected_fault"
        assert answer.headers.get("Retry-After") == (str(retry_after) if retry_after is not None else None)
    assert recovered.status_code == 200
    assert sandbox.state()["faults"] == []
    assert sandbox.state()["calls"]["upload"] == 3


def test_status_fault_after_skips_matching_calls_first(sandbox: Sandbox, token: str) -> None:
    sandbox.faults({"endpoint": "test-token", "status": 500, "after": 2})
    assert [check_token(sandbox, token) for _ in range(4)] == [200, 200, 500, 200]


def test_status_fault_hits_only_its_endpoint(sandbox: Sandbox, token: str) -> None:
    sandbox.faults({"endpoint": "status", "status": 503})
    assert check_token(sandbox, token) == 200
    assert api_get(sandbox, "/status", token, order_id="x").status_code == 503


def test_wildcard_fault_hits_any_endpoint_including_the_token_endpoint(sandbox: Sandbox, token: str) -> None:
    sandbox.faults({"endpoint": "*", "status": 500, "count": 2})
    token_call = requests.get(
        f"{sandbox.base_url}/oauth2/token",
        params={"grant_type": "client_credentials"},
        auth=(sandbox.client_id, sandbox.client_secret),
        timeout=TIMEOUT,
    )
    assert token_call.status_code == 500
    assert check_token(sandbox, token) == 500
    assert check_token(sandbox, token) == 200


@pytest.mark.parametrize(("rate", "expected"), [(1.0, 500), (0.0, 200)])
def test_rate_fault_fires_with_its_probability_until_cleared(
    sandbox: Sandbox, token: str, rate: float, expected: int
) -> None:
    sandbox.faults({"endpoint": "test-token", "status": 500, "rate": rate})
    assert [check_token(sandbox, token) for _ in range(5)] == [expected] * 5
    sandbox.clear_faults()
    assert check_token(sandbox, token) == 200


def test_latency_fault_holds_the_call_beyond_a_clients_timeout(sandbox: Sandbox, token: str) -> None:
    sandbox.faults({"kind": "latency", "endpoint": "test-token", "seconds": 3})
    with pytest.raises(requests.ReadTimeout):
        requests.get(
            f"{sandbox.base_url}/test-token", headers={"Authorization": f"Bearer {token}"}, timeout=0.5
        )
    assert check_token(sandbox, token) == 200


def test_revoke_tokens_invalidates_every_token_issued_so_far(sandbox: Sandbox) -> None:
    before = sandbox.token()
    assert check_token(sandbox, before) == 200
    sandbox.faults({"kind": "revoke_tokens"})
    revoked = api_get(sandbox, "/test-token", before)
    assert revoked.status_code == 401
    assert revoked.json()["error"] == "invalid_token"
    assert "revoked" in revoked.json()["error_description"]
    assert check_token(sandbox, sandbox.token()) == 200


def test_expired_urls_fault_makes_the_next_urls_expired(sandbox: Sandbox, token: str) -> None:
    sandbox.faults({"kind": "expired_urls", "count": 1})
    expired, fresh = presign(sandbox, token), presign(sandbox, token)
    assert expired["expires_in"] == fresh["expires_in"] == 900
    refused = put(expired["url"], build_instance(new_uid()))
    assert refused.status_code in (400, 403)
    assert "<Code>AccessDenied</Code>" in refused.text
    assert put(fresh["url"], build_instance(new_uid())).status_code == 200


def test_drop_connection_cuts_the_response_into_a_transport_error(sandbox: Sandbox, token: str) -> None:
    sandbox.faults({"kind": "drop_connection", "endpoint": "upload"})
    with pytest.raises((requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        requests.get(f"{sandbox.base_url}/upload", headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert api_get(sandbox, "/upload", token).status_code == 200
    state = sandbox.state()
    assert state["calls"]["upload"] == 2
    # The call was handled before its answer was cut: two URLs were issued.
    assert [event["event"] for event in state["audit"]].count("url_issued") == 2


def test_faults_are_listed_in_state_and_cleared_by_delete(sandbox: Sandbox) -> None:
    answer = sandbox.faults(
        {"endpoint": "status", "status": 500, "count": 3},
        {"kind": "latency", "endpoint": "*", "seconds": 0.1, "count": 2},
        {"kind": "expired_urls", "count": 4},
    )
    described = answer["faults"]
    assert [(fault["kind"], fault["remaining"]) for fault in described] == [
        ("status", 3),
        ("latency", 2),
        ("expired_urls", 4),
    ]
    assert sandbox.state()["faults"] == described
    sandbox.clear_faults()
    assert sandbox.state()["faults"] == []


@pytest.mark.parametrize(
    "spec",
    [
        {"endpoint": "nowhere", "status": 500},
        {"endpoint": "upload", "status": 404},
        {"endpoint": "upload", "status": 500, "rate": 1.5},
        {"kind": "latency", "endpoint": "upload"},
        {"kind": "earthquake"},
        {"endpoint": "upload", "status": 500, "colour": "red"},
    ],
)
def test_invalid_fault_specs_are_422_and_change_nothing(sandbox: Sandbox, spec: dict) -> None:
    response = requests.post(
        f"{sandbox.base_url}/_sandbox/faults",
        json=spec,
        headers={"X-Admin-Token": sandbox.admin_token},
        timeout=TIMEOUT,
    )
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_fault"
    assert sandbox.state()["faults"] == []


def test_calls_are_counted_per_endpoint_and_reset(sandbox: Sandbox, token: str) -> None:
    check_token(sandbox, token)
    api_get(sandbox, "/status", token, order_id="x")
    api_get(sandbox, "/status", token, order_id="y")
    calls = sandbox.state()["calls"]
    assert calls == {"token": 1, "upload": 0, "add-metadata": 0, "status": 2, "orderId": 0, "test-token": 1}
    sandbox.reset()
    assert set(sandbox.state()["calls"].values()) == {0}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/_sandbox/state"),
        ("POST", "/_sandbox/faults"),
        ("DELETE", "/_sandbox/faults"),
        ("GET", "/_sandbox/config"),
        ("POST", "/_sandbox/config"),
        ("POST", "/_sandbox/reset"),
    ],
)
def test_admin_endpoints_need_the_admin_token(sandbox: Sandbox, token: str, method: str, path: str) -> None:
    url = f"{sandbox.base_url}{path}"
    body = {"endpoint": "upload", "status": 500}
    missing = requests.request(method, url, json=body, timeout=TIMEOUT)
    wrong = requests.request(method, url, json=body, headers={"X-Admin-Token": "wrong"}, timeout=TIMEOUT)
    as_client = requests.request(
        method, url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT
    )
    assert missing.status_code == 401
    assert wrong.status_code == 403
    assert as_client.status_code == 401
    assert sandbox.state()["faults"] == []


def test_config_changes_clocks_at_run_time_and_refuses_bad_values(sandbox: Sandbox) -> None:
    admin = {"X-Admin-Token": sandbox.admin_token}
    url = f"{sandbox.base_url}/_sandbox/config"
    before = sandbox.clock_settings()
    with sandbox.clocks(quiet_period=7.5, required_metadata=["accession_number"]):
        during = sandbox.clock_settings()
        assert during["quiet_period"] == 7.5
        assert during["required_metadata"] == ["accession_number"]
        for bad in ({"quiet_period": -1}, {"bogus": 1}, {"url_ttl": 0}, {"required_metadata": ["Bad Name"]}):
            assert requests.post(url, json=bad, headers=admin, timeout=TIMEOUT).status_code == 422, bad
        assert sandbox.clock_settings() == during
    assert sandbox.clock_settings() == before


def test_health_reports_api_and_store_without_credentials(sandbox: Sandbox) -> None:
    response = requests.get(f"{sandbox.base_url}/_sandbox/health", timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.json() == {"api": "ok", "store": "ok"}
