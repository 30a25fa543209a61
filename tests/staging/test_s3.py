"""An s3:// staging area through ObjectStoragePath and an Airflow connection, against moto's server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from s3fs import S3FileSystem

from dicom_ingest.staging.classify import Reason
from dicom_ingest.staging.options import QuarantinePolicy, StagingOptions
from dicom_ingest.staging.plan import Plan, build_plan
from dicom_ingest.staging.source import SourceEntry, StagingSource
from tests.staging.factory import copy_bundled, uid, write_instance
from tests.staging.moto_s3 import aws_connection, running_moto, s3_client

CONN_ID = "staging_s3"
BUCKET = "hospital-staging"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with running_moto() as (host, port):
        yield f"http://{host}:{port}"


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", aws_connection(s3_endpoint))
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket=BUCKET)
    yield client
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=item["Key"])
    client.delete_bucket(Bucket=BUCKET)


def _upload_tree(client: object, local_root: Path, prefix: str) -> None:
    for path in sorted(local_root.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(local_root)}")  # type: ignore[attr-defined]


def test_s3_listing_streams_sorted_entries_with_sizes(bucket: object, tmp_path: Path) -> None:
    local = tmp_path / "local"
    for relative_path, size in (("b/2.dcm", 3), ("a/sub/1.dcm", 5), ("a/0.dcm", 1)):
        (local / relative_path).parent.mkdir(parents=True, exist_ok=True)
        (local / relative_path).write_bytes(b"x" * size)
    _upload_tree(bucket, local, "2026-03-01")
    (local / "other.dcm").write_bytes(b"y")
    _upload_tree(bucket, local / "b", "2026-03-02")  # another day's partition is not listed

    source = StagingSource.from_uri(f"s3://{CONN_ID}@{BUCKET}/2026-03-01/")

    assert not source.is_local
    assert list(source.walk()) == [
        SourceEntry("a/0.dcm", 1),
        SourceEntry("a/sub/1.dcm", 5),
        SourceEntry("b/2.dcm", 3),
    ]
    with source.open("a/sub/1.dcm", block_size=1024) as stream:
        assert stream.read() == b"xxxxx"


def test_a_header_read_from_s3_is_one_ranged_get_without_a_metadata_request(
    bucket: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = bytes(range(256)) * 40
    bucket.put_object(Bucket=BUCKET, Key="d/x.dcm", Body=body)  # type: ignore[attr-defined]
    bucket.put_object(Bucket=BUCKET, Key="d/short.dcm", Body=b"abc")  # type: ignore[attr-defined]
    source = StagingSource.from_uri(f"s3://{CONN_ID}@{BUCKET}/d/")
    assert [entry.relative_path for entry in source.walk()] == ["short.dcm", "x.dcm"]

    def no_metadata_request(*args: object, **kwargs: object) -> None:
        raise AssertionError("a HEAD request was made")

    filesystem = source.path("x.dcm").fs
    assert isinstance(filesystem, S3FileSystem)
    monkeypatch.setattr(filesystem, "info", no_metadata_request)  # what a file object asks first
    monkeypatch.setattr(filesystem, "_info", no_metadata_request)

    assert source.read_prefix("x.dcm", 1000) == body[:1000]
    assert source.read_prefix("short.dcm", 1000) == b"abc"


def test_plan_from_s3_staging_with_s3_quarantine_and_work(bucket: object, tmp_path: Path) -> None:
    local = tmp_path / "local"
    write_instance(local / "study/1.dcm", study_uid=uid(60), sop_uid=uid(60, 1))
    copy_bundled("JPEG2000.dcm", local / "study2/j2k.dcm")
    copy_bundled("MR_truncated.dcm", local / "bad/truncated.dcm")
    (local / "bad/readme.txt").write_text("not dicom")
    _upload_tree(bucket, local, "2026-03-01")
    options = StagingOptions(
        quarantine_policy=QuarantinePolicy.COPY,
        quarantine_uri=f"s3://{CONN_ID}@{BUCKET}/quarantine/2026-03-01",
        header_prefix_bytes=2048,
        metadata={"required_fields": []},
    )

    plan = build_plan(
        f"s3://{CONN_ID}@{BUCKET}/2026-03-01", f"s3://{CONN_ID}@{BUCKET}/work/2026-03-01", options
    )
    loaded = Plan.load(f"s3://{CONN_ID}@{BUCKET}/work/2026-03-01")

    assert loaded.batches == plan.batches
    studies = [study for batch in loaded.batch_ids for study in loaded.iter_batch(batch)]
    assert [instance.relative_path for study in studies for instance in study.instances] == [
        "study/1.dcm",
        "study2/j2k.dcm",
    ]
    assert {(r.relative_path, r.reason) for r in loaded.iter_invalid()} == {
        ("bad/readme.txt", Reason.NOT_DICOM),
        ("bad/truncated.dcm", Reason.UNREADABLE),
    }
    keys = {
        item["Key"]
        for item in bucket.list_objects_v2(Bucket=BUCKET, Prefix="quarantine/")["Contents"]  # type: ignore[attr-defined]
    }
    assert keys == {
        "quarantine/2026-03-01/bad/readme.txt",
        "quarantine/2026-03-01/bad/readme.txt.reason.json",
        "quarantine/2026-03-01/bad/truncated.dcm",
        "quarantine/2026-03-01/bad/truncated.dcm.reason.json",
    }
    with loaded.source().open("study/1.dcm") as stream:
        assert stream.read() == (local / "study/1.dcm").read_bytes()
