"""Orders: grouping by study, the overwrite window, metadata from tags and PATCH, and the status clocks."""

from __future__ import annotations

import hashlib
import re
import time
from datetime import datetime

import pytest

from dicom_ingest_sandbox.testing import Sandbox, build_instance, new_uid
from tests.sandbox.support import api_get, events, orders_of, patch_metadata, wait_for_order

pytestmark = pytest.mark.sandbox

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def audit_time(event: dict) -> float:
    return datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()


def test_first_instance_opens_an_order_seen_by_status_and_order_id(sandbox: Sandbox, token: str) -> None:
    study_uid = new_uid()
    sandbox.put_object(build_instance(study_uid), token)
    (order,) = wait_for_order(sandbox, study_uid)

    listing = api_get(sandbox, "/orderId", token, study_uid=study_uid)
    assert listing.status_code == 200
    assert listing.json() == {"study_uid": study_uid, "order_ids": [order["order_id"]]}
    by_order = api_get(sandbox, "/status", token, order_id=order["order_id"]).json()
    by_study = api_get(sandbox, "/status", token, study_uid=study_uid).json()
    assert by_order["order_id"] == by_study["order_id"] == order["order_id"]
    assert by_order["study_uid"] == study_uid
    assert by_order["status"] == "UPLOADING"
    assert by_order["instances_received"] == 1
    assert by_order["metadata_complete"] is True
    assert by_order["reason"] is None
    assert ISO_UTC.match(by_order["created_at"]) and ISO_UTC.match(by_order["updated_at"])
    assert set(by_order) == {
        "order_id",
        "study_uid",
        "status",
        "instances_received",
        "metadata_complete",
        "reason",
        "created_at",
        "updated_at",
    }


def test_instances_within_the_window_join_one_order_and_a_repeated_sop_replaces(
    sandbox: Sandbox, token: str
) -> None:
    study_uid, first_sop, second_sop = new_uid(), new_uid(), new_uid()
    sandbox.put_object(build_instance(study_uid, first_sop), token)
    sandbox.put_object(build_instance(study_uid, second_sop), token)
    wait_for_order(sandbox, study_uid, instances_received=2)
    resent_key = sandbox.put_object(build_instance(study_uid, first_sop, accession_number="A2"), token)

    def resend_filed(state: dict) -> dict | None:
        filed = [event for event in events(state, "object_received") if event["key"] == resent_key]
        return orders_of(state, study_uid) and filed and filed[0]

    received = sandbox.wait_for(resend_filed, timeout=10, interval=0.1)
    assert received["replaced"] is True
    (order,) = orders_of(sandbox.state(), study_uid)
    assert order["instances_received"] == 2
    keys_by_sop = {instance["sop_instance_uid"]: instance["key"] for instance in order["instances"]}
    assert keys_by_sop[first_sop] == resent_key


def test_a_resend_after_the_window_opens_a_duplicate_order(sandbox: Sandbox, token: str) -> None:
    study_uid = new_uid()
    with sandbox.clocks(overwrite_window=0.5, quiet_period=30):
        sandbox.put_object(build_instance(study_uid), token)
        (first,) = wait_for_order(sandbox, study_uid)
        time.sleep(1.0)
        sandbox.put_object(build_instance(study_uid), token)
        first_again, second = wait_for_order(sandbox, study_uid, count=2)
    assert first_again["order_id"] == first["order_id"]
    assert first_again["status"] == second["status"] == "UPLOADING"
    listing = api_get(sandbox, "/orderId", token, study_uid=study_uid).json()
    assert listing["order_ids"] == [first["order_id"], second["order_id"]]
    newest = api_get(sandbox, "/status", token, study_uid=study_uid).json()
    assert newest["order_id"] == second["order_id"]


