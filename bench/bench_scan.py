"""Benchmark the staging scan against a bare pydicom header-reading loop.

Generates 20,000 small DICOM files (200 studies of 100 instances) in a temporary folder, then
times, three times each and interleaved:

- ``bare``: ``pydicom.dcmread(path, stop_before_pixels=True)`` for every file, in walk order;
- ``scan``: the staging scan (listing, classification with truncation checks, order metadata
  from tags, the SQLite catalog, duplicate detection) in one process, like the bare loop;
- ``plan``: the whole :func:`~dicom_ingest.staging.plan.build_plan` (scan, grouping, metadata,
  batch files written to a work folder) in one process;
- ``scan_workers`` and ``plan_workers``: the same with the default ``scan_processes`` (the CPUs
  this process may use, at most 8), as the plan task runs them.

Prints each run, the medians, files per second, the ratio of each to the bare loop, and the
process's peak resident memory. Run it with ``uv run python bench/bench_scan.py [--files N]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pydicom

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # the file generator lives with the tests

from dicom_ingest.staging.catalog import ScanCatalog  # noqa: E402
from dicom_ingest.staging.options import StagingOptions  # noqa: E402
from dicom_ingest.staging.parallel import default_scan_processes  # noqa: E402
from dicom_ingest.staging.plan import build_plan  # noqa: E402
from dicom_ingest.staging.scan import scan_staging  # noqa: E402
from dicom_ingest.staging.source import StagingSource  # noqa: E402
from tests.staging.factory import clone_study  # noqa: E402

INSTANCES_PER_STUDY = 100
RUNS = 3


def bare_loop(root: Path) -> int:
    """Read every file's header with pydicom alone; return the number of files."""
    count = 0
    for folder, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            pydicom.dcmread(os.path.join(folder, name), stop_before_pixels=True)
            count += 1
    return count


ONE_PROCESS = StagingOptions(scan_processes=1)
DEFAULT_PROCESSES = StagingOptions()


def staging_scan(root: Path | str, scratch: Path, options: StagingOptions) -> int:
    """Scan with the staging code into a fresh catalog; return the number of files classified."""
    catalog_path = scratch / "bench.sqlite"
    catalog_path.unlink(missing_ok=True)
    catalog = ScanCatalog(catalog_path)
    try:
        totals = scan_staging(StagingSource.from_uri(str(root)), options, catalog)
    finally:
        catalog.close()
    return totals.classified


def whole_plan(root: Path, work: Path, options: StagingOptions) -> int:
    """Build and write the whole plan; return the number of planned instances."""
    plan = build_plan(str(root), str(work), options)
    return sum(batch.instances for batch in plan.batches)


def peak_rss_mib() -> float:
    """Return this process's peak resident set size in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_scan(files: int, runs: int = RUNS, *, verbose: bool = True) -> dict[str, float]:
    """Generate ``files`` files, time each method ``runs`` times interleaved; return median seconds.

    :param files: how many files to generate (rounded down to whole studies of 100, at least one).
    :param runs: measurements of each method.
    :param verbose: print each run and the summary.
    :return: median seconds by method (``bare``, ``scan``, ``plan``, ``scan_workers``,
        ``plan_workers``), ``files``, the file count, and ``processes``, the default scan processes.
    """
    studies = max(1, files // INSTANCES_PER_STUDY)
    with tempfile.TemporaryDirectory(prefix="bench-scan-") as temporary:
        base = Path(temporary)
        root = base / "staging"
        started = time.perf_counter()
        written = sum(
            clone_study(root, f"study{number:05d}/series1", number, INSTANCES_PER_STUDY)
            for number in range(studies)
        )
        files = studies * INSTANCES_PER_STUDY
        generation_seconds = time.perf_counter() - started
        if verbose:
            print(f"generated {files} files ({written / files:.0f} bytes each) in {generation_seconds:.1f} s")
            print(f"peak RSS after generation: {peak_rss_mib():.0f} MiB")

        methods: dict[str, Callable[[], int]] = {
            "bare": lambda: bare_loop(root),
            "scan": lambda: staging_scan(root, base, ONE_PROCESS),
            "plan": lambda: whole_plan(root, base / "work", ONE_PROCESS),
            "scan_workers": lambda: staging_scan(root, base, DEFAULT_PROCESSES),
            "plan_workers": lambda: whole_plan(root, base / "work", DEFAULT_PROCESSES),
        }
        timings: dict[str, list[float]] = {name: [] for name in methods}
        for run in range(1, runs + 1):
            for name, method in methods.items():
                started = time.perf_counter()
                handled = method()
                elapsed = time.perf_counter() - started
                if handled != files:
                    raise SystemExit(f"{name} handled {handled} files, expected {files}")
                timings[name].append(elapsed)
                if verbose:
                    print(f"run {run} {name:12s} {elapsed:7.2f} s  {files / elapsed:8.0f} files/s")
    medians = {name: statistics.median(values) for name, values in timings.items()}
    if verbose:
        print()
        print(f"{'method':12s} {'median s':>9s} {'files/s':>9s} {'x bare':>7s}")
        for name, median in medians.items():
            print(f"{name:12s} {median:9.2f} {files / median:9.0f} {median / medians['bare']:7.2f}")
        print(f"peak RSS of the whole benchmark process: {peak_rss_mib():.0f} MiB")
    return {**medians, "files": float(files), "processes": float(default_scan_processes())}


def main() -> None:
    """Parse the options, run the interleaved measurements and print the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20_000, help="number of files to generate")
    parser.add_argument("--runs", type=int, default=RUNS, help="measurements of each method")
    arguments = parser.parse_args()
    measure_scan(arguments.files, arguments.runs)


if __name__ == "__main__":
    main()
