"""DicomOrderSensor: the sync check, deferral, poke mode and every way the trigger's wait can end.

The ledger is a real SQLite file; the vendor is the session's sandbox (reached through an
``AIRFLOW_CONN_*`` connection), so no Airflow database is needed.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
from airflow.sdk.exceptions import (
    AirflowException,
    AirflowFailException,
    AirflowSensorTimeout,
    AirflowSkipException,
    TaskDeferred,
)

from dicom_ingest.ledger import Ledger, StudyState
from dicom_ingest.links import DicomBatchOrdersLink
from dicom_ingest.sensors.orders import DEFERRAL_TIMEOUT_GRACE, STUDIES_NAMED_IN_ERRORS, DicomOrderSensor
from dicom_ingest.triggers.orders import DicomOrderTrigger
from dicom_ingest_sandbox.testing import Sandbox, new_uid
from tests.sensors.support import (
    BATCH_ID,
    CONN_ID,
    POLL_SECONDS,
    RUN_ID,
    SITE_ID,
    fake_study,
    record_held,
    record_metadata_sent,
    record_sent,
    send_study,
)

CONTEXT = {"run_id": RUN_ID}


def make_sensor(site: dict[str, Any], **kwargs: Any) -> DicomOrderSensor:
    """Build the sensor for the tests' batch."""
    return DicomOrderSensor(task_id="wait_for_orders", site=site, batch_id=BATCH_ID, **kwargs)


def study_states(ledger: Ledger) -> dict[str, tuple[str, str | None, str | None, str | None]]:
    """Return each study of the batch as (state, order id, vendor status, reason)."""
    return {
        study.study_uid: (study.state, study.order_id, study.order_status, study.reason)
        for study in ledger.studies_in_batch(SITE_ID, RUN_ID, BATCH_ID)
    }


def event(status: str, orders: dict[str, dict[str, Any]], message: str = "") -> dict[str, Any]:
    """Return a trigger event payload."""
    return {"status": status, "orders": orders, "message": message}


def order(study_uid: str, status: str | None, outcome: str, reason: str | None = None) -> dict[str, Any]:
    """Return one order of a trigger event."""
    return {"study_uid": study_uid, "status": status, "reason": reason, "outcome": outcome}


# -- construction -------------------------------------------------------------------------------------


def test_intervals_and_connection_come_from_the_site(site):
    sensor = make_sensor(site_dict_with_sensor(site, poke_interval=7, timeout=90))

    assert (sensor.poke_interval, sensor.timeout) == (7, 90)
    assert sensor.deferrable is True
    assert sensor.template_fields == ("site", "batch_id")
    assert [link.name for link in sensor.operator_extra_links] == [DicomBatchOrdersLink.name]


def test_explicit_arguments_win_over_the_site(site):
    sensor = make_sensor(site, poke_interval=timedelta(seconds=3), timeout=45, deferrable=False)

    assert (sensor.poke_interval, sensor.timeout, sensor.deferrable) == (3, 45, False)


def test_a_zero_poke_interval_is_refused(site):
    with pytest.raises(ValueError, match="poke_interval"):
        make_sensor(site, poke_interval=0)


def site_dict_with_sensor(site: dict[str, Any], **sensor: float) -> dict[str, Any]:
    """Return the site with other sensor settings."""
    return {**site, "sensor": sensor}


# -- the synchronous check and deferral --------------------------------------------------------------


@pytest.mark.sandbox
def test_defers_after_one_check_that_finds_orders_running(vendor, ledger, site):
    running = send_study(vendor, complete_metadata=False)
    record_sent(ledger, running)
    before = time.time()

    with pytest.raises(TaskDeferred) as deferred:
        make_sensor(site).execute(CONTEXT)

    after = time.time()
    trigger = deferred.value.trigger
    assert isinstance(trigger, DicomOrderTrigger)
    assert deferred.value.method_name == "execute_complete"
    assert trigger.conn_id == CONN_ID
    assert trigger.order_ids == [running.order_id]
    assert trigger.poll_interval == POLL_SECONDS
    assert before + 30 <= trigger.deadline <= after + 30
    assert trigger.done_statuses == ["DELIVERED"]
    assert trigger.failed_statuses == ["EXPIRED", "FAILED"]
    assert timedelta(seconds=29) + DEFERRAL_TIMEOUT_GRACE < deferred.value.timeout
    assert deferred.value.timeout <= timedelta(seconds=30) + DEFERRAL_TIMEOUT_GRACE
    assert vendor.state()["calls"]["status"] == 1
    assert study_states(ledger)[running.study_uid][0] == StudyState.METADATA_SENT


