"""How the uploader records uploads: in bulk, soon, and so that a crash loses nothing a retry needs."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from dicom_ingest.ledger import InstanceState, InstanceUpload, Ledger, StudyState
from dicom_ingest.upload import BatchUploader
from dicom_ingest.upload.engine import DEFAULT_FLUSH_SIZE
from tests.ledger.support import watching
from tests.upload.support import SITE, FakeVendor, record_plan, stage_study

ENGINE_LOGGER = "dicom_ingest.upload.engine"
PROGRESS_COUNTS = re.compile(r": (\d+)/(\d+) instances")


class RecordingLedger(Ledger):
    """A ledger that remembers the instances of every bulk record, and tells when the first one came."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.records: list[list[str]] = []
        self.first_record = threading.Event()

    def mark_instances_uploaded(self, site_id: str, uploads: Iterable[InstanceUpload]) -> set[str]:
        batch = list(uploads)
        self.records.append([upload.sop_uid for upload in batch])
        self.first_record.set()
        return super().mark_instances_uploaded(site_id, batch)


@pytest.fixture
def recording_ledger(folder: Path) -> Iterator[RecordingLedger]:
    """Open a recording ledger in the test's folder."""
    with RecordingLedger(f"sqlite:///{folder / 'recording.sqlite3'}") as opened:
        yield opened


def instance_states(ledger: Ledger, study_uid: str) -> dict[str, str]:
    """Return the state of each instance of a study, by SOP UID."""
    detail = ledger.study_detail(SITE, study_uid)
    assert detail is not None
    return {item.sop_uid or "": item.state for item in detail.instances}


def test_a_batch_takes_far_fewer_ledger_transactions_than_it_has_instances(
    make_uploader: Callable[..., BatchUploader],
    recording_ledger: RecordingLedger,
    staging_root: Path,
) -> None:
    studies = [stage_study(staging_root, number, 60) for number in range(1, 5)]
    record_plan(recording_ledger, studies)
    instances = sum(len(study.instances) for study in studies)

    with watching(recording_ledger) as activity:
        result = make_uploader(concurrency=4, ledger=recording_ledger).run(studies)

    assert (result.uploaded, result.orders) == (instances, len(studies))
    # Per study: its claim, its uploads, uploaded, metadata sent; never one per instance.
    assert activity.transactions <= 4 * len(studies) < instances / 10
    assert sorted(uid for record in recording_ledger.records for uid in record) == sorted(
        instance.sop_uid for study in studies for instance in study.instances
    )
    for study in studies:
        detail = recording_ledger.study_detail(SITE, study.study_uid)
        assert detail is not None
        assert detail.state == StudyState.METADATA_SENT
        assert all(item.md5 and item.attempts == 1 for item in detail.instances)


def test_uploads_are_recorded_at_most_flush_size_at_a_time(
    make_uploader: Callable[..., BatchUploader],
    recording_ledger: RecordingLedger,
    staging_root: Path,
) -> None:
    study = stage_study(staging_root, 1, 10)
    record_plan(recording_ledger, [study])

    make_uploader(concurrency=2, ledger=recording_ledger, flush_size=4).run([study])

    assert [len(record) for record in recording_ledger.records] == [4, 4, 2]
    assert DEFAULT_FLUSH_SIZE > 10  # so the first two records above came from the limit


def test_uploads_are_recorded_while_their_study_is_still_being_sent(
    make_uploader: Callable[..., BatchUploader],
    vendor: FakeVendor,
    recording_ledger: RecordingLedger,
    staging_root: Path,
) -> None:
    study = stage_study(staging_root, 1, 3)
    record_plan(recording_ledger, [study])
    last = study.instances[-1].sop_uid
    # The study's last instance is held until the ledger recorded something: only the flush
    # interval can make that happen while the study is still being sent.
    vendor.gates[last] = recording_ledger.first_record

    result = make_uploader(
        concurrency=1, ledger=recording_ledger, clock=time.monotonic, flush_interval=0.05
    ).run([study])

    assert vendor.gate_timeouts == []
    assert recording_ledger.records[0] and last not in recording_ledger.records[0]
    assert (result.uploaded, result.orders) == (3, 1)


class TaskKilled(BaseException):
    """The task being killed (Airflow raises its own such exception in the task's main thread)."""


class KillOnProgress(logging.Handler):
    """Kill the task at the first progress line that counts at least ``after`` settled instances.

    :param after: settled instances the coordinator has taken in when the task is killed.
    """

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after = after
        self.killed = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        counts = PROGRESS_COUNTS.search(record.getMessage())
        if counts and not self.killed.is_set() and int(counts.group(1)) >= self.after:
            self.killed.set()
            raise TaskKilled


def test_a_task_killed_mid_study_leaves_what_it_sent_recorded_and_the_retry_resends_the_study_whole(
    make_uploader: Callable[..., BatchUploader], vendor: FakeVendor, ledger: Ledger, staging_root: Path
) -> None:
    study = stage_study(staging_root, 1, 3)
    record_plan(ledger, [study])
    first, second, last = (instance.sop_uid for instance in study.instances)
    kill = KillOnProgress(after=2)
    vendor.gates[last] = kill.killed  # the last instance is still being sent when the task dies
    engine_log = logging.getLogger(ENGINE_LOGGER)
    previous_level = engine_log.level
    engine_log.setLevel(logging.INFO)
    engine_log.addHandler(kill)
    try:
        with pytest.raises(TaskKilled):
            make_uploader(concurrency=1, progress_interval=0.0, flush_interval=3600.0).run([study])
    finally:
        engine_log.removeHandler(kill)
        engine_log.setLevel(previous_level)

    # The two uploads taken in before the kill were recorded on the way out; the study is unfinished.
    assert instance_states(ledger, study.study_uid) == {
        first: InstanceState.UPLOADED,
        second: InstanceState.UPLOADED,
        last: InstanceState.PLANNED,
    }
    detail = ledger.study_detail(SITE, study.study_uid)
    assert detail is not None
    assert detail.state == StudyState.UPLOADING
    sent_before = len(vendor.put_starts)

    retry = make_uploader(concurrency=1).run([study])

    assert sorted(vendor.put_starts[sent_before:]) == sorted([first, second, last])
    detail = ledger.study_detail(SITE, study.study_uid)
    assert detail is not None
    assert (detail.state, detail.resend_count) == (StudyState.METADATA_SENT, 1)
    assert set(instance_states(ledger, study.study_uid).values()) == {InstanceState.METADATA_SENT}
    assert (retry.uploaded, retry.orders, retry.failed) == (3, 1, 0)
