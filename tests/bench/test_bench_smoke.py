"""The benchmark harness in its smallest mode: every section runs and every table row is filled.

No speed is asserted: the numbers go to BENCHMARKS.md, not to tests.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from bench.run import (
    CEILING,
    CEILING_MD5,
    CEILING_MD5_AT_LIMIT,
    CEILING_MD5_OVER_CEILING,
    DAG,
    DAG_EMPTY,
    DAG_OVER_CEILING,
    DAG_WALL_FACTOR,
    DAG_WALL_OVER_AT_LIMIT,
    DAG_WALL_OVER_LIMIT,
    LOOPBACK,
    NAIVE,
    PLUGIN,
    PLUGIN_OVER_AT_LIMIT,
    PLUGIN_OVER_CEILING,
    PLUGIN_OVER_CEILING_MD5,
    PLUGIN_OVER_NAIVE,
    SPLIT,
    WAN,
    Options,
    Report,
    build_parser,
    options_from,
    run_benchmarks,
)
from dicom_ingest_sandbox.testing import Sandbox

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]

RAW_AND_PLUGIN = (NAIVE, CEILING, CEILING_MD5, PLUGIN)
LEDGER_MEASUREMENTS = 5
SECTION_HEADINGS = ("Uploads", "Ceiling sweep", "Targets", "Memory", "Header scan", "DAG-file", "Ledger")


def quick_options(*flags: str) -> Options:
    return options_from(build_parser().parse_args(["--quick", *flags]))


def run_quick(options: Options, sandbox: Sandbox | None = None) -> Report:
    with tempfile.TemporaryDirectory(prefix="dicom-ingest-bench-smoke-") as scratch:
        report = run_benchmarks(options, Path(scratch), loopback_sandbox=sandbox)
    assert report.all_failures() == {}
    return report


def upload_rows_by_key(report: Report) -> dict[tuple[str, str, str], Sequence[str]]:
    return {(row[0], row[1], row[2]): row for row in report.upload_rows()}


def rate_quotients(report: Report, key: tuple[str, str], measured: str, reference: str) -> list[float]:
    """Return, run by run, the measured method's instances/s divided by the reference's."""
    assert report.uploads is not None
    return [
        top.instances_per_second / bottom.instances_per_second
        for top, bottom in zip(
            report.uploads.samples[(*key, measured)], report.uploads.samples[(*key, reference)], strict=True
        )
    ]


def expected_upload_rows(report: Report, condition: str, options: Options) -> set[tuple[str, str, str]]:
    """Return the upload rows of every dataset: the raw clients and the plugin, and the hashing
    client kept to the vendor's limit where the sweep's best thread count is above it."""
    assert report.uploads is not None
    expected = set()
    for spec in options.datasets:
        expected |= {(condition, spec.name, method) for method in RAW_AND_PLUGIN}
        sweep = report.uploads.sweeps[(condition, spec.name)]
        if max(sweep, key=lambda sample: sample.instances_per_second).workers > options.upload_concurrency:
            expected.add((condition, spec.name, CEILING_MD5_AT_LIMIT))
    return expected


def test_the_quick_harness_fills_every_row_of_every_section(sandbox: Sandbox) -> None:
    options = quick_options("--conditions", LOOPBACK)
    report = run_quick(options, sandbox)

    assert options.dag_dataset is not None
    expected_uploads = expected_upload_rows(report, LOOPBACK, options)
    expected_uploads |= {
        (LOOPBACK, options.dag_dataset.name, method)
        for method in (CEILING, CEILING_MD5_AT_LIMIT, DAG_EMPTY, DAG)
    }
    rows = upload_rows_by_key(report)
    assert set(rows) == expected_uploads
    for (_, _, method), row in rows.items():
        rate = float(row[6].replace(",", ""))
        assert rate == 0 if method == DAG_EMPTY else rate > 0

    assert len(report.sweep_rows()) == (len(options.datasets) + 1) * len(options.sweep)
    figures = [row[0] for row in report.target_rows()]
    assert report.uploads is not None
    for spec in options.datasets:
        assert f"{PLUGIN_OVER_CEILING} ({LOOPBACK}, {spec.name})" in figures
        assert f"{PLUGIN_OVER_NAIVE} ({LOOPBACK}, {spec.name})" in figures
        assert f"{PLUGIN_OVER_CEILING_MD5} ({LOOPBACK}, {spec.name})" in figures
        assert f"{CEILING_MD5_OVER_CEILING} ({LOOPBACK}, {spec.name})" in figures
        assert f"{PLUGIN_OVER_AT_LIMIT} ({LOOPBACK}, {spec.name})" in figures
        assert report.uploads.ratios[(LOOPBACK, spec.name, CEILING_MD5_OVER_CEILING)] == rate_quotients(
            report, (LOOPBACK, spec.name), CEILING_MD5, CEILING
        )
    for ratio in (DAG_OVER_CEILING, DAG_WALL_OVER_LIMIT, DAG_WALL_OVER_AT_LIMIT):
        assert f"{ratio} ({LOOPBACK}, {options.dag_dataset.name})" in figures
    dag_samples = report.uploads.samples
    dag_key = (LOOPBACK, options.dag_dataset.name)
    limited = [sample.seconds for sample in dag_samples[(*dag_key, CEILING_MD5_AT_LIMIT)]]
    dag_seconds = dag_samples[(*dag_key, DAG)][0].seconds
    allowed = DAG_WALL_FACTOR * (limited[0] + limited[1]) / 2 + options.quiet_period
    assert report.uploads.ratios[(*dag_key, DAG_WALL_OVER_AT_LIMIT)] == [dag_seconds / allowed]
    assert any(figure.startswith("peak RSS growth") for figure in figures)
    assert any(figure.startswith("scan files/s") for figure in figures)
    assert any(figure.startswith("DAG-file parse time") for figure in figures)

    assert report.memory is not None
    assert report.memory["uploaded"] == 1
    assert report.memory["bytes"] == options.large_instance
    assert report.scan is not None and report.scan["files"] == options.scan_files
    assert report.parse is not None and sorted(report.parse) == sorted(options.parse_sites)
    assert report.ledger is not None and len(report.ledger["SQLite"]) == LEDGER_MEASUREMENTS

    text = report.render("python -m bench --quick")
    for heading in SECTION_HEADINGS:
        assert f"### {heading}" in text


def test_the_hashing_client_is_kept_to_the_vendors_limit_when_the_sweep_picks_more_threads() -> None:
    options = quick_options(
        "--conditions", LOOPBACK, "--sections", "uploads", "--sweep", "8", "--upload-concurrency", "4"
    )
    report = run_quick(replace(options, dag_dataset=None))

    assert report.uploads is not None
    rows = upload_rows_by_key(report)
    for spec in options.datasets:
        limited_row = rows[(LOOPBACK, spec.name, CEILING_MD5_AT_LIMIT)]
        assert limited_row[3] == "4"
        assert rows[(LOOPBACK, spec.name, CEILING_MD5)][3] == "8"
        assert report.uploads.ratios[(LOOPBACK, spec.name, PLUGIN_OVER_AT_LIMIT)] == rate_quotients(
            report, (LOOPBACK, spec.name), PLUGIN, CEILING_MD5_AT_LIMIT
        )


def test_the_wan_condition_runs_every_method_through_the_delaying_proxies() -> None:
    options = quick_options("--conditions", WAN, "--sections", "uploads", "--wan-rtt-ms", "10")
    report = run_quick(replace(options, dag_dataset=None))

    rows = upload_rows_by_key(report)
    assert set(rows) == expected_upload_rows(report, WAN, options)
    for row in rows.values():
        assert float(row[6].replace(",", "")) > 0
        assert row[10] != "—"  # the proxies' CPU is measured under the WAN condition


def test_the_split_condition_measures_every_upload_row_and_sets_no_target() -> None:
    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2:
        pytest.skip(f"the split condition needs two CPUs; this process may use {len(cpus)}")
    options = quick_options("--conditions", SPLIT, "--sections", "uploads")
    report = run_quick(options)

    rows = upload_rows_by_key(report)
    assert set(rows) == expected_upload_rows(report, SPLIT, options)
    for row in rows.values():
        assert float(row[6].replace(",", "")) > 0
    split_targets = [row for row in report.target_rows() if f"({SPLIT}, " in row[0]]
    assert {row[0] for row in split_targets} >= {
        f"{PLUGIN_OVER_CEILING} ({SPLIT}, {spec.name})" for spec in options.datasets
    }
    assert all(row[2:] == ["—", "—"] for row in split_targets)
    assert os.sched_getaffinity(0) == cpus


def test_the_split_condition_is_reported_as_not_measured_on_one_cpu() -> None:
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        options = quick_options("--conditions", SPLIT, "--sections", "uploads")
        with tempfile.TemporaryDirectory(prefix="dicom-ingest-bench-smoke-") as scratch:
            report = run_benchmarks(replace(options, dag_dataset=None), Path(scratch))
    finally:
        os.sched_setaffinity(0, cpus)

    assert report.uploads is not None and not report.uploads.samples
    assert report.all_failures() == {
        f"uploads ({SPLIT})": "not measured: the services need a core of "
        "their own, and this process may use 1"
    }
