"""Presigned URLs and the real object store behind them: what it accepts and what it refuses."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit, urlunsplit

import boto3
import pytest
import requests
from botocore.config import Config

from dicom_ingest_sandbox.testing import Sandbox, build_instance, new_uid
from tests.sandbox.support import TIMEOUT, presign, put

pytestmark = pytest.mark.sandbox


def stored_keys(sandbox: Sandbox) -> list[str]:
    return [entry["key"] for entry in sandbox.state()["objects"]]


def assert_only_stored(sandbox: Sandbox, token: str, refused_key: str) -> None:
    """Prove a refused PUT left nothing: store a later object, wait for it, and find it alone.

    The sandbox scans the whole bucket each time, so once the later object shows up, any object
    the refused PUT had left would have shown up too.
    """
    witness = sandbox.put_object(build_instance(new_uid()), token)
    keys = sandbox.wait_for(lambda state: [entry["key"] for entry in state["objects"]] or None, timeout=10)
    assert keys == [witness]
    assert refused_key not in keys


def test_upload_answers_a_presigned_put_url_for_a_new_key_each_time(sandbox: Sandbox, token: str) -> None:
    first, second = presign(sandbox, token), presign(sandbox, token)
    assert first["key"] != second["key"]
    for key in (first["key"], second["key"]):
        match = re.fullmatch(r"uploads/([0-9a-f]{2})/([0-9a-f-]{36})\.dcm", key)
        assert match is not None, key
        folder, name = match.groups()
        assert name.replace("-", "").startswith(folder)
    assert first["expires_in"] == 900
    for answer in (first, second):
        url = urlsplit(answer["url"])
        query = parse_qs(url.query)
        assert url.path == f"/ingest/{answer['key']}"
        assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
        assert query["X-Amz-Expires"] == ["900"]
        assert query["X-Amz-SignedHeaders"] == ["content-type;host"]


def test_put_is_accepted_and_its_etag_is_the_bodys_md5(sandbox: Sandbox, token: str) -> None:
    body = build_instance(new_uid())
    answer = presign(sandbox, token)
    response = put(answer["url"], body)
    assert response.status_code == 200, response.text
    assert response.headers["ETag"].strip('"') == hashlib.md5(body).hexdigest()
    stored = sandbox.wait_for(lambda state: state["objects"], timeout=10)
    assert stored[0]["key"] == answer["key"]
    assert stored[0]["md5"] == hashlib.md5(body).hexdigest()
    assert stored[0]["size"] == len(body)


def test_expired_url_is_refused_by_the_store(sandbox: Sandbox, token: str) -> None:
    with sandbox.clocks(url_ttl=1):
        answer = presign(sandbox, token)
    assert answer["expires_in"] == 1
    time.sleep(2.2)
    response = put(answer["url"], build_instance(new_uid()))
    # rclone answers 400 AccessDenied for an expired URL (AWS S3: 403); the body says why.
    assert response.status_code in (400, 403)
    assert "<Code>AccessDenied</Code>" in response.text
    assert_only_stored(sandbox, token, answer["key"])


def with_tampered_signature(url: str) -> str:
    signature = parse_qs(urlsplit(url).query)["X-Amz-Signature"][0]
    flipped = ("1" if signature[0] == "0" else "0") + signature[1:]
    assert flipped != signature
    return url.replace(signature, flipped)


def with_other_key(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=parts.path.replace(".dcm", "-other.dcm")))


def with_longer_expiry(url: str) -> str:
    return url.replace("X-Amz-Expires=900", "X-Amz-Expires=90000")


@pytest.mark.parametrize(
    "tamper",
    [with_tampered_signature, with_other_key, with_longer_expiry],
    ids=["signature", "key", "expiry"],
)
def test_tampered_url_is_refused_with_403(sandbox: Sandbox, token: str, tamper: Callable[[str], str]) -> None:
    answer = presign(sandbox, token)
    response = put(tamper(answer["url"]), build_instance(new_uid()))
    assert response.status_code == 403
    assert "SignatureDoesNotMatch" in response.text
    assert_only_stored(sandbox, token, answer["key"])


def test_url_signed_with_keys_the_store_does_not_know_is_refused(sandbox: Sandbox, token: str) -> None:
    store = urlsplit(presign(sandbox, token)["url"])
    forger = boto3.client(
        "s3",
        endpoint_url=f"{store.scheme}://{store.netloc}",
        aws_access_key_id="forgedaccesskey0001",
        aws_secret_access_key="forged-secret-key-0000000000000000",
        region_name="us-east-1",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
    forged_key = "uploads/forged.dcm"
    forged = forger.generate_presigned_url(
        "put_object",
        Params={"Bucket": "ingest", "Key": forged_key, "ContentType": "application/dicom"},
        ExpiresIn=900,
    )
    response = put(forged, build_instance(new_uid()))
    assert response.status_code == 403
    assert "InvalidAccessKeyId" in response.text
    assert_only_stored(sandbox, token, forged_key)


def test_url_is_for_put_only(sandbox: Sandbox, token: str) -> None:
    answer = presign(sandbox, token)
    assert put(answer["url"], build_instance(new_uid())).status_code == 200
    assert requests.get(answer["url"], timeout=TIMEOUT).status_code == 403
    assert requests.delete(answer["url"], timeout=TIMEOUT).status_code == 403
    assert (sandbox.data_dir / "store" / "ingest" / answer["key"]).is_file()


def test_put_with_another_content_type_is_refused(sandbox: Sandbox, token: str) -> None:
    answer = presign(sandbox, token)
    response = put(answer["url"], build_instance(new_uid()), content_type="application/octet-stream")
    assert response.status_code == 403
    assert_only_stored(sandbox, token, answer["key"])
