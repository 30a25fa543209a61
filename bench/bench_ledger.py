"""Print how fast the ledger records plans and per-instance writes, on SQLite and PostgreSQL.

Usage: ``uv run python bench/bench_ledger.py [--studies N] [--instances-per-study N]``.
PostgreSQL is measured in a throw-away database (``dicom_ingest_bench_<random>``) on the local
server when it answers; otherwise only SQLite is measured. Nothing is asserted: the numbers go
to the reader.
"""

from __future__ import annotations

import argparse
import multiprocessing
import secrets
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

from sqlalchemy import URL, create_engine, make_url

from dicom_ingest.ledger import ClaimAction, Ledger, PlannedInstance, PlannedStudy

POSTGRES_ADMIN_URL = make_url("postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
SITE = "bench"
RUN = "bench-run"
BATCH = "batch-0000"
MD5 = "0" * 32


def plan(studies: int, instances_per_study: int, first_study: int = 0) -> list[PlannedStudy]:
    """Build a plan of ``studies`` studies with ``instances_per_study`` instances each."""
    return [
        PlannedStudy(
            study_uid=f"1.2.826.0.1.3680043.8.498.{number}",
            instances=[
                PlannedInstance(
                    sop_uid=f"1.2.826.0.1.3680043.8.498.{number}.1.{index}",
                    series_uid=f"1.2.826.0.1.3680043.8.498.{number}.1",
                    path=f"/staging/{number}/{index}.dcm",
                    size=512 * 1024,
                )
                for index in range(instances_per_study)
            ],
        )
        for number in range(first_study, first_study + studies)
    ]


def upload_studies(ledger: Ledger, studies: list[PlannedStudy], owner: str) -> int:
    """Claim each study, record each instance uploaded and the study uploaded; return the write count."""
    writes = 0
    for study in studies:
        claim = ledger.claim_study(SITE, study.study_uid, RUN, BATCH, owner=owner)
        writes += 1
        if claim.action != ClaimAction.UPLOAD_ALL:
            continue
        for instance in study.instances:
            ledger.mark_instance_uploaded(SITE, instance.sop_uid, f"key/{instance.sop_uid}", MD5, MD5)
            writes += 1
        ledger.mark_study_uploaded(SITE, study.study_uid, token=claim.token)
        writes += 1
    return writes


def parallel_writer(
    url: str, studies: list[PlannedStudy], owner: str, start: Barrier, results: Queue
) -> None:
    """Upload ``studies`` in a separate process once every writer is ready; report writes and seconds."""
    with Ledger(url) as ledger:
        ledger.done_studies(SITE, [])
        start.wait()
        began = time.perf_counter()
        writes = upload_studies(ledger, studies, owner)
        results.put((writes, time.perf_counter() - began))


def report(label: str, items: int, elapsed: float, rates: dict[str, float], *, verbose: bool) -> None:
    """Keep one rate (and print it when ``verbose``)."""
    rates[label] = items / elapsed
    if verbose:
        print(f"  {label:<58} {items:>7} in {elapsed:7.3f} s = {items / elapsed:>9,.0f}/s")


def measure(label: str, work: Callable[[], int], rates: dict[str, float], *, verbose: bool) -> None:
    """Run ``work`` (which returns how many items it handled) and keep its rate."""
    began = time.perf_counter()
    items = work()
    report(label, items, time.perf_counter() - began, rates, verbose=verbose)


RECORD_PLAN = "record_plan (instances/s)"
REPLAN = "re-plan of the same plan (instances/s)"
SEQUENTIAL_WRITES = "claim + mark_instance_uploaded + mark_study_uploaded, 1 process (writes/s)"
SUMMARIES = "run_summary (summaries/s)"
PARALLEL_WRITES = "same writes, parallel processes on disjoint studies (writes/s)"


def bench(
    url: str, studies: int, instances_per_study: int, processes: int, *, verbose: bool = True
) -> dict[str, float]:
    """Measure the rates of one backend; return them by label (and print them when ``verbose``)."""
    rates: dict[str, float] = {}
    planned = plan(studies, instances_per_study)
    sequential = plan(max(studies // 5, 1), instances_per_study, first_study=studies)
    parallel = [
        plan(max(studies // 5, 1), instances_per_study, first_study=studies * (2 + worker))
        for worker in range(processes)
    ]
    with Ledger(url) as ledger:
        ledger.done_studies(SITE, [])
        measure(
            RECORD_PLAN,
            lambda: ledger.record_plan(SITE, RUN, BATCH, planned).instances_planned,
            rates,
            verbose=verbose,
        )
        measure(
            REPLAN,
            lambda: ledger.record_plan(SITE, RUN, BATCH, planned).instances_planned,
            rates,
            verbose=verbose,
        )
        for chunk in [sequential, *parallel]:
            ledger.record_plan(SITE, RUN, BATCH, chunk)
        measure(
            SEQUENTIAL_WRITES, lambda: upload_studies(ledger, sequential, "bench:0"), rates, verbose=verbose
        )
        measure(
            SUMMARIES,
            lambda: sum(1 for _ in range(20) if ledger.run_summary(SITE, RUN)),
            rates,
            verbose=verbose,
        )

    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(target=parallel_writer, args=(url, chunk, f"bench:{index + 1}", start, results))
        for index, chunk in enumerate(parallel)
    ]
    for worker in workers:
        worker.start()
    reports = [results.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join()
    writes = sum(count for count, _seconds in reports)
    slowest = max(seconds for _count, seconds in reports)
    report(PARALLEL_WRITES, writes, slowest, rates, verbose=verbose)
    return rates


@contextmanager
def postgres_database() -> Iterator[URL | None]:
    """Yield a throw-away PostgreSQL database, or ``None`` when no server answers."""
    try:
        socket.create_connection((POSTGRES_ADMIN_URL.host, POSTGRES_ADMIN_URL.port), timeout=1).close()
    except OSError:
        yield None
        return
    name = f"dicom_ingest_bench_{secrets.token_hex(4)}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield POSTGRES_ADMIN_URL.set(database=name)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def main() -> None:
    """Parse the options and print the rates of each backend."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=1_000)
    parser.add_argument("--instances-per-study", type=int, default=10)
    parser.add_argument("--processes", type=int, default=2)
    options = parser.parse_args()
    print(f"Python {sys.version.split()[0]}, {multiprocessing.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as directory:
        print("SQLite (WAL, file on local disk):")
        bench(
            f"sqlite:///{Path(directory) / 'ledger.sqlite3'}",
            options.studies,
            options.instances_per_study,
            options.processes,
        )
    with postgres_database() as url:
        if url is None:
            print("PostgreSQL: not reachable on 127.0.0.1:5432, skipped")
            return
        print("PostgreSQL (local server, psycopg2):")
        bench(
            url.render_as_string(hide_password=False),
            options.studies,
            options.instances_per_study,
            options.processes,
        )


if __name__ == "__main__":
    main()
