"""Parallel writers: separate processes on the same ledger, lock waits and lock timeouts."""

from __future__ import annotations

import logging
import multiprocessing
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, update

from dicom_ingest.ledger import ClaimAction, InstanceState, Ledger, LedgerError, StudyState
from dicom_ingest.ledger.models import Study
from tests.ledger import workers
from tests.ledger.support import BATCH, RUN, SITE, planned_study, sop_uid, sop_uids, study_uid

PROCESS_TIMEOUT = 120.0
RACED_STUDIES = 12
LOCK_HELD_SECONDS = 0.5
THREADED_INSTANCES = 60
UPLOAD_THREADS = 8


def run_in_processes(target: Callable[..., None], arguments: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Run ``target`` once per argument tuple, each in its own spawned process; return their reports."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=target, args=(*args, results)) for args in arguments]
    for process in processes:
        process.start()
    reports = [results.get(timeout=PROCESS_TIMEOUT) for _ in processes]
    for process in processes:
        process.join(PROCESS_TIMEOUT)
        assert process.exitcode == 0
    errors = [error for _owner, _result, error in reports if error]
    assert errors == [], "\n".join(errors)
    return reports


@pytest.mark.slow
def test_two_processes_claiming_one_study_upload_it_once(ledger_url: str) -> None:
    context = multiprocessing.get_context("spawn")
    start, claimed = context.Barrier(2), context.Barrier(2)

    reports = run_in_processes(
        workers.plan_and_claim_one_study,
        [(ledger_url, owner, start, claimed) for owner in ("worker-a:1", "worker-b:2")],
    )

    assert sorted(action for _owner, action, _error in reports) == [ClaimAction.BUSY, ClaimAction.UPLOAD_ALL]
    with Ledger(ledger_url) as ledger:
        contended = ledger.study_detail(SITE, study_uid(workers.CONTENDED_STUDY))
        assert contended is not None
        assert (contended.state, contended.attempts, contended.resend_count) == (StudyState.UPLOADED, 1, 0)
        assert [item.reason for item in contended.events if item.sop_uid is None].count("claimed") == 1
        assert {item.state for item in contended.instances} == {InstanceState.UPLOADED}
        shared = ledger.study_detail(SITE, study_uid(workers.ABANDONED_ORDER_STUDY))
        assert shared is not None
        assert len(set(shared.abandoned_order_ids)) == 2 * workers.UPDATES_PER_WORKER
        failing = ledger.study_detail(SITE, study_uid(2))
        assert failing is not None
        attempts = {item.sop_uid: item.attempts for item in failing.instances}
        assert attempts[workers.FAILING_INSTANCE] == 2 * workers.UPDATES_PER_WORKER
        summary = ledger.site_summary(SITE)
        assert (summary.studies, summary.instances) == (
            workers.STUDIES_PLANNED,
            workers.STUDIES_PLANNED * workers.INSTANCES_PER_STUDY,
        )


@pytest.mark.slow
def test_processes_racing_through_studies_upload_each_exactly_once(ledger_url: str) -> None:
    numbers = list(range(RACED_STUDIES))
    with Ledger(ledger_url) as ledger:
        ledger.record_plan(
            SITE,
            RUN,
            BATCH,
            [planned_study(number, instances=workers.INSTANCES_PER_STUDY) for number in numbers],
        )
    start = multiprocessing.get_context("spawn").Barrier(2)

    reports = run_in_processes(
        workers.claim_and_upload_every_study,
        [(ledger_url, "worker-a:1", numbers, start), (ledger_url, "worker-b:2", numbers[::-1], start)],
    )

    for number in numbers:
        actions = sorted(result[study_uid(number)] for _owner, result, _error in reports)
        assert actions.count(ClaimAction.UPLOAD_ALL) == 1, (number, actions)
        assert set(actions) <= {ClaimAction.UPLOAD_ALL, ClaimAction.BUSY, ClaimAction.RESUME_METADATA}
    with Ledger(ledger_url) as ledger:
        summary = ledger.site_summary(SITE)
        assert summary.studies_by_state == {StudyState.UPLOADED: RACED_STUDIES}
        assert summary.resends == 0


def test_a_claim_waits_for_a_concurrent_writer_and_sees_its_claim(ledger_url: str) -> None:
    with Ledger(ledger_url) as ledger:
        ledger.record_plan(SITE, RUN, BATCH, [planned_study(1)])
        other = create_engine(ledger_url)
        locked = threading.Event()

        def claim_in_another_transaction() -> None:
            with other.begin() as connection:
                connection.execute(
                    update(Study)
                    .where(Study.site_id == SITE, Study.study_uid == study_uid(1))
                    .values(
                        state=StudyState.UPLOADING,
                        claim_token="f" * 32,
                        claim_owner="other-worker:9",
                        claimed_at=datetime.now(UTC),
                    )
                )
                locked.set()
                time.sleep(LOCK_HELD_SECONDS)

        writer = threading.Thread(target=claim_in_another_transaction)
        writer.start()
        try:
            assert locked.wait(10)
            answer = ledger.claim_study(SITE, study_uid(1), RUN, BATCH, owner="worker-a:1")
        finally:
            writer.join()
            other.dispose()

    assert (answer.action, answer.owner) == (ClaimAction.BUSY, "other-worker:9")


def test_threads_sharing_a_ledger_record_every_instance(ledger_url: str) -> None:
    study = planned_study(1, instances=THREADED_INSTANCES)
    with Ledger(ledger_url) as ledger:
        ledger.record_plan(SITE, RUN, BATCH, [study])
        token = ledger.claim_study(SITE, study.study_uid, RUN, BATCH).token
        with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
            recorded = list(
                pool.map(
                    lambda sop: ledger.mark_instance_uploaded(SITE, sop, f"key/{sop}", "0" * 32, "0" * 32),
                    sop_uids(study),
                )
            )
        ledger.mark_study_uploaded(SITE, study.study_uid, token=token)
        detail = ledger.study_detail(SITE, study.study_uid)

    assert recorded == [True] * THREADED_INSTANCES
    assert detail is not None
    assert detail.state == StudyState.UPLOADED
    assert {item.attempts for item in detail.instances} == {1}


@pytest.fixture
def sqlite_ledger_path(tmp_path: Path) -> Path:
    """Return the path of a SQLite ledger holding one planned study."""
    path = tmp_path / "ledger.sqlite3"
    with Ledger(f"sqlite:///{path}") as ledger:
        ledger.record_plan(SITE, RUN, BATCH, [planned_study(1)])
    return path


def hold_sqlite_write_lock(path: Path, seconds: float) -> threading.Thread:
    """Hold the write lock of a SQLite file from another connection for ``seconds``, in a thread."""
    locked = threading.Event()

    def hold() -> None:
        connection = sqlite3.connect(path, isolation_level=None)
        try:
            connection.execute("BEGIN IMMEDIATE")
            locked.set()
            time.sleep(seconds)
            connection.execute("COMMIT")
        finally:
            connection.close()

    holder = threading.Thread(target=hold)
    holder.start()
    assert locked.wait(10)
    return holder


def test_sqlite_writers_retry_past_the_busy_timeout(
    sqlite_ledger_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Ledger(f"sqlite:///{sqlite_ledger_path}", busy_timeout=0.05, retry_timeout=30) as ledger:
        ledger.done_studies(SITE, [])
        holder = hold_sqlite_write_lock(sqlite_ledger_path, LOCK_HELD_SECONDS)
        with caplog.at_level(logging.INFO, logger="dicom_ingest.ledger"):
            uploaded = ledger.mark_instance_uploaded(SITE, sop_uid(1, 0), "key/0", "0" * 32, "0" * 32)
        holder.join()

    assert uploaded
    assert "OperationalError; retrying" in caplog.text


def test_a_lock_held_past_the_retry_time_raises_a_ledger_error(sqlite_ledger_path: Path) -> None:
    with Ledger(f"sqlite:///{sqlite_ledger_path}", busy_timeout=0.05, retry_timeout=0) as ledger:
        ledger.done_studies(SITE, [])
        holder = hold_sqlite_write_lock(sqlite_ledger_path, LOCK_HELD_SECONDS)
        try:
            with pytest.raises(LedgerError, match="could not record an uploaded instance: OperationalError"):
                ledger.mark_instance_uploaded(SITE, sop_uid(1, 0), "key/0", "0" * 32, "0" * 32)
        finally:
            holder.join()


def test_sqlite_write_transactions_take_the_write_lock_up_front(sqlite_ledger_path: Path) -> None:
    with Ledger(f"sqlite:///{sqlite_ledger_path}") as ledger:
        ledger.done_studies(SITE, [])
        statements: list[str] = []

        def record(_connection: object, _cursor: object, statement: str, *_args: object) -> None:
            statements.append(statement)

        event.listen(ledger.engine, "before_cursor_execute", record)
        ledger.claim_study(SITE, study_uid(1), RUN, BATCH)
        writes = statements.copy()
        statements.clear()
        ledger.run_summary(SITE, RUN)

    assert writes[0] == "BEGIN IMMEDIATE"
    assert statements[0] == "BEGIN DEFERRED"