@pytest.mark.sandbox
def test_finishes_without_deferring_when_every_order_is_already_delivered(vendor, ledger, site):
    delivered = send_study(vendor)
    record_sent(ledger, delivered)
    held_uid = new_uid()
    record_held(ledger, held_uid)
    vendor.wait_for(lambda state: state["orders"][0]["status"] == "DELIVERED")

    result = make_sensor(site).execute(CONTEXT)

    assert result == {"batch_id": BATCH_ID, "delivered": 1, "failed": 0}
    assert study_states(ledger) == {
        delivered.study_uid: (StudyState.VERIFIED, delivered.order_id, "DELIVERED", None),
        held_uid: (StudyState.HELD, None, None, "metadata_missing"),
    }


@pytest.mark.sandbox
def test_a_batch_without_orders_finishes_without_asking_the_vendor(vendor, ledger, site):
    record_held(ledger, new_uid())

    result = make_sensor(site).execute(CONTEXT)

    assert result == {"batch_id": BATCH_ID, "delivered": 0, "failed": 0}
    assert vendor.state()["calls"].get("status", 0) == 0


@pytest.mark.sandbox
def test_a_failed_order_found_by_the_first_check_fails_the_task_at_once(vendor, ledger, site):
    vendor.configure(metadata_deadline=1)
    failing = send_study(vendor, complete_metadata=False)
    record_sent(ledger, failing)
    vendor.wait_for(lambda state: state["orders"][0]["status"] == "FAILED")

    with pytest.raises(AirflowFailException, match="metadata_timeout") as failure:
        make_sensor(site).execute(CONTEXT)

    assert failing.study_uid in str(failure.value)
    assert study_states(ledger)[failing.study_uid] == (
        StudyState.FAILED,
        failing.order_id,
        None,
        "metadata_timeout",
    )


@pytest.mark.sandbox
def test_soft_fail_turns_a_failed_order_found_by_the_first_check_into_a_skip(vendor, ledger, site):
    vendor.configure(metadata_deadline=1)
    failing = send_study(vendor, complete_metadata=False)
    record_sent(ledger, failing)
    vendor.wait_for(lambda state: state["orders"][0]["status"] == "FAILED")

    with pytest.raises(AirflowSkipException, match=failing.study_uid):
        make_sensor(site, soft_fail=True).execute(CONTEXT)

    assert study_states(ledger)[failing.study_uid][0] == StudyState.FAILED


@pytest.mark.sandbox
def test_a_transient_failure_of_the_first_check_defers_instead_of_failing(vendor, ledger, site):
    running = send_study(vendor)
    record_sent(ledger, running)
    vendor.faults({"endpoint": "status", "status": 503, "count": 10})

    with pytest.raises(TaskDeferred) as deferred:
        make_sensor(site).execute(CONTEXT)

    assert deferred.value.trigger.order_ids == [running.order_id]


@pytest.mark.sandbox
def test_the_conn_id_argument_overrides_the_sites(vendor, ledger, site, monkeypatch):
    running = send_study(vendor, complete_metadata=False)
    record_sent(ledger, running)
    monkeypatch.setenv("AIRFLOW_CONN_OTHER_VENDOR", vendor_connection_json(vendor))

    with pytest.raises(TaskDeferred) as deferred:
        make_sensor(site, dicom_ingest_conn_id="other_vendor").execute(CONTEXT)

    assert deferred.value.trigger.conn_id == "other_vendor"


def vendor_connection_json(sandbox: Sandbox) -> str:
    """Return a JSON connection to the sandbox."""
    import json

    return json.dumps(
        {
            "conn_type": "dicom_ingest",
            "host": sandbox.base_url,
            "login": sandbox.client_id,
            "password": sandbox.client_secret,
        }
    )


# -- poke mode ---------------------------------------------------------------------------------------


@pytest.mark.sandbox
def test_poke_mode_waits_on_the_worker_until_delivered(vendor, ledger, site):
    delivered = send_study(vendor)
    record_sent(ledger, delivered)

    result = make_sensor(site, deferrable=False).execute(CONTEXT)

    assert result == {"batch_id": BATCH_ID, "delivered": 1, "failed": 0}
    assert vendor.state()["calls"]["status"] >= 2
    assert study_states(ledger)[delivered.study_uid][:3] == (
        StudyState.VERIFIED,
        delivered.order_id,
        "DELIVERED",
    )