def test_complete_order_starts_after_the_quiet_period_and_is_delivered_after_processing(
    sandbox: Sandbox, token: str
) -> None:
    study_uid = new_uid()
    for _ in range(3):
        sandbox.put_object(build_instance(study_uid, accession_number="ACC-1"), token)
    wait_for_order(sandbox, study_uid, instances_received=3, status="DELIVERED")

    state = sandbox.state()
    (order,) = orders_of(state, study_uid)
    assert order["metadata"] == {"patient_age": 45, "patient_sex": "F", "accession_number": "ACC-1"}
    changes = [event for event in events(state, "status_changed") if event["order_id"] == order["order_id"]]
    assert [(event["previous"], event["status"]) for event in changes] == [
        ("UPLOADING", "DX_STARTED"),
        ("DX_STARTED", "DELIVERED"),
    ]
    last_instance = max(audit_time(event) for event in events(state, "object_received"))
    started, delivered = (audit_time(event) for event in changes)
    # The session's clocks: quiet period 1 s, processing 0.5 s (audit times have millisecond steps).
    assert started - last_instance >= 1.0 - 0.002
    assert delivered - started >= 0.5 - 0.002


def test_complete_order_keeps_uploading_while_the_quiet_period_runs(sandbox: Sandbox, token: str) -> None:
    study_uid = new_uid()
    with sandbox.clocks(quiet_period=30):
        sandbox.put_object(build_instance(study_uid), token)
        wait_for_order(sandbox, study_uid)
        time.sleep(1.0)
        status = api_get(sandbox, "/status", token, study_uid=study_uid).json()
    assert status["metadata_complete"] is True
    assert status["status"] == "UPLOADING"


def test_an_instance_for_a_delivered_order_opens_a_new_order(sandbox: Sandbox, token: str) -> None:
    study_uid = new_uid()
    sandbox.put_object(build_instance(study_uid), token)
    (delivered,) = wait_for_order(sandbox, study_uid, status="DELIVERED")
    sandbox.put_object(build_instance(study_uid), token)
    first, second = wait_for_order(sandbox, study_uid, count=2)
    assert first["order_id"] == delivered["order_id"]
    assert second["order_id"] != delivered["order_id"]
    assert second["instances_received"] == 1


@pytest.mark.parametrize("selector", ["order_id", "study_uid"])
def test_metadata_by_patch_completes_an_order_missing_a_tag(
    sandbox: Sandbox, token: str, selector: str
) -> None:
    study_uid = new_uid()
    sandbox.put_object(build_instance(study_uid, patient_age=None), token)
    (order,) = wait_for_order(sandbox, study_uid)
    assert order["metadata_complete"] is False
    target = {"order_id": order["order_id"]} if selector == "order_id" else {"study_uid": study_uid}

    response = patch_metadata(sandbox, token, {"patient_age": 63}, **target)

    assert response.status_code == 200, response.text
    assert response.json()["order_id"] == order["order_id"]
    assert response.json()["metadata_complete"] is True
    (delivered,) = wait_for_order(sandbox, study_uid, status="DELIVERED")
    assert delivered["metadata"] == {"patient_age": 63, "patient_sex": "F"}
    (patched,) = events(sandbox.state(), "metadata_patched")
    assert patched["fields"] == ["patient_age"]


def test_patched_metadata_wins_over_tags(sandbox: Sandbox, token: str) -> None:
    study_uid = new_uid()
    sandbox.put_object(build_instance(study_uid, patient_sex="F"), token)
    (order,) = wait_for_order(sandbox, study_uid)
    assert patch_metadata(sandbox, token, {"patient_sex": "M"}, order_id=order["order_id"]).status_code == 200
    sandbox.put_object(build_instance(study_uid, patient_sex="F"), token)
    (order,) = wait_for_order(sandbox, study_uid, instances_received=2)
    assert order["metadata"]["patient_sex"] == "M"


@pytest.mark.parametrize(
    ("age_tag", "years"),
    [("045Y", 45), ("090Y", 90), ("102Y", 90), ("011M", 0), ("003W", 0), ("006D", 0)],
)
def test_patient_age_tag_becomes_whole_years_capped_at_90(
    sandbox: Sandbox, token: str, age_tag: str, years: int
) -> None:
    study_uid = new_uid()
    sandbox.put_object(build_instance(study_uid, patient_age=age_tag), token)
    (order,) = wait_for_order(sandbox, study_uid)
    assert order["metadata"]["patient_age"] == years


