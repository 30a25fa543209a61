"""The plugin's pages, served by Airflow's own API app with the plugin mounted at /dicom-ingest.

Requests carry real JWTs signed by the auth manager (bearer header or the UI's ``_token``
cookie), so authentication and DAG authorization are Airflow's; the ledger is a real SQLite file
and the sites file a real YAML file.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from dicom_ingest.ledger import Ledger
from dicom_ingest.links import WEB_URL_PREFIX, batch_orders_path
from tests.sensors.support import BATCH_ID, RUN_ID, SITE_ID, fake_study, record_held, record_metadata_sent

pytestmark = pytest.mark.slow

DAG_ID = f"dicom_ingest__{SITE_ID}"
STAGING = "/data/hospital-staging/paris"
ABANDONED_ORDER = "order-abandoned-0001"
BATCH_JSON = f"{WEB_URL_PREFIX}/api/runs/{DAG_ID}/{RUN_ID}/batches/{BATCH_ID}"


@pytest.fixture(scope="module")
def api() -> Iterator[TestClient]:
    """Run Airflow's API app in-process (plugins included) on a metadata database with tables."""
    from airflow.api_fastapi.app import create_app
    from airflow.utils.db import initdb

    initdb()
    with TestClient(create_app(apps="core")) as client:
        yield client


