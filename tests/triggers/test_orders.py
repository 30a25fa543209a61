"""DicomOrderTrigger: serialization, and every way its wait ends, against the real sandbox."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from airflow.sdk.module_loading import import_string
from airflow.sdk.serde import deserialize, serialize
from airflow.triggers.base import TriggerEvent

from dicom_ingest.triggers.orders import DicomOrderTrigger
from dicom_ingest_sandbox.testing import Sandbox
from tests.hooks.support import set_connection
from tests.sensors.support import CONN_ID, POLL_SECONDS, connect_to, send_study

CLASSPATH = "dicom_ingest.triggers.orders.DicomOrderTrigger"
WAIT_LIMIT_SECONDS = 20


def make_trigger(order_ids: list[str], *, deadline_in: float | None = WAIT_LIMIT_SECONDS, **kwargs: Any):
    """Build the trigger on the tests' connection, polling every 0.2 s."""
    deadline = None if deadline_in is None else time.time() + deadline_in
    return DicomOrderTrigger(
        conn_id=CONN_ID, order_ids=order_ids, poll_interval=POLL_SECONDS, deadline=deadline, **kwargs
    )


def run_to_end(trigger: DicomOrderTrigger) -> list[TriggerEvent]:
    """Drive ``run()`` to its end as the triggerer would, and return every event it yielded."""

    async def drive() -> list[TriggerEvent]:
        return [event async for event in trigger.run()]

    return asyncio.run(asyncio.wait_for(drive(), WAIT_LIMIT_SECONDS + 10))


def only_payload(trigger: DicomOrderTrigger) -> dict[str, Any]:
    """Run the trigger and return the payload of the one event it must yield."""
    events = run_to_end(trigger)
    assert len(events) == 1
    payload = events[0].payload
    json.dumps(payload)  # what the triggerer stores must be plain JSON
    return payload


# -- serialization ------------------------------------------------------------------------------------


def test_serialize_round_trips_through_the_classpath():
    trigger = DicomOrderTrigger(
        conn_id="vendor",
        order_ids=["order-1", "order-2"],
        poll_interval=30.0,
        deadline=1_900_000_000.5,
        done_statuses=["DELIVERED"],
        failed_statuses=["FAILED", "EXPIRED"],
    )

    classpath, kwargs = trigger.serialize()
    rebuilt = import_string(classpath)(**kwargs)

    assert classpath == CLASSPATH
    assert kwargs == {
        "conn_id": "vendor",
        "order_ids": ["order-1", "order-2"],
        "poll_interval": 30.0,
        "deadline": 1_900_000_000.5,
        "done_statuses": ["DELIVERED"],
        "failed_statuses": ["FAILED", "EXPIRED"],
    }
    assert rebuilt.serialize() == (classpath, kwargs)


def test_serialized_arguments_survive_airflow_serde_as_the_task_runner_stores_them():
    trigger = DicomOrderTrigger(conn_id="vendor", order_ids=["order-1"], poll_interval=5, deadline=None)
    classpath, kwargs = trigger.serialize()

    stored = json.loads(json.dumps(serialize(kwargs)))
    rebuilt = import_string(classpath)(**deserialize(stored))

    assert rebuilt.serialize() == (classpath, kwargs)


def test_a_non_positive_poll_interval_is_refused():
    with pytest.raises(ValueError, match="poll_interval"):
        DicomOrderTrigger(conn_id="vendor", order_ids=["order-1"], poll_interval=0)


# -- how the wait ends ---------------------------------------------------------------------------------


@pytest.mark.sandbox
def test_success_when_every_order_is_delivered(vendor: Sandbox):
    first, second = send_study(vendor), send_study(vendor, instances=3)

    payload = only_payload(make_trigger([first.order_id, second.order_id]))

    assert payload["status"] == "success"
    assert payload["orders"] == {
        first.order_id: {
            "study_uid": first.study_uid,
            "status": "DELIVERED",
            "reason": None,
            "outcome": "done",
        },
        second.order_id: {
            "study_uid": second.study_uid,
            "status": "DELIVERED",
            "reason": None,
            "outcome": "done",
        },
    }
    assert payload["message"] == "2 of 2 orders done"


