"""Benchmark the header scan of an object-store staging area: one reader against the default threads.

Starts moto's S3 server behind the sandbox's latency proxy (a round trip of 40 ms by default,
with TCP's slow start), puts generated DICOM instances (studies of 100) into a bucket, and
scans ``s3://<conn>@bucket/staging`` through an Airflow connection, as the plan task does:

- ``one_thread``: ``scan_threads: 1``, one header read after another;
- ``threads``: the default ``scan_threads``.

Each is timed ``--runs`` times, interleaved; prints each run, the medians, files per second and
the speed-up. Run it with ``uv run python -m bench.bench_remote_scan [--files N] [--rtt-ms MS]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.bench_scan import INSTANCES_PER_STUDY, staging_scan
from dicom_ingest.staging.options import StagingOptions
from dicom_ingest.staging.parallel import DEFAULT_SCAN_THREADS
from dicom_ingest_sandbox.latency import LatencyProxies, Route
from tests.staging.factory import clone_study
from tests.staging.moto_s3 import aws_connection, running_moto, s3_client

CONN_ID = "bench_staging"
BUCKET = "bench-staging"
PREFIX = "staging"
RUNS = 3
METHODS = {"one_thread": StagingOptions(scan_threads=1), "threads": StagingOptions()}


@contextmanager
def delayed_s3(round_trip_ms: float) -> Iterator[tuple[str, str]]:
    """Run moto's S3 server and a latency proxy in front of it; yield (direct URL, proxied URL)."""
    with running_moto() as (host, port):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        with LatencyProxies(round_trip_ms, [Route(listener, host, port)]):
            yield f"http://{host}:{port}", f"http://127.0.0.1:{listener.getsockname()[1]}"


def fill_bucket(endpoint: str, files: int, scratch: Path) -> int:
    """Generate whole studies locally and put them into the bucket; return the number of files."""
    studies = max(1, files // INSTANCES_PER_STUDY)
    local = scratch / "local"
    for number in range(studies):
        clone_study(local, f"study{number:05d}/series1", number, INSTANCES_PER_STUDY)
    client = s3_client(endpoint)
    client.create_bucket(Bucket=BUCKET)
    for path in sorted(local.rglob("*.dcm")):
        client.upload_file(str(path), BUCKET, f"{PREFIX}/{path.relative_to(local)}")
    return studies * INSTANCES_PER_STUDY


def use_connection(endpoint: str) -> None:
    """Point the Airflow connection the staging URI names at ``endpoint``."""
    os.environ[f"AIRFLOW_CONN_{CONN_ID.upper()}"] = aws_connection(endpoint)


def measure_remote_scan(files: int, round_trip_ms: float, runs: int = RUNS) -> dict[str, float]:
    """Time each method ``runs`` times, interleaved; return median seconds by method and ``files``."""
    with (
        tempfile.TemporaryDirectory(prefix="bench-remote-scan-") as temporary,
        delayed_s3(round_trip_ms) as (direct, proxied),
    ):
        scratch = Path(temporary)
        files = fill_bucket(direct, files, scratch)
        use_connection(proxied)
        print(f"{files} files in s3://{BUCKET}/{PREFIX}, {round_trip_ms:g} ms round trip")
        timings: dict[str, list[float]] = {name: [] for name in METHODS}
        for run in range(1, runs + 1):
            for name, options in METHODS.items():
                started = time.perf_counter()
                handled = staging_scan(f"s3://{CONN_ID}@{BUCKET}/{PREFIX}/", scratch, options)
                elapsed = time.perf_counter() - started
                if handled != files:
                    raise SystemExit(f"{name} classified {handled} files, expected {files}")
                timings[name].append(elapsed)
                print(f"run {run} {name:10s} {elapsed:7.2f} s  {files / elapsed:7.1f} files/s")
    medians = {name: statistics.median(values) for name, values in timings.items()}
    print()
    print(f"{'method':10s} {'median s':>9s} {'files/s':>8s}")
    for name, median in medians.items():
        print(f"{name:10s} {median:9.2f} {files / median:8.1f}")
    print(f"speed-up of {DEFAULT_SCAN_THREADS} threads: {medians['one_thread'] / medians['threads']:.1f}x")
    return {**medians, "files": float(files)}


def main() -> None:
    """Parse the options and run the measurements."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=500, help="files to generate (whole studies of 100)")
    parser.add_argument("--rtt-ms", type=float, default=40.0, help="round trip added in front of the store")
    parser.add_argument("--runs", type=int, default=RUNS, help="measurements of each method")
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
    measure_remote_scan(arguments.files, arguments.rtt_ms, arguments.runs)


if __name__ == "__main__":
    main()
