"""The hooks against the real sandbox (HTTP API + rclone object store) under injected faults."""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import psutil
import pytest

from dicom_ingest.exceptions import DicomIngestOrderNotFoundError
from dicom_ingest.hooks import dicom_ingest as hook_module
from dicom_ingest.hooks.dicom_ingest import DicomIngestAsyncHook, DicomIngestHook
from dicom_ingest.hooks.models import UploadResult
from dicom_ingest_sandbox.testing import Sandbox, build_instance, new_uid
from tests.hooks.support import set_connection

pytestmark = pytest.mark.sandbox

CONN_ID = "sandbox_vendor"
INSTANCES = 500
STUDIES = 10
THREADS = 16
REVOKE_AFTER = 150
SCAN_SETTLE_SECONDS = 0.5
GIB = 1024**3
RSS_GROWTH_LIMIT = 100 * 1024**2
FAST_BACKOFF = {"backoff_base": 0.05, "backoff_max": 0.5, "max_retries": 8}


@pytest.fixture
def sandbox_connection(fresh_sandbox_state: Sandbox, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    """Point the ``sandbox_vendor`` connection at the session's (emptied) sandbox."""
    set_connection(
        monkeypatch,
        CONN_ID,
        host=fresh_sandbox_state.base_url,
        login=fresh_sandbox_state.client_id,
        password=fresh_sandbox_state.client_secret,
        **FAST_BACKOFF,
    )
    return fresh_sandbox_state


@pytest.fixture
def masked(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Record every value the hooks hand to ``mask_secret`` / ``amask_secret`` (and still mask it)."""
    values: list[object] = []
    original_sync, original_async = hook_module.mask_secret, hook_module.amask_secret

    def record(secret: object, name: str | None = None) -> None:
        values.append(secret)
        original_sync(secret, name)

    async def arecord(secret: object, name: str | None = None) -> None:
        values.append(secret)
        await original_async(secret, name)

    monkeypatch.setattr(hook_module, "mask_secret", record)
    monkeypatch.setattr(hook_module, "amask_secret", arecord)
    return values


@pytest.fixture
def instances(scratch_dir: Path) -> list[Path]:
    """Write small DICOM files of a few studies (fake patient data, generated UIDs)."""
    studies = [new_uid() for _ in range(STUDIES)]
    paths = []
    for number in range(INSTANCES):
        path = scratch_dir / f"instance-{number:04d}.dcm"
        path.write_bytes(build_instance(studies[number % STUDIES]))
        paths.append(path)
    return paths


def upload_all(
    hook: DicomIngestHook, paths: list[Path], after_some: Callable[[], None]
) -> dict[Path, UploadResult]:
    """Upload ``paths`` from a thread pool; call ``after_some`` once :data:`REVOKE_AFTER` are done."""
    results: dict[Path, UploadResult] = {}
    with ThreadPoolExecutor(THREADS) as pool:
        futures = {pool.submit(hook.upload_instance, path): path for path in paths}
        for done, future in enumerate(as_completed(futures), start=1):
            results[futures[future]] = future.result()
            if done == REVOKE_AFTER:
                after_some()
    return results


def settled_objects(sandbox: Sandbox, expected: int) -> list[dict]:
    """Wait until the sandbox noticed ``expected`` objects; after a few more scans, return them."""
    sandbox.wait_for(lambda state: len(state["objects"]) >= expected)
    time.sleep(SCAN_SETTLE_SECONDS)
    return sandbox.state()["objects"]


def stored_files(sandbox: Sandbox) -> list[Path]:
    """Return the object files in the sandbox's store (ground truth for "exactly once")."""
    return [path for path in (sandbox.data_dir / "store").rglob("*.dcm") if path.is_file()]


@pytest.mark.slow
def test_500_uploads_under_faults_arrive_exactly_once(sandbox_connection, instances, masked, caplog):
    sandbox = sandbox_connection
    sandbox.faults(
        {"endpoint": "upload", "status": 503, "rate": 0.1},
        {"endpoint": "upload", "status": 429, "count": 5, "retry_after": 1},
        {"kind": "expired_urls", "count": 10},
    )
    caplog.set_level(logging.DEBUG)

    with DicomIngestHook(CONN_ID) as hook:
        results = upload_all(hook, instances, lambda: sandbox.faults({"kind": "revoke_tokens"}))
    sandbox.clear_faults()

    assert len(results) == INSTANCES
    for path, result in results.items():
        assert result.md5 == result.etag == hashlib.md5(path.read_bytes()).hexdigest()
        assert result.size == path.stat().st_size
    objects = settled_objects(sandbox, INSTANCES)
    assert len(objects) == INSTANCES
    assert sorted(entry["key"] for entry in objects) == sorted(result.key for result in results.values())
    by_key = {result.key: result for result in results.values()}
    assert all(entry["md5"] == by_key[entry["key"]].md5 for entry in objects)
    assert all(entry["size"] == by_key[entry["key"]].size for entry in objects)
    assert all(entry["accepted"] for entry in objects)
    assert len(stored_files(sandbox)) == INSTANCES

    state = sandbox.state()
    assert state["calls"]["upload"] >= INSTANCES + 10 + 5  # the faults were really met
    assert 2 <= state["calls"]["token"] <= 4  # first token, one after the revocation, not one per thread
    assert sum(result.attempts for result in results.values()) >= INSTANCES + 10

    tokens = [value for value in masked if isinstance(value, str) and value != sandbox.client_secret]
    assert sandbox.client_secret in masked
    assert len(tokens) == state["calls"]["token"]
    assert "[Try " in caplog.text  # the retries were logged, so the log was captured
    assert sandbox.client_secret not in caplog.text
    assert not [token for token in tokens if token in caplog.text]
    assert "X-Amz-Signature" not in caplog.text


def test_captured_log_is_not_masked_so_the_secret_check_means_something(sandbox_connection, masked, caplog):
    with DicomIngestHook(CONN_ID) as hook:
        hook.test_connection()
        logging.getLogger(hook_module.__name__).warning("canary %s", sandbox_connection.client_secret)

    assert sandbox_connection.client_secret in masked
    assert sandbox_connection.client_secret in caplog.text


def test_test_connection_good_and_bad_secret(sandbox_connection, monkeypatch):
    with DicomIngestHook(CONN_ID) as hook:
        assert hook.test_connection() == (True, "Connection successfully tested")

    set_connection(
        monkeypatch,
        "sandbox_wrong",
        host=sandbox_connection.base_url,
        login=sandbox_connection.client_id,
        password="not-the-sandbox-secret-7",
    )
    with DicomIngestHook("sandbox_wrong") as hook:
        ok, message = hook.test_connection()

    assert not ok
    assert "invalid_client" in message and "401" in message
    assert "not-the-sandbox-secret-7" not in message


def test_upload_metadata_and_status_round_trip(sandbox_connection):
    sandbox = sandbox_connection
    study_uid = new_uid()
    instance = build_instance(study_uid, patient_age=None, patient_sex=None)

    with DicomIngestHook(CONN_ID) as hook:
        result = hook.upload_instance(io.BytesIO(instance))
        order_ids = sandbox.wait_for(lambda state: _order_ids_of(state, study_uid))
        with pytest.raises(DicomIngestOrderNotFoundError):
            hook.get_status(order_id="no-such-order")
        hook.add_metadata(study_uid=study_uid, metadata={"patient_age": 45, "patient_sex": "F"})
        status = hook.get_status(study_uid=study_uid)

    assert result.md5 == hashlib.md5(instance).hexdigest()
    assert status.study_uid == study_uid
    assert status.order_id in order_ids
    assert status.metadata_complete is True
    assert status.instances_received == 1


class ReadRecordingStream(io.BytesIO):
    """An in-memory instance that records how many bytes each read asked for."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.requested: list[int] = []

    def read(self, size: int | None = -1, /) -> bytes:
        self.requested.append(-1 if size is None else size)
        return super().read(size)


def test_an_upload_is_read_hashed_and_sent_in_large_blocks(sandbox_connection):
    instance = build_instance(new_uid(), size=512)  # 512 KiB of pixel data
    stream = ReadRecordingStream(instance)
    full_blocks, rest = divmod(len(instance), hook_module.BODY_BLOCK_SIZE)

    with DicomIngestHook(CONN_ID) as hook:
        result = hook.upload_instance(stream)

    assert result.md5 == result.etag == hashlib.md5(instance).hexdigest()
    assert stream.requested == [hook_module.BODY_BLOCK_SIZE] * full_blocks + ([rest] if rest else [])


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_async_hook_reads_status_and_order_ids(sandbox_connection, anyio_backend):
    sandbox = sandbox_connection
    study_uids = [new_uid() for _ in range(3)]
    token = sandbox.token()
    for study_uid in study_uids:
        sandbox.put_object(build_instance(study_uid), token)
    sandbox.wait_for(lambda state: all(_order_ids_of(state, uid) for uid in study_uids))
    sandbox.faults({"kind": "drop_connection", "endpoint": "status", "count": 1})
    token_calls_before = sandbox.state()["calls"]["token"]

    async with DicomIngestAsyncHook(CONN_ID) as hook:
        order_ids = [(await hook.order_ids(uid))[0] for uid in study_uids]
        statuses = await hook.get_statuses(order_ids, concurrency=2)
        sandbox.faults({"kind": "revoke_tokens"})
        after_revocation = await hook.get_status(order_id=order_ids[0])

    assert list(statuses) == order_ids
    assert [statuses[order_id].study_uid for order_id in order_ids] == study_uids
    assert all(status.status and not status.is_failed for status in statuses.values())
    assert after_revocation.order_id == order_ids[0]
    assert sandbox.state()["calls"]["token"] - token_calls_before == 2  # first token, one after revocation


def _order_ids_of(state: dict, study_uid: str) -> list[str]:
    return [order["order_id"] for order in state["orders"] if order["study_uid"] == study_uid]


@pytest.fixture
def sparse_gib_file(scratch_dir: Path) -> Iterator[Path]:
    """Write a 1 GiB file: a DICOM header, then a sparse hole (the source takes no disk space)."""
    path = scratch_dir / "large.dcm"
    with path.open("wb") as handle:
        handle.write(build_instance(new_uid()))
        handle.truncate(1024**3)
    yield path


@pytest.mark.slow
def test_1_gib_upload_keeps_peak_rss_growth_under_100_mib(sandbox_connection, sparse_gib_file):
    process = psutil.Process()
    stop = threading.Event()
    peak = 0

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, process.memory_info().rss)
            stop.wait(0.01)

    try:
        with DicomIngestHook(CONN_ID) as hook:
            assert hook.test_connection()[0]  # token, session and imports in place before measuring
            baseline = peak = process.memory_info().rss
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            try:
                result = hook.upload_instance(sparse_gib_file)
            finally:
                stop.set()
                sampler.join()
        assert result.size == GIB
        assert result.md5 == _md5_of_file(sparse_gib_file)
        assert peak - baseline < RSS_GROWTH_LIMIT
    finally:
        sandbox_connection.reset()  # drop the stored GiB


def _md5_of_file(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()
