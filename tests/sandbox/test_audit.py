"""The audit log records every kind of event, and nothing secret or identifying."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from dicom_ingest_sandbox.testing import Sandbox, build_instance, new_uid
from tests.sandbox.support import TIMEOUT, bearer, events, patch_metadata, presign, put, wait_for_order

pytestmark = pytest.mark.sandbox

PATIENT = {
    "patient_name": "Confidentialname^Pat",
    "patient_id": "PHI-ID-48151623",
    "patient_birth_date": "19471123",
    "accession_number": "ACC-PHI-7788",
}
PATCHED = {"patient_age": 77, "referring_physician": "Dr^Privatedoctor"}


def test_audit_log_has_every_event_kind_and_no_secret_or_phi(sandbox: Sandbox) -> None:
    refused = requests.get(
        f"{sandbox.base_url}/oauth2/token",
        params={"grant_type": "client_credentials"},
        auth=(sandbox.client_id, "a-wrong-secret-value"),
        timeout=TIMEOUT,
    )
    assert refused.status_code == 401
    token = sandbox.token()
    study_uid = new_uid()
    presigned = presign(sandbox, token)
    assert put(presigned["url"], build_instance(study_uid, patient_age=None, **PATIENT)).status_code == 200
    rejected_key = sandbox.put_object(b"plain text, not DICOM", token)
    (order,) = wait_for_order(sandbox, study_uid)
    assert patch_metadata(sandbox, token, PATCHED, order_id=order["order_id"]).status_code == 200
    assert requests.get(f"{sandbox.base_url}/test-token", headers=bearer(token), timeout=TIMEOUT).ok
    wait_for_order(sandbox, study_uid, status="DELIVERED")

    lines = sandbox.audit_path.read_text().splitlines()
    logged = [json.loads(line) for line in lines]
    assert logged == sandbox.state()["audit"]
    kinds = {event["event"] for event in logged}
    assert {
        "token_issued",
        "token_refused",
        "url_issued",
        "order_opened",
        "object_received",
        "object_rejected",
        "metadata_patched",
        "status_changed",
    } <= kinds
    (issued, *_) = events({"audit": logged}, "token_issued")
    assert (issued["client_id"], issued["scope"]) == (sandbox.client_id, "upload metadata read")
    assert any(event.get("key") == presigned["key"] for event in events({"audit": logged}, "url_issued"))
    (rejected,) = events({"audit": logged}, "object_rejected")
    assert rejected["key"] == rejected_key
    (patched,) = events({"audit": logged}, "metadata_patched")
    assert patched["fields"] == sorted(PATCHED)

    signature = parse_qs(urlsplit(presigned["url"]).query)["X-Amz-Signature"][0]
    forbidden = {
        "client secret": sandbox.client_secret,
        "wrong secret": "a-wrong-secret-value",
        "admin token": sandbox.admin_token,
        "access token": token,
        "token signature": token.rsplit(".", 1)[1],
        "URL signature": signature,
        "URL query": "X-Amz-",
        **PATIENT,
        "patched value": "Privatedoctor",
    }
    text = "\n".join(lines)
    for what, value in forbidden.items():
        assert value not in text, f"the audit log contains the {what}"
        assert value not in sandbox.output(), f"the sandbox's output contains the {what}"
    metadata_values = (PATCHED["patient_age"], "F")  # the patched age and the PatientSex tag
    assert not [event for event in logged if any(value in metadata_values for value in event.values())]


def with_overlong_sop_instance_uid(instance: bytes) -> bytes:
    """Damage an instance: the SOPInstanceUID's length field swallows the patient elements after it."""
    element = instance.index(b"\x08\x00\x18\x00UI")  # (0008,0018) UI, explicit VR little endian
    damaged = bytearray(instance)
    damaged[element + 6 : element + 8] = (0xB2).to_bytes(2, "little")
    return bytes(damaged)


def test_a_damaged_header_is_rejected_and_its_values_reach_no_log(sandbox: Sandbox, token: str) -> None:
    patient_name = "Leakyname^Pat"
    damaged = with_overlong_sop_instance_uid(build_instance(new_uid(), patient_name=patient_name))
    key = sandbox.put_object(damaged, token)
    (stored,) = sandbox.wait_for(lambda state: state["objects"], timeout=10)
    assert (stored["key"], stored["accepted"]) == (key, False)
    assert stored["reason"] in ("missing_uid", "unreadable")
    assert sandbox.state()["orders"] == []
    assert "Leakyname" not in sandbox.output()
    assert "Leakyname" not in sandbox.audit_path.read_text()