@pytest.mark.parametrize(("sex_tag", "expected"), [("M", "M"), ("F", "F"), ("O", "O"), ("X", None)])
def test_patient_sex_tag_maps_m_f_o_only(
    sandbox: Sandbox, token: str, sex_tag: str, expected: str | None
) -> None:
    study_uid = new_uid()
    sandbox.put_object(build_instance(study_uid, patient_sex=sex_tag), token)
    (order,) = wait_for_order(sandbox, study_uid)
    assert order["metadata"].get("patient_sex") == expected
    assert order["metadata_complete"] is (expected is not None)


def test_order_missing_metadata_past_the_deadline_fails_with_metadata_timeout(
    sandbox: Sandbox, token: str
) -> None:
    study_uid = new_uid()
    with sandbox.clocks(metadata_deadline=1.5):
        sandbox.put_object(build_instance(study_uid, patient_age=None, patient_sex=None), token)
        (order,) = wait_for_order(sandbox, study_uid, status="FAILED")
    assert order["reason"] == "metadata_timeout"
    status = api_get(sandbox, "/status", token, order_id=order["order_id"]).json()
    assert (status["status"], status["reason"]) == ("FAILED", "metadata_timeout")
    late = patch_metadata(sandbox, token, {"patient_age": 50, "patient_sex": "M"}, order_id=order["order_id"])
    assert late.status_code == 409
    assert late.json()["error"] == "order_not_active"


def test_no_required_metadata_means_tagless_orders_complete(sandbox: Sandbox, token: str) -> None:
    study_uid = new_uid()
    with sandbox.clocks(required_metadata=[]):
        sandbox.put_object(build_instance(study_uid, patient_age=None, patient_sex=None), token)
        (order,) = wait_for_order(sandbox, study_uid, status="DELIVERED")
    assert order["metadata_complete"] is True


def test_a_non_dicom_object_is_rejected_and_counted_nowhere(sandbox: Sandbox, token: str) -> None:
    body = b"this is not a DICOM file"
    key = sandbox.put_object(body, token)
    objects = sandbox.wait_for(lambda state: state["objects"], timeout=10)
    md5 = hashlib.md5(body).hexdigest()
    assert objects == [
        {
            "key": key,
            "size": len(body),
            "md5": md5,
            "accepted": False,
            "order_id": None,
            "reason": "not_dicom",
        }
    ]
    state = sandbox.state()
    assert state["orders"] == []
    (rejected,) = events(state, "object_rejected")
    assert (rejected["key"], rejected["reason"]) == (key, "not_dicom")


def test_add_metadata_answers_400_404_and_422(sandbox: Sandbox, token: str) -> None:
    study_uid = new_uid()
    sandbox.put_object(build_instance(study_uid), token)
    (order,) = wait_for_order(sandbox, study_uid)

    assert patch_metadata(sandbox, token, {"a": 1}).status_code == 400
    both = patch_metadata(sandbox, token, {"a": 1}, order_id=order["order_id"], study_uid=study_uid)
    assert both.status_code == 400
    unknown_order = patch_metadata(sandbox, token, {"a": 1}, order_id="no-such-order")
    assert (unknown_order.status_code, unknown_order.json()["error"]) == (404, "order_not_found")
    unknown_study = patch_metadata(sandbox, token, {"a": 1}, study_uid=new_uid())
    assert unknown_study.status_code == 404
    for not_an_object in ([1, 2], "text", 42, None):
        answer = patch_metadata(sandbox, token, not_an_object, order_id=order["order_id"])
        assert answer.status_code == 422, not_an_object
    assert events(sandbox.state(), "metadata_patched") == []


def test_status_and_order_id_answer_400_and_404(sandbox: Sandbox, token: str) -> None:
    assert api_get(sandbox, "/status", token).status_code == 400
    assert api_get(sandbox, "/status", token, order_id="x", study_uid="1.2").status_code == 400
    unknown = api_get(sandbox, "/status", token, order_id="no-such-order")
    assert (unknown.status_code, unknown.json()["error"]) == (404, "order_not_found")
    assert api_get(sandbox, "/status", token, study_uid=new_uid()).status_code == 404
    assert api_get(sandbox, "/orderId", token).status_code == 400
    no_orders = api_get(sandbox, "/orderId", token, study_uid=new_uid())
    assert (no_orders.status_code, no_orders.json()["error"]) == (404, "study_not_found")