@pytest.mark.sandbox
def test_poke_mode_fails_naming_the_failed_study(vendor, ledger, site):
    vendor.configure(metadata_deadline=1)
    failing = send_study(vendor, complete_metadata=False)
    record_sent(ledger, failing)

    with pytest.raises(AirflowFailException, match="metadata_timeout") as failure:
        make_sensor(site, deferrable=False).execute(CONTEXT)

    assert failing.study_uid in str(failure.value)
    assert study_states(ledger)[failing.study_uid][0] == StudyState.FAILED


@pytest.mark.sandbox
def test_poke_mode_times_out_naming_the_unfinished_study(vendor, ledger, site):
    running = send_study(vendor, complete_metadata=False)
    record_sent(ledger, running)

    with pytest.raises(AirflowSensorTimeout) as timeout:
        make_sensor(site, deferrable=False, timeout=0.5).execute(CONTEXT)

    assert running.study_uid in str(timeout.value)
    assert "UPLOADING" in str(timeout.value)
    assert study_states(ledger)[running.study_uid][0] == StudyState.METADATA_SENT


# -- resuming from the trigger ----------------------------------------------------------------------


def test_a_success_event_verifies_every_study(ledger, site):
    studies = [fake_study(number) for number in range(3)]
    for study_uid, sop_uids, order_id in studies:
        record_metadata_sent(ledger, study_uid, sop_uids, order_id)
    orders = {order_id: order(uid, "DELIVERED", "done") for uid, _, order_id in studies}

    result = make_sensor(site).execute_complete(CONTEXT, event("success", orders))

    assert result == {"batch_id": BATCH_ID, "delivered": 3, "failed": 0}
    assert study_states(ledger) == {
        uid: (StudyState.VERIFIED, order_id, "DELIVERED", None) for uid, _, order_id in studies
    }


def test_a_failed_event_records_both_verdicts_and_names_the_failed_study(ledger, site):
    (done_uid, done_sops, done_order), (failed_uid, failed_sops, failed_order) = fake_study(1), fake_study(2)
    record_metadata_sent(ledger, done_uid, done_sops, done_order)
    record_metadata_sent(ledger, failed_uid, failed_sops, failed_order)
    orders = {
        done_order: order(done_uid, "DELIVERED", "done"),
        failed_order: order(failed_uid, "FAILED", "failed", "metadata_timeout"),
    }

    with pytest.raises(AirflowFailException) as failure:
        make_sensor(site).execute_complete(CONTEXT, event("failed", orders, "1 of 2 orders failed"))

    message = str(failure.value)
    assert f"study {failed_uid} (order {failed_order}) FAILED: metadata_timeout" in message
    assert "1 of 2 orders failed" in message
    assert done_uid not in message
    assert study_states(ledger) == {
        done_uid: (StudyState.VERIFIED, done_order, "DELIVERED", None),
        failed_uid: (StudyState.FAILED, failed_order, None, "metadata_timeout"),
    }


@pytest.mark.parametrize(
    ("vendor_reason", "recorded"),
    [(None, "order_failed"), ("", "order_failed"), ("x" * 80, "x" * 64)],
    ids=["no-reason", "empty-reason", "long-reason"],
)
def test_a_failed_order_without_a_usable_reason_gets_a_recordable_one(ledger, site, vendor_reason, recorded):
    study_uid, sop_uids, order_id = fake_study(1)
    record_metadata_sent(ledger, study_uid, sop_uids, order_id)

    with pytest.raises(AirflowFailException):
        make_sensor(site).execute_complete(
            CONTEXT, event("failed", {order_id: order(study_uid, "FAILED", "failed", vendor_reason)})
        )

    assert study_states(ledger)[study_uid][3] == recorded


def test_a_timeout_event_names_the_unfinished_studies_and_keeps_them_waiting(ledger, site):
    (done_uid, done_sops, done_order), (slow_uid, slow_sops, slow_order) = fake_study(1), fake_study(2)
    record_metadata_sent(ledger, done_uid, done_sops, done_order)
    record_metadata_sent(ledger, slow_uid, slow_sops, slow_order)
    orders = {
        done_order: order(done_uid, "DELIVERED", "done"),
        slow_order: order(slow_uid, "DX_STARTED", "pending"),
    }

    with pytest.raises(AirflowSensorTimeout) as timeout:
        make_sensor(site, timeout=60).execute_complete(CONTEXT, event("timeout", orders))

    message = str(timeout.value)
    assert f"study {slow_uid} (order {slow_order}) DX_STARTED" in message
    assert "still running after 60 s" in message
    assert done_uid not in message
    assert study_states(ledger) == {
        done_uid: (StudyState.VERIFIED, done_order, "DELIVERED", None),
        slow_uid: (StudyState.METADATA_SENT, slow_order, None, None),
    }