@pytest.mark.sandbox
def test_failed_when_an_order_fails_for_missing_metadata(vendor: Sandbox):
    vendor.configure(metadata_deadline=2)
    delivered, failing = send_study(vendor), send_study(vendor, complete_metadata=False)

    payload = only_payload(make_trigger([delivered.order_id, failing.order_id]))

    assert payload["status"] == "failed"
    assert payload["orders"][delivered.order_id]["outcome"] == "done"
    assert payload["orders"][failing.order_id] == {
        "study_uid": failing.study_uid,
        "status": "FAILED",
        "reason": "metadata_timeout",
        "outcome": "failed",
    }
    assert payload["message"] == "1 of 2 orders failed"


@pytest.mark.sandbox
def test_timeout_reports_the_orders_still_running(vendor: Sandbox):
    delivered, waiting = send_study(vendor), send_study(vendor, complete_metadata=False)
    vendor.wait_for(lambda state: any(order["status"] == "DELIVERED" for order in state["orders"]))

    payload = only_payload(make_trigger([delivered.order_id, waiting.order_id], deadline_in=1.0))

    assert payload["status"] == "timeout"
    assert payload["orders"][delivered.order_id]["outcome"] == "done"
    assert payload["orders"][waiting.order_id] == {
        "study_uid": waiting.study_uid,
        "status": "UPLOADING",
        "reason": None,
        "outcome": "pending",
    }
    assert "1 of 2 orders not finished" in payload["message"]


@pytest.mark.sandbox
def test_a_transient_503_on_status_is_retried_at_the_next_poll(vendor: Sandbox, monkeypatch):
    connect_to(monkeypatch, vendor, max_retries=0)
    study = send_study(vendor)
    vendor.faults({"endpoint": "status", "status": 503, "count": 3})

    payload = only_payload(make_trigger([study.order_id]))

    assert payload["status"] == "success"
    assert vendor.state()["calls"]["status"] >= 4


@pytest.mark.sandbox
def test_refused_credentials_end_the_wait_with_an_error_that_hides_the_secret(vendor: Sandbox, monkeypatch):
    wrong_secret = "Wrong-Secret-Value-4d1c"
    study = send_study(vendor)
    set_connection(
        monkeypatch,
        CONN_ID,
        host=vendor.base_url,
        login=vendor.client_id,
        password=wrong_secret,
        max_retries=0,
    )
    calls_before = vendor.state()["calls"]

    payload = only_payload(make_trigger([study.order_id]))

    calls = vendor.state()["calls"]
    assert payload["status"] == "error"
    assert "token" in payload["message"]
    assert wrong_secret not in json.dumps(payload)
    assert payload["orders"][study.order_id]["outcome"] == "pending"
    assert calls["token"] - calls_before["token"] == 1, "refused credentials are not asked again"
    assert calls.get("status", 0) == 0


def test_a_missing_connection_ends_the_wait_with_an_error():
    payload = only_payload(
        DicomOrderTrigger(conn_id="no_such_connection", order_ids=["order-1"], poll_interval=POLL_SECONDS)
    )

    assert payload["status"] == "error"
    assert "no_such_connection" in payload["message"]
    assert payload["orders"] == {
        "order-1": {"study_uid": None, "status": None, "reason": None, "outcome": "pending"}
    }


@pytest.mark.sandbox
def test_an_unknown_order_ends_the_wait_with_an_error(vendor: Sandbox):
    payload = only_payload(make_trigger(["no-such-order"]))

    assert payload["status"] == "error"
    assert "404" in payload["message"]


@pytest.mark.sandbox
def test_custom_status_words_decide_what_done_means(vendor: Sandbox):
    study = send_study(vendor, complete_metadata=False)

    payload = only_payload(make_trigger([study.order_id], done_statuses=["uploading"]))

    assert payload["status"] == "success"
    assert payload["orders"][study.order_id]["status"] == "UPLOADING"
