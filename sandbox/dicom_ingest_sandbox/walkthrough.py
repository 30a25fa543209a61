"""A scripted walk through the vendor protocol against a throw-away sandbox (``make demo``).

Run with ``python -m dicom_ingest_sandbox.walkthrough``. It starts a sandbox in a temporary
folder, builds two small studies with fake patients, and uses plain ``requests`` for every step:
token, presigned URL, PUT, metadata PATCH for the study whose tags lack PatientAge, and status
polling until both orders are ``DELIVERED``. It prints each step (never a secret, a token or a
URL signature) and exits 0 on success; the sandbox is stopped either way.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from dicom_ingest_sandbox.testing import (
    UPLOAD_CONTENT_TYPE,
    Sandbox,
    SandboxError,
    build_instance,
    new_uid,
    running_sandbox,
)

DEMO_CLOCKS = {"quiet_period": 1, "processing_time": 1, "metadata_deadline": 60, "overwrite_window": 30}
INSTANCES_PER_STUDY = 3
FINISHED = ("DELIVERED", "FAILED")
_TIMEOUT_SECONDS = 30.0
_POLL_SECONDS = 0.25


class WalkthroughError(RuntimeError):
    """A step of the walk-through did not go as the protocol says."""


@dataclass
class DemoStudy:
    """A study built for the walk-through, and what the vendor told about it."""

    label: str
    study_uid: str
    instances: list[bytes]
    patch: dict[str, Any] = field(default_factory=dict)
    order_id: str = ""


def build_studies() -> list[DemoStudy]:
    """Build two studies of fake patients; the second one's tags lack PatientAge."""
    complete_uid, missing_age_uid = new_uid(), new_uid()
    return [
        DemoStudy(
            "study A (age and sex in its tags)",
            complete_uid,
            [
                build_instance(complete_uid, patient_name="Demo^Ada", patient_age="052Y", patient_sex="F")
                for _ in range(INSTANCES_PER_STUDY)
            ],
        ),
        DemoStudy(
            "study B (no PatientAge tag: sent by PATCH)",
            missing_age_uid,
            [
                build_instance(missing_age_uid, patient_name="Demo^Bob", patient_age=None, patient_sex="M")
                for _ in range(INSTANCES_PER_STUDY)
            ],
            patch={"patient_age": 67},
        ),
    ]


def step(message: str, *arguments: object) -> None:
    """Print one step of the walk-through.

    :param message: a ``%`` format string.
    :param arguments: its arguments.
    """
    print(f"- {message % arguments}", flush=True)


def _checked(response: requests.Response, what: str) -> Any:
    """Return a response's JSON, or raise if it is not a success."""
    if not response.ok:
        raise WalkthroughError(f"{what} answered HTTP {response.status_code}: {response.text[:200]}")
    return response.json()


def get_token(session: requests.Session, sandbox: Sandbox) -> str:
    """Get a token the vendor's documented way (GET with HTTP Basic credentials)."""
    answer = _checked(
        session.get(
            f"{sandbox.base_url}/oauth2/token",
            params={"grant_type": "client_credentials"},
            auth=(sandbox.client_id, sandbox.client_secret),
            timeout=_TIMEOUT_SECONDS,
        ),
        "GET /oauth2/token",
    )
    step("token: %s, scope %r, expires in %s s", answer["token_type"], answer["scope"], answer["expires_in"])
    return answer["access_token"]


def upload_study(session: requests.Session, base_url: str, study: DemoStudy) -> None:
    """Upload each instance of a study: presigned URL first, then a PUT straight to the store."""
    for number, body in enumerate(study.instances, start=1):
        presigned = _checked(session.get(f"{base_url}/upload", timeout=_TIMEOUT_SECONDS), "GET /upload")
        store = urlsplit(presigned["url"])
        put = requests.put(
            presigned["url"],
            data=body,
            headers={"Content-Type": UPLOAD_CONTENT_TYPE},
            timeout=_TIMEOUT_SECONDS,
        )
        if put.status_code != 200:
            raise WalkthroughError(f"PUT answered HTTP {put.status_code}: {put.text[:200]}")
        etag_matches = put.headers.get("ETag", "").strip('"') == hashlib.md5(body).hexdigest()
        step(
            "%s, instance %d: PUT %s bytes to %s://%s/…/%s → %d, ETag matches MD5: %s",
            study.label,
            number,
            len(body),
            store.scheme,
            store.netloc,
            presigned["key"],
            put.status_code,
            etag_matches,
        )
        if not etag_matches:
            raise WalkthroughError("the store's ETag does not match the body's MD5")