def test_an_error_event_fails_with_its_message_and_records_nothing(ledger, site):
    study_uid, sop_uids, order_id = fake_study(1)
    record_metadata_sent(ledger, study_uid, sop_uids, order_id)
    orders = {order_id: order(None, None, "pending")}

    with pytest.raises(AirflowException, match="The token endpoint refused the request"):
        make_sensor(site).execute_complete(
            CONTEXT, event("error", orders, "Cannot check the orders: The token endpoint refused the request")
        )

    assert study_states(ledger)[study_uid][0] == StudyState.METADATA_SENT


@pytest.mark.parametrize(
    "bad_event",
    [
        None,
        "success",
        {"status": "finished", "orders": {}},
        {"status": "success"},
        {"status": "success", "orders": {"order-0001": {"status": "DELIVERED"}}},
        {"status": "success", "orders": {"order-0001": {"outcome": "maybe"}}},
    ],
    ids=["missing", "not-a-dict", "unknown-status", "no-orders", "no-outcome", "unknown-outcome"],
)
def test_a_missing_or_unknown_event_is_rejected_and_records_nothing(ledger, site, bad_event):
    study_uid, sop_uids, order_id = fake_study(1)
    record_metadata_sent(ledger, study_uid, sop_uids, order_id)

    with pytest.raises(AirflowException):
        make_sensor(site).execute_complete(CONTEXT, bad_event)

    assert study_states(ledger)[study_uid][0] == StudyState.METADATA_SENT


def test_orders_the_batch_no_longer_waits_for_are_left_alone(ledger, site):
    study_uid, sop_uids, order_id = fake_study(1)
    record_metadata_sent(ledger, study_uid, sop_uids, order_id)
    ledger.record_abandoned_order(SITE_ID, study_uid, order_id)
    orders = {order_id: order(study_uid, "FAILED", "failed", "metadata_timeout")}

    with pytest.raises(AirflowFailException):
        make_sensor(site).execute_complete(CONTEXT, event("failed", orders))

    assert study_states(ledger)[study_uid][0] == StudyState.METADATA_SENT


def test_a_long_list_of_failures_is_cut_short_in_the_message(ledger, site):
    studies = [fake_study(number) for number in range(STUDIES_NAMED_IN_ERRORS + 5)]
    for study_uid, sop_uids, order_id in studies:
        record_metadata_sent(ledger, study_uid, sop_uids, order_id)
    orders = {order_id: order(uid, "FAILED", "failed", "metadata_timeout") for uid, _, order_id in studies}

    with pytest.raises(AirflowFailException) as failure:
        make_sensor(site).execute_complete(CONTEXT, event("failed", orders))

    message = str(failure.value)
    assert message.count("(order ") == STUDIES_NAMED_IN_ERRORS
    assert "and 5 more" in message
    assert all(state[0] == StudyState.FAILED for state in study_states(ledger).values())


def test_studies_verified_before_count_as_delivered(ledger, site):
    (before_uid, before_sops, before_order), (now_uid, now_sops, now_order) = fake_study(1), fake_study(2)
    record_metadata_sent(ledger, before_uid, before_sops, before_order)
    ledger.mark_verified(SITE_ID, before_uid, before_order, "DELIVERED")
    record_metadata_sent(ledger, now_uid, now_sops, now_order)

    result = make_sensor(site).execute_complete(
        CONTEXT, event("success", {now_order: order(now_uid, "DELIVERED", "done")})
    )

    assert result == {"batch_id": BATCH_ID, "delivered": 2, "failed": 0}


def test_other_batches_and_runs_are_not_touched(ledger, site):
    study_uid, sop_uids, order_id = fake_study(1)
    record_metadata_sent(ledger, study_uid, sop_uids, order_id, batch_id="batch-0001")

    result = make_sensor(site).execute_complete(
        CONTEXT, event("success", {order_id: order(study_uid, "DELIVERED", "done")})
    )

    assert result == {"batch_id": BATCH_ID, "delivered": 0, "failed": 0}
    assert ledger.studies_in_batch(SITE_ID, RUN_ID, "batch-0001")[0].state == StudyState.METADATA_SENT


def test_a_site_given_as_a_template_gets_the_default_intervals():
    sensor = DicomOrderSensor(task_id="wait", site="{{ params.site }}", batch_id="{{ params.batch }}")

    assert (sensor.poke_interval, sensor.timeout) == (60, 6 * 3600)