def token_for(role: str | None) -> str:
    """Return a JWT the auth manager signed for a user with ``role``."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    return get_auth_manager().generate_jwt(SimpleAuthManagerUser(username=f"user-{role}", role=role))


def as_user(role: str | None) -> dict[str, str]:
    """Return the headers of a request by a user with ``role``."""
    return {"Authorization": f"Bearer {token_for(role)}"}


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    """Give a private temporary folder (a concurrent pytest run may prune the numbered tmp_path ones)."""
    with tempfile.TemporaryDirectory(prefix="dicom-ingest-web-") as folder:
        yield Path(folder)


@pytest.fixture
def studies(scratch_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[str, str | None]]:
    """Write a sites file (two valid sites, one invalid entry) and a batch in the first site's ledger.

    :returns: study UID to (state, order id) of the batch.
    """
    ledger_path = scratch_dir / "paris.sqlite3"
    sites = {
        "sites": [
            {
                "id": SITE_ID,
                "schedule": "@daily",
                "staging": STAGING,
                "conn_id": "vendor",
                "ledger": {"path": str(ledger_path)},
            },
            {
                "id": "lyon",
                "schedule": "0 3 * * *",
                "staging": "/data/hospital-staging/lyon",
                "conn_id": "vendor",
                "ledger": {"path": str(scratch_dir / "lyon.sqlite3")},
            },
            {"id": "Not A Valid Id", "schedule": "@daily"},
        ]
    }
    sites_file = scratch_dir / "sites.yaml"
    sites_file.write_text(yaml.safe_dump(sites))
    monkeypatch.setenv("DICOM_INGEST_SITES_FILE", str(sites_file))
    (done_uid, done_sops, done_order), (failed_uid, failed_sops, failed_order) = fake_study(1), fake_study(2)
    held_uid = fake_study(3)[0]
    with Ledger.for_location(ledger_path) as ledger:
        record_metadata_sent(ledger, done_uid, done_sops, done_order)
        ledger.mark_verified(SITE_ID, done_uid, done_order, "DELIVERED")
        record_metadata_sent(ledger, failed_uid, failed_sops, failed_order)
        ledger.record_abandoned_order(SITE_ID, failed_uid, ABANDONED_ORDER)
        ledger.mark_study_failed(SITE_ID, failed_uid, "metadata_timeout", failed_order)
        record_held(ledger, held_uid)
    return {
        done_uid: ("verified", done_order),
        failed_uid: ("failed", failed_order),
        held_uid: ("held", None),
    }


def test_the_batch_json_lists_every_study_with_its_order(api, studies):
    response = api.get(BATCH_JSON, headers=as_user("viewer"))

    assert response.status_code == 200
    body = response.json()
    assert (body["site_id"], body["dag_id"], body["run_id"], body["batch_id"]) == (
        SITE_ID,
        DAG_ID,
        RUN_ID,
        BATCH_ID,
    )
    rows = {row["study_uid"]: row for row in body["studies"]}
    assert {uid: (row["state"], row["order_id"]) for uid, row in rows.items()} == studies
    done_uid, failed_uid, held_uid = list(studies)
    assert (rows[done_uid]["vendor_status"], rows[done_uid]["reason"]) == ("DELIVERED", None)
    assert rows[failed_uid]["reason"] == "metadata_timeout"
    assert rows[failed_uid]["abandoned_order_ids"] == [ABANDONED_ORDER]
    assert rows[held_uid]["reason"] == "metadata_missing"
    assert body["counts"] == {
        "studies": 3,
        "instances": 5,
        "bytes": 5 * 4_096,
        "orders": 2,
        "abandoned_orders": 1,
        "studies_by_state": {"failed": 1, "held": 1, "verified": 1},
    }


def test_the_batch_page_shows_the_same_table_without_paths(api, studies):
    response = api.get(batch_orders_path(DAG_ID, RUN_ID, BATCH_ID), headers=as_user("viewer"))

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    for study_uid, (state, order_id) in studies.items():
        assert study_uid in page
        assert state in page
        assert order_id is None or order_id in page
    for shown in ("DELIVERED", "metadata_timeout", "metadata_missing", ABANDONED_ORDER):
        assert shown in page
    assert "/staging/" not in page and STAGING not in page and ".sqlite3" not in page


def test_the_ui_cookie_is_enough_for_the_nav_iframe(api, studies):
    api.cookies.set("_token", token_for("viewer"))
    try:
        response = api.get(f"{WEB_URL_PREFIX}/")
    finally:
        api.cookies.clear()

    assert response.status_code == 200
    assert f"{WEB_URL_PREFIX}/sites/{SITE_ID}" in response.text


@pytest.mark.parametrize(
    "path",
    [
        f"{WEB_URL_PREFIX}/",
        f"{WEB_URL_PREFIX}/sites/{SITE_ID}",
        f"{WEB_URL_PREFIX}/api/sites/{SITE_ID}",
        BATCH_JSON,
        f"{WEB_URL_PREFIX}/runs/{DAG_ID}/{RUN_ID}/batches/{BATCH_ID}",
    ],
    ids=["index", "site", "site-json", "batch-json", "batch"],
)
def test_every_page_needs_a_signed_in_user(api, studies, path):
    response = api.get(path)

    assert response.status_code == 401
    assert not any(uid in response.text for uid in studies)


@pytest.mark.parametrize(
    "path",
    [
        f"{WEB_URL_PREFIX}/api/sites/{SITE_ID}",
        BATCH_JSON,
        f"{WEB_URL_PREFIX}/api/runs/not_a_site_dag/r/batches/b",
    ],
    ids=["site", "batch", "unknown-dag"],
)
def test_a_user_without_access_to_the_dag_is_refused(api, studies, path):
    response = api.get(path, headers=as_user(None))

    assert response.status_code == 403
    assert not any(uid in response.text for uid in studies)


def test_the_index_lists_only_readable_sites_and_counts_invalid_entries(api, studies):
    readable = api.get(f"{WEB_URL_PREFIX}/", headers=as_user("viewer")).text
    hidden = api.get(f"{WEB_URL_PREFIX}/", headers=as_user(None)).text

    assert "dicom_ingest__paris" in readable and "dicom_ingest__lyon" in readable
    assert "1 entries of the sites file are invalid" in readable
    assert "dicom_ingest__paris" not in hidden
    assert STAGING not in readable


def test_the_site_summary_counts_the_ledger(api, studies):
    response = api.get(f"{WEB_URL_PREFIX}/api/sites/{SITE_ID}", headers=as_user("viewer"))

    assert response.status_code == 200
    body = response.json()
    assert (body["site_id"], body["dag_id"], body["schedule"]) == (SITE_ID, DAG_ID, "@daily")
    summary = body["summary"]
    assert (summary["studies"], summary["instances"], summary["abandoned_orders"]) == (3, 5, 1)
    assert summary["studies_by_state"] == {"failed": 1, "held": 1, "verified": 1}
    assert STAGING not in json.dumps(body)
    page = api.get(f"{WEB_URL_PREFIX}/sites/{SITE_ID}", headers=as_user("viewer"))
    assert page.status_code == 200 and "metadata_timeout" in page.text


def test_a_site_before_its_first_run_has_no_ledger_and_gets_none(api, studies, scratch_dir):
    response = api.get(f"{WEB_URL_PREFIX}/api/sites/lyon", headers=as_user("viewer"))

    assert response.status_code == 200
    assert response.json()["summary"] is None
    assert not (scratch_dir / "lyon.sqlite3").exists()
    assert "Nothing recorded yet" in api.get(f"{WEB_URL_PREFIX}/sites/lyon", headers=as_user("viewer")).text


@pytest.mark.parametrize(
    "path",
    [
        f"{WEB_URL_PREFIX}/api/sites/nowhere",
        f"{WEB_URL_PREFIX}/api/runs/dicom_ingest__nowhere/{RUN_ID}/batches/{BATCH_ID}",
        f"{WEB_URL_PREFIX}/api/runs/some_other_dag/{RUN_ID}/batches/{BATCH_ID}",
    ],
    ids=["unknown-site", "unknown-site-dag", "not-a-site-dag"],
)
def test_unknown_sites_are_not_found(api, studies, path):
    assert api.get(path, headers=as_user("admin")).status_code == 404


def test_an_unknown_batch_is_an_empty_table(api, studies):
    response = api.get(
        f"{WEB_URL_PREFIX}/api/runs/{DAG_ID}/{RUN_ID}/batches/batch-9999", headers=as_user("viewer")
    )

    assert response.status_code == 200
    assert response.json()["studies"] == []


def test_the_plugin_registers_its_app_view_and_link(api, studies):
    response = api.get("/api/v2/plugins", headers=as_user("admin"))

    assert response.status_code == 200
    (plugin,) = [entry for entry in response.json()["plugins"] if entry["name"] == "dicom_ingest"]
    assert [(app["url_prefix"], app["name"]) for app in plugin["fastapi_apps"]] == [
        (WEB_URL_PREFIX, "DICOM ingest")
    ]
    assert [(view["href"], view["destination"]) for view in plugin["external_views"]] == [
        (f"{WEB_URL_PREFIX}/", "nav")
    ]
    assert plugin["operator_extra_links"] == ["<dicom_ingest.links.DicomBatchOrdersLink object>"]