def wait_for_order(session: requests.Session, base_url: str, study: DemoStudy) -> None:
    """Look a study's order up; the vendor files instances asynchronously, so retry while it is 404."""
    deadline = time.monotonic() + _TIMEOUT_SECONDS
    while True:
        response = session.get(f"{base_url}/orderId", params={"study_uid": study.study_uid}, timeout=10)
        if response.status_code != 404:
            study.order_id = _checked(response, "GET /orderId")["order_ids"][-1]
            status = _checked(
                session.get(f"{base_url}/status", params={"order_id": study.order_id}, timeout=10),
                "GET /status",
            )
            step(
                "%s: order %s, metadata_complete=%s", study.label, study.order_id, status["metadata_complete"]
            )
            return
        if time.monotonic() > deadline:
            raise WalkthroughError(f"no order appeared for {study.label}")
        time.sleep(_POLL_SECONDS)


def send_metadata(session: requests.Session, base_url: str, study: DemoStudy) -> None:
    """PATCH the metadata a study's tags lack to its order."""
    answer = _checked(
        session.patch(
            f"{base_url}/add-metadata",
            params={"order_id": study.order_id},
            json=study.patch,
            timeout=_TIMEOUT_SECONDS,
        ),
        "PATCH /add-metadata",
    )
    step(
        "%s: PATCH fields %s → metadata_complete=%s",
        study.label,
        ", ".join(sorted(study.patch)),
        answer["metadata_complete"],
    )


def wait_until_finished(
    session: requests.Session, base_url: str, studies: Sequence[DemoStudy]
) -> dict[str, str]:
    """Poll ``/status`` until every order is finished; print each status change; return the final ones."""
    last_seen: dict[str, str] = {}
    deadline = time.monotonic() + _TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        for study in studies:
            status = _checked(
                session.get(f"{base_url}/status", params={"order_id": study.order_id}, timeout=10),
                "GET /status",
            )
            if last_seen.get(study.order_id) != status["status"]:
                last_seen[study.order_id] = status["status"]
                step(
                    "%s: %s (%d instances, metadata_complete=%s)",
                    study.label,
                    status["status"],
                    status["instances_received"],
                    status["metadata_complete"],
                )
        if all(last_seen.get(study.order_id) in FINISHED for study in studies):
            return last_seen
        time.sleep(_POLL_SECONDS)
    raise WalkthroughError("the orders did not finish in time")


def walk(sandbox: Sandbox) -> bool:
    """Walk the protocol once against a running sandbox; return whether every order was delivered.

    :param sandbox: the running sandbox.
    """
    studies = build_studies()
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {get_token(session, sandbox)}"
        for study in studies:
            upload_study(session, sandbox.base_url, study)
        for study in studies:
            wait_for_order(session, sandbox.base_url, study)
            if study.patch:
                send_metadata(session, sandbox.base_url, study)
        final = wait_until_finished(session, sandbox.base_url, studies)
    return all(status == "DELIVERED" for status in final.values())


def main() -> int:
    """Run the walk-through in a temporary folder; return the exit status."""
    with tempfile.TemporaryDirectory(prefix="dicom-ingest-walkthrough-") as folder:
        data_dir = Path(folder)
        print(f"Starting a sandbox (data dir {data_dir}) with clocks {DEMO_CLOCKS}", flush=True)
        try:
            with running_sandbox(data_dir, **DEMO_CLOCKS) as sandbox:
                step("sandbox ready at %s", sandbox.base_url)
                delivered = walk(sandbox)
        except (WalkthroughError, SandboxError, requests.RequestException) as error:
            print(f"Walk-through failed: {error}", file=sys.stderr)
            return 1
    print("All orders DELIVERED; the sandbox has stopped." if delivered else "Some order FAILED.")
    return 0 if delivered else 1


if __name__ == "__main__":
    sys.exit(main())
