"""Run the benchmarks of issue-sized datasets against the vendor sandbox and print the tables.

``make bench`` runs ``python -m bench``. Sections:

- ``uploads``: for each network condition (loopback as is; an emulated WAN, the sandbox's
  delaying proxies adding ``--wan-rtt-ms`` round trip in front of its API and its store; and
  ``split``, loopback with the sandbox on a core of its own and the uploader on the others, as if
  the vendor's stand-in ran on another machine: no target is set for it, it shows how much of a
  gap comes from sharing the cores) and each dataset, interleaved runs of

  - ``naive``: a sequential loop of plain ``requests`` presign + PUT calls (on a sample of at
    most ``--naive-max-instances``: a sequential loop's rate does not depend on how many it sends);
  - ``ceiling``: a thread pool over one pooled ``requests.Session`` doing presign + PUT only, with
    the thread count that was best in a sweep (``--sweep``) made first on a sample;
  - ``ceiling+md5``: the same client with the same threads, also hashing each body as it streams
    and checking the store's ETag against it (what any client that checks what arrived must do;
    it shows what the integrity check alone costs);
  - ``ceiling+md5@limit``: the hashing client kept to the vendor's limit of parallel uploads (the
    site's ``upload_concurrency``), with the sweep's best thread count within it: all that the
    design and the vendor's contract ask of a client, and nothing else. It is run only when the
    sweep's best is above the limit; otherwise it is ``ceiling+md5`` itself;
  - ``plugin``: the product's upload path (plan recorded in a fresh ledger, then the upload
    task's engine: hook, ledger writes, metadata PATCH, progress);
  - on the ``--dag-dataset`` instead (not under ``split``): the ceiling, ``ceiling+md5@limit``,
    ``dag``, the whole ``airflow dags test`` of the benchmark site, and ``dag-empty``, the same
    over an empty staging area (the fixed cost of a run);

  with wall time, instances/s, MB/s and CPU seconds of the uploader and of the sandbox;
- ``memory``: peak RSS growth of the product while it uploads one ``--large-instance`` (sparse);
- ``scan``: the staging scan's files/s against a bare pydicom loop, both in one process, and the
  scan with its default worker processes (``bench_scan``);
- ``parse``: DAG-file parse time with ``--parse-sites`` sites;
- ``ledger``: ledger writes/s on SQLite and, when it answers, PostgreSQL (``bench_ledger``).

Every figure is the median of ``--runs`` runs; a ratio is the median of the ratios measured
within each run. Generated data lives in a temporary folder that is deleted at the end.
``--quick`` shrinks everything so the whole harness runs in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.datasets import DatasetSpec, StagedDataset, format_size, parse_size, write_dataset
from bench.harness import (
    CannotSplitCores,
    Column,
    Sample,
    ServiceCpu,
    ServiceWindow,
    cores_apart,
    machine_description,
    markdown_table,
    median,
    number,
    timed_in_process,
)
from dicom_ingest_sandbox.latency import LATENCY_MODELS

if TYPE_CHECKING:
    from bench.clients import VendorApi
    from bench.dag import AirflowBench
    from dicom_ingest_sandbox.testing import Sandbox

log = logging.getLogger("bench")

LOOPBACK = "loopback"
WAN = "wan"
SPLIT = "split"
CONDITIONS = (LOOPBACK, WAN, SPLIT)
DAG_CONDITIONS = (LOOPBACK, WAN)
"""The conditions under which the whole DAG is measured (the issue's two)."""
NAIVE, CEILING, CEILING_MD5, PLUGIN = "naive", "ceiling", "ceiling+md5", "plugin"
CEILING_MD5_AT_LIMIT = "ceiling+md5@limit"
"""The hashing client kept to the vendor's limit of parallel uploads (the site's upload_concurrency)."""
DAG, DAG_EMPTY = "dag", "dag-empty"
SECTIONS = ("uploads", "memory", "scan", "parse", "ledger")

PLUGIN_OVER_CEILING = "plugin/ceiling"
PLUGIN_OVER_NAIVE = "plugin/naive"
PLUGIN_OVER_CEILING_MD5 = "plugin/(ceiling+md5)"
CEILING_MD5_OVER_CEILING = "(ceiling+md5)/ceiling"
"""How close a raw client that also does the design's MD5 check comes to the unhashed ceiling."""
PLUGIN_OVER_AT_LIMIT = "plugin/(ceiling+md5@limit)"
"""The product against a raw client doing only what the design and the vendor's contract require."""
DAG_OVER_CEILING = "dag/ceiling"
DAG_WALL_OVER_LIMIT = "dag wall / (1.3 x ceiling wall + quiet period)"
DAG_WALL_OVER_AT_LIMIT = "dag wall / (1.3 x (ceiling+md5@limit) wall + quiet period)"
DAG_WALL_FACTOR = 1.3

SETTLE_SECONDS_PER_OBJECT = 0.05
SETTLE_MIN_SECONDS = 60.0


# --- options ---------------------------------------------------------------------------------


def parse_dataset(text: str) -> DatasetSpec:
    """Read a dataset written ``INSTANCESxSIZE/STUDIES``, e.g. ``2000x512KiB/20``.

    :param text: the dataset as written on the command line.
    """
    try:
        shape, studies = text.split("/")
        instances, size = shape.lower().split("x", 1)
        instance_bytes = parse_size(size)
        spec = DatasetSpec(
            name=f"{int(instances):,} x {format_size(instance_bytes)}",
            instances=int(instances),
            instance_bytes=instance_bytes,
            studies=int(studies),
        )
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"{text!r}: write INSTANCESxSIZE/STUDIES, e.g. 2000x512KiB/20"
        ) from error
    if not 0 < spec.studies <= spec.instances:
        raise argparse.ArgumentTypeError(f"{text!r}: need at least one instance per study")
    return spec


def _csv_ints(text: str) -> tuple[int, ...]:
    """Read ``4,8,16``."""
    return tuple(int(part) for part in text.split(",") if part.strip())


def _csv_words(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """Return a parser of comma-separated words out of ``choices``."""

    def parse(text: str) -> tuple[str, ...]:
        words = tuple(part.strip() for part in text.split(",") if part.strip())
        unknown = [word for word in words if word not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown)}; choose from {', '.join(choices)}"
            )
        return words

    return parse


DEFAULT_DATASETS = (parse_dataset("2000x512KiB/20"), parse_dataset("200x8MiB/20"))
DEFAULT_DAG_DATASET = parse_dataset("20000x100KiB/200")


@dataclass(frozen=True)
class Options:
    """What to measure and how big; every size has a flag (see :func:`build_parser`)."""

    runs: int = 3
    sections: tuple[str, ...] = SECTIONS
    conditions: tuple[str, ...] = CONDITIONS
    wan_rtt_ms: float = 40.0
    wan_model: str = "tcp"
    datasets: tuple[DatasetSpec, ...] = DEFAULT_DATASETS
    dag_dataset: DatasetSpec | None = DEFAULT_DAG_DATASET
    sweep: tuple[int, ...] = (4, 8, 16, 20, 32)
    sweep_max_instances: int = 1000
    naive_max_instances: int = 200
    upload_concurrency: int = 20
    quiet_period: float = 5.0
    processing_time: float = 1.0
    poke_interval: float = 1.0
    large_instance: int = 2 * 2**30
    scan_files: int = 20_000
    parse_sites: tuple[int, ...] = (1, 10, 100)
    ledger_studies: int = 1000
    ledger_instances_per_study: int = 10


QUICK = {
    "runs": 1,
    "datasets": (parse_dataset("40x64KiB/4"), parse_dataset("8x1MiB/2")),
    "dag_dataset": parse_dataset("60x16KiB/3"),
    "sweep_max_instances": 40,
    "naive_max_instances": 20,
    "quiet_period": 1.0,
    "processing_time": 0.5,
    "poke_interval": 0.5,
    "large_instance": 16 * 2**20,
    "scan_files": 200,
    "ledger_studies": 20,
    "ledger_instances_per_study": 5,
}
"""What ``--quick`` changes: every size shrinks so the whole harness runs in a few minutes."""


def build_parser() -> argparse.ArgumentParser:
    """Return the command line parser (defaults: the issue's sizes)."""
    defaults = Options()
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and one run, to smoke-test the harness"
    )
    parser.add_argument("--runs", type=int, help=f"runs of each measurement (default {defaults.runs})")
    parser.add_argument(
        "--sections", type=_csv_words(SECTIONS), default=SECTIONS, help="comma-separated sections to run"
    )
    parser.add_argument(
        "--conditions", type=_csv_words(CONDITIONS), default=CONDITIONS, help="network conditions"
    )
    parser.add_argument("--wan-rtt-ms", type=float, default=defaults.wan_rtt_ms, help="round trip of the WAN")
    parser.add_argument(
        "--wan-model",
        choices=LATENCY_MODELS,
        default=defaults.wan_model,
        help="the sandbox's --latency-model for the WAN: 'tcp' adds TCP's slow start, 'delay' only delays",
    )
    parser.add_argument(
        "--datasets",
        type=lambda text: tuple(parse_dataset(part) for part in text.split(",")),
        help="upload datasets, INSTANCESxSIZE/STUDIES,... (default 2000x512KiB/20,200x8MiB/20)",
    )
    parser.add_argument(
        "--dag-dataset",
        type=parse_dataset,
        help="dataset of the whole-DAG figure (default 20000x100KiB/200)",
    )
    parser.add_argument("--no-dag", action="store_true", help="skip the whole-DAG figure")
    parser.add_argument("--sweep", type=_csv_ints, default=defaults.sweep, help="ceiling thread counts")
    parser.add_argument("--sweep-max-instances", type=int, help="instances per sweep point (default 1000)")
    parser.add_argument(
        "--naive-max-instances", type=int, help="instances the naive loop sends (default 200)"
    )
    parser.add_argument(
        "--upload-concurrency",
        type=int,
        default=defaults.upload_concurrency,
        help="the benchmark site's upload_concurrency (the vendor allows 20)",
    )
    parser.add_argument("--quiet-period", type=float, help="the sandbox's quiet period, s (default 5)")
    parser.add_argument("--processing-time", type=float, help="the sandbox's processing time, s (default 1)")
    parser.add_argument("--poke-interval", type=float, help="the order sensor's poke interval, s (default 1)")
    parser.add_argument("--large-instance", type=parse_size, help="size of the memory test's instance (2GiB)")
    parser.add_argument("--scan-files", type=int, help="files of the scan benchmark (default 20000)")
    parser.add_argument("--parse-sites", type=_csv_ints, help="site counts of the parse benchmark (1,10,100)")
    parser.add_argument("--ledger-studies", type=int, help="studies of the ledger benchmark (default 1000)")
    parser.add_argument("--ledger-instances-per-study", type=int, help="default 10")
    parser.add_argument("--json", type=Path, help="also write every sample as JSON to this file")
    parser.add_argument("--output", type=Path, help="also write the Markdown report to this file")
    parser.add_argument("--verbose", action="store_true", help="show the product's own log lines")
    return parser


def options_from(arguments: argparse.Namespace) -> Options:
    """Build options: defaults, then ``--quick``'s sizes, then every flag given.

    :param arguments: the parsed command line.
    """
    options = replace(Options(), **QUICK) if arguments.quick else Options()
    given = {
        option.name: getattr(arguments, option.name)
        for option in fields(Options)
        if getattr(arguments, option.name, None) is not None
    }
    options = replace(options, **given)
    return replace(options, dag_dataset=None) if arguments.no_dag else options


# --- the upload measurements -----------------------------------------------------------------


@dataclass
class UploadResults:
    """Every upload sample, sweep point and per-run ratio, by condition and dataset name."""

    samples: dict[tuple[str, str, str], list[Sample]] = field(default_factory=lambda: defaultdict(list))
    sweeps: dict[tuple[str, str], list[Sample]] = field(default_factory=lambda: defaultdict(list))
    ratios: dict[tuple[str, str, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    quiet_period: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)

    def add(self, condition: str, dataset: str, sample: Sample) -> Sample:
        """Keep a sample; return it."""
        self.samples[(condition, dataset, sample.method)].append(sample)
        return sample

    def ratio(self, condition: str, dataset: str, name: str, value: float) -> None:
        """Keep one run's ratio."""
        self.ratios[(condition, dataset, name)].append(value)


@dataclass
class ConditionContext:
    """Everything the samples of one network condition share.

    :param condition: one of :data:`CONDITIONS`.
    :param sandbox: the running sandbox.
    :param api: its API and credentials.
    :param services: its processes' CPU clocks.
    :param site_concurrency: the benchmark site's ``upload_concurrency``.
    :param work: a scratch folder of this condition.
    :param results: where the samples go.
    """

    condition: str
    sandbox: Sandbox
    api: VendorApi
    services: ServiceCpu
    site_concurrency: int
    work: Path
    results: UploadResults
    airflow: AirflowBench | None = None
    runs_started: int = 0

    def settle(self, objects: int, *, delivered_studies: int | None = None) -> dict[str, Any]:
        """Wait (untimed) until the sandbox has filed ``objects`` objects, then check them.

        :param objects: objects the run sent.
        :param delivered_studies: when given, also wait for that many ``DELIVERED`` orders.
        :raises RuntimeError: an object was rejected, or the sandbox did not catch up in time.
        """

        def caught_up(summary: dict[str, Any]) -> dict[str, Any] | None:
            if summary["objects"]["received"] < objects:
                return None
            if delivered_studies is not None and summary["orders"].get("DELIVERED", 0) < delivered_studies:
                return None
            return summary

        summary = self._wait(caught_up, max(SETTLE_MIN_SECONDS, objects * SETTLE_SECONDS_PER_OBJECT))
        if summary["objects"]["rejected"] or summary["objects"]["received"] != objects:
            raise RuntimeError(f"{self.condition}: the sandbox filed {summary['objects']} for {objects} sent")
        return summary

    def store_log_tail(self, lines: int = 5) -> str:
        """Return the last lines of the object store's log (no secrets: keys and errors only)."""
        log_path = self.sandbox.data_dir / "store.log"
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def _wait(self, predicate: Callable[[dict[str, Any]], Any], timeout: float) -> dict[str, Any]:
        """Poll the sandbox's summary until ``predicate`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate(self.sandbox.summary())
            if result:
                return result
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.condition}: the sandbox did not catch up within {timeout:.0f} s")
            time.sleep(0.2)


def _raw_sample(
    context: ConditionContext,
    method: str,
    files: Sequence[Any],
    upload: Callable[[], list[str]],
    workers: int,
) -> Sample:
    """Measure a raw client (no ledger, no metadata) over ``files``."""
    from bench.clients import UploadRefused

    context.sandbox.reset()
    try:
        timing = timed_in_process(upload, lambda: context.settle(len(files)), context.services)
    except UploadRefused as error:
        raise UploadRefused(
            f"{method}: {error}; the store's log ends with: {context.store_log_tail()}"
        ) from error
    return Sample(
        method,
        timing.seconds,
        len(files),
        sum(staged.size for staged in files),
        timing.uploader_cpu,
        timing.service_cpu,
        timing.proxy_cpu,
        workers,
        retry_reasons=tuple(timing.result),
    )


def naive_sample(context: ConditionContext, dataset: StagedDataset, limit: int) -> Sample:
    """Measure the sequential loop over the first ``limit`` instances."""
    from bench.clients import naive_upload

    files = dataset.files[:limit]
    return _raw_sample(context, NAIVE, files, lambda: naive_upload(context.api, files), 1)


def ceiling_sample(
    context: ConditionContext,
    files: Sequence[Any],
    workers: int,
    *,
    verify: bool = False,
    method: str | None = None,
) -> Sample:
    """Measure the pooled thread-pool client with ``workers`` threads (``verify``: hashing, ETag checked).

    :param method: the sample's name; ``ceiling`` or ``ceiling+md5`` (by ``verify``) when omitted.
    """
    from bench.clients import pooled_upload

    method = method or (CEILING_MD5 if verify else CEILING)
    return _raw_sample(
        context, method, files, lambda: pooled_upload(context.api, files, workers, verify=verify), workers
    )


def _run_id(context: ConditionContext) -> str:
    """Return a fresh run id (each run plans into its own folder and ledger)."""
    context.runs_started += 1
    return f"bench_{context.condition}_{context.runs_started:03d}"


def plugin_sample(context: ConditionContext, dataset: StagedDataset) -> Sample:
    """Measure the product's upload path: plan (untimed) into a fresh ledger, then the upload tasks."""
    from bench import product

    run_id = _run_id(context)
    site = product.operator_arguments(
        product.site_entry(
            str(dataset.root),
            upload_concurrency=context.site_concurrency,
            ledger_path=str(context.work / f"{run_id}.sqlite"),
            work_location=str(context.work / "plugin-work"),
            reports_location=str(context.work / "plugin-reports"),
        )
    )
    context.sandbox.reset()
    with product.vendor_connection(context.api):
        plan = product.plan_run(site, run_id)
        timing = timed_in_process(
            lambda: product.upload_batches(site, plan, run_id),
            lambda: context.settle(dataset.spec.instances),
            context.services,
        )
    return Sample(
        PLUGIN,
        timing.seconds,
        dataset.spec.instances,
        dataset.spec.total_bytes,
        timing.uploader_cpu,
        timing.service_cpu,
        timing.proxy_cpu,
        context.site_concurrency,
    )


def dag_sample(context: ConditionContext, staging: Path, spec: DatasetSpec | None) -> Sample:
    """Measure one ``airflow dags test`` over ``staging`` (``spec`` None: an empty staging area)."""
    assert context.airflow is not None
    context.sandbox.reset()
    with ServiceWindow(context.services) as window:
        run = context.airflow.run(staging)
        if spec is not None:
            context.settle(spec.instances, delivered_studies=spec.studies)
        service_cpu, proxy_cpu = window.used()
    return Sample(
        DAG if spec is not None else DAG_EMPTY,
        run.seconds,
        spec.instances if spec else 0,
        spec.total_bytes if spec else 0,
        run.cpu_seconds,
        service_cpu,
        proxy_cpu,
        context.site_concurrency,
    )


def sweep_ceiling(context: ConditionContext, dataset: StagedDataset, options: Options) -> list[Sample]:
    """Measure the pooled client at each thread count of the sweep, on a sample of the dataset."""
    files = dataset.files[: options.sweep_max_instances]
    return [ceiling_sample(context, files, workers) for workers in options.sweep]


def best_ceiling_workers(context: ConditionContext, dataset: StagedDataset, options: Options) -> int:
    """Sweep the ceiling's thread counts on a sample of the dataset, keep the sweep, return the best."""
    sweep = sweep_ceiling(context, dataset, options)
    context.results.sweeps[(context.condition, dataset.spec.name)] = sweep
    best = max(sweep, key=lambda sample: sample.instances_per_second).workers
    log.info("%s %s: the ceiling sweep picked %d threads", context.condition, dataset.spec.name, best)
    return best


def workers_within_limit(context: ConditionContext, dataset: StagedDataset) -> int:
    """Return the sweep's best thread count within the vendor's limit (the limit itself if none is).

    :param context: the condition, whose sweep of ``dataset`` has been made.
    :param dataset: the dataset swept.
    """
    sweep = context.results.sweeps[(context.condition, dataset.spec.name)]
    allowed = [sample for sample in sweep if sample.workers <= context.site_concurrency]
    if not allowed:
        return context.site_concurrency
    return max(allowed, key=lambda sample: sample.instances_per_second).workers


def at_limit_sample(context: ConditionContext, files: Sequence[Any], workers: int) -> Sample:
    """Measure ``ceiling+md5`` with ``workers`` threads, within the vendor's limit."""
    return ceiling_sample(context, files, workers, verify=True, method=CEILING_MD5_AT_LIMIT)


def measure_dataset(context: ConditionContext, dataset: StagedDataset, options: Options) -> None:
    """Run every upload method ``options.runs`` times, interleaved, keeping each run's ratios."""
    condition, name, results = context.condition, dataset.spec.name, context.results
    workers = best_ceiling_workers(context, dataset, options)
    limited_workers = workers_within_limit(context, dataset)
    for run in range(1, options.runs + 1):
        naive = results.add(condition, name, naive_sample(context, dataset, options.naive_max_instances))
        ceiling = results.add(condition, name, ceiling_sample(context, dataset.files, workers))
        verified = results.add(condition, name, ceiling_sample(context, dataset.files, workers, verify=True))
        limited = verified
        if limited_workers != workers:
            limited = results.add(condition, name, at_limit_sample(context, dataset.files, limited_workers))
        plugin = results.add(condition, name, plugin_sample(context, dataset))
        for ratio, measured, reference in (
            (PLUGIN_OVER_CEILING, plugin, ceiling),
            (PLUGIN_OVER_CEILING_MD5, plugin, verified),
            (CEILING_MD5_OVER_CEILING, verified, ceiling),
            (PLUGIN_OVER_AT_LIMIT, plugin, limited),
            (PLUGIN_OVER_NAIVE, plugin, naive),
        ):
            value = measured.instances_per_second / reference.instances_per_second
            results.ratio(condition, name, ratio, value)
        log.info(
            "%s %s run %d: naive %.0f/s, ceiling %.0f/s, ceiling+md5 %.0f/s, %s %.0f/s, plugin %.0f/s",
            condition,
            name,
            run,
            naive.instances_per_second,
            ceiling.instances_per_second,
            verified.instances_per_second,
            CEILING_MD5_AT_LIMIT,
            limited.instances_per_second,
            plugin.instances_per_second,
        )


def measure_dag_dataset(
    context: ConditionContext, dataset: StagedDataset, options: Options, empty_staging: Path
) -> None:
    """Run DAG runs over an empty staging area and over the dataset, each between two reference runs.

    The references are the ceiling and ``ceiling+md5@limit``. Each DAG run's ratios use the mean
    of the reference runs just before and just after it, so a machine that gets slower or faster
    for a few minutes moves both sides of the ratio alike.
    """
    condition, name, results = context.condition, dataset.spec.name, context.results
    workers = best_ceiling_workers(context, dataset, options)
    limited_workers = workers_within_limit(context, dataset)

    def references() -> tuple[Sample, Sample]:
        ceiling = results.add(condition, name, ceiling_sample(context, dataset.files, workers))
        return ceiling, results.add(condition, name, at_limit_sample(context, dataset.files, limited_workers))

    before = references()
    for run in range(1, options.runs + 1):
        empty = results.add(condition, name, dag_sample(context, empty_staging, None))
        dag = results.add(condition, name, dag_sample(context, dataset.root, dataset.spec))
        after = references()
        ceiling_seconds, limited_seconds = (
            (first.seconds + last.seconds) / 2 for first, last in zip(before, after, strict=True)
        )
        results.ratio(condition, name, DAG_OVER_CEILING, ceiling_seconds / dag.seconds)
        for ratio, reference_seconds in (
            (DAG_WALL_OVER_LIMIT, ceiling_seconds),
            (DAG_WALL_OVER_AT_LIMIT, limited_seconds),
        ):
            limit = DAG_WALL_FACTOR * reference_seconds + results.quiet_period
            results.ratio(condition, name, ratio, dag.seconds / limit)
        log.info(
            "%s %s run %d: ceiling %.1f s, %s %.1f s (means of the runs before and after), "
            "empty DAG run %.1f s, DAG run %.1f s",
            condition,
            name,
            run,
            ceiling_seconds,
            CEILING_MD5_AT_LIMIT,
            limited_seconds,
            empty.seconds,
            dag.seconds,
        )
        before = after


@contextmanager
def condition_sandbox(
    condition: str, options: Options, work: Path, given: Sandbox | None
) -> Iterator[Sandbox]:
    """Yield the sandbox of a condition: ``given`` for loopback when there is one, else a new one.

    The benchmark's clocks are set for the duration (and restored on a given sandbox). Under
    ``split`` the new sandbox gets a core of its own and this process the others.

    :raises CannotSplitCores: ``split`` where the cores cannot be split (one CPU, or not Linux).
    """
    from dicom_ingest_sandbox.testing import running_sandbox

    clocks = {"quiet_period": options.quiet_period, "processing_time": options.processing_time}
    if condition == LOOPBACK and given is not None:
        with given.clocks(**clocks):
            yield given
        return
    latency = {}
    if condition == WAN:
        latency = {"latency_ms": options.wan_rtt_ms, "latency_model": options.wan_model}
    with ExitStack() as stack:
        sandbox = stack.enter_context(running_sandbox(work / "sandbox", **clocks, **latency))
        if condition == SPLIT:
            services = service_processes(sandbox).processes.values()
            stack.enter_context(cores_apart(process.pid for process in services))
        yield sandbox


def service_processes(sandbox: Sandbox) -> ServiceCpu:
    """Return the CPU clocks of the sandbox's API, store and proxy processes."""
    summary = sandbox.summary()
    return ServiceCpu(
        {"api": sandbox.pid, "store": summary["store"]["pid"], "proxy": summary["network"]["proxy_pid"]}
    )


def measure_uploads(
    options: Options,
    staged: Sequence[StagedDataset],
    dag_staged: StagedDataset | None,
    work: Path,
    given: Sandbox | None,
) -> UploadResults:
    """Run the upload section under every condition."""
    from bench.clients import VendorApi

    results = UploadResults(quiet_period=options.quiet_period)
    for condition in options.conditions:
        condition_work = work / condition
        condition_work.mkdir(parents=True, exist_ok=True)
        try:
            with condition_sandbox(condition, options, condition_work, given) as sandbox:
                context = ConditionContext(
                    condition,
                    sandbox,
                    VendorApi(sandbox.base_url, sandbox.client_id, sandbox.client_secret),
                    service_processes(sandbox),
                    options.upload_concurrency,
                    condition_work,
                    results,
                )
                measure_condition(
                    context, staged, dag_staged if condition in DAG_CONDITIONS else None, options, work
                )
        except CannotSplitCores as error:
            log.warning("The %s condition is not measured: %s", condition, error)
            results.failures[condition] = f"not measured: {error}"
    return results


def measure_condition(
    context: ConditionContext,
    staged: Sequence[StagedDataset],
    dag_staged: StagedDataset | None,
    options: Options,
    work: Path,
) -> None:
    """Measure every dataset, then the whole DAG (when ``dag_staged`` is given), under one condition.

    :param context: the condition's sandbox, clocks and results.
    :param staged: the upload datasets.
    :param dag_staged: the whole-DAG dataset, or ``None`` to skip that figure.
    :param options: what to measure.
    :param work: the upload section's scratch folder (the empty staging area of the DAG runs goes there).
    """
    from bench.dag import AirflowBench

    for dataset in staged:
        _measure_or_record(
            context.results, context.condition, dataset, partial(measure_dataset, context, dataset, options)
        )
    if dag_staged is None:
        return
    empty_staging = work / "empty-staging"
    empty_staging.mkdir(parents=True, exist_ok=True)
    context.airflow = AirflowBench(
        context.work / "airflow-home",
        context.api,
        upload_concurrency=context.site_concurrency,
        poke_interval=options.poke_interval,
    )
    context.airflow.migrate(empty_staging)
    _measure_or_record(
        context.results,
        context.condition,
        dag_staged,
        partial(measure_dag_dataset, context, dag_staged, options, empty_staging),
    )


def _measure_or_record(
    results: UploadResults, condition: str, dataset: StagedDataset, measure: Callable[[], None]
) -> None:
    """Run one dataset's measurements; a failure is recorded and the next dataset still runs."""
    try:
        measure()
    except Exception as error:
        log.exception("%s %s failed", condition, dataset.spec.name)
        results.failures[f"{condition}, {dataset.spec.name}"] = f"{type(error).__name__}: {error}"


# --- the other sections ----------------------------------------------------------------------


def measure_memory(options: Options, work: Path, given: Sandbox | None) -> dict[str, float]:
    """Upload one large sparse instance through the product in a child process; return its memory figures."""
    from bench.clients import VendorApi
    from bench.datasets import write_sparse_instance
    from bench.memory import measure_upload_memory
    from bench.product import CONNECTION_ENV, connection_json

    staging = work / "large-staging"
    write_sparse_instance(staging / "study" / "IM000001.dcm", options.large_instance)
    figures: list[dict[str, float]] = []
    with condition_sandbox(LOOPBACK, options, work, given) as sandbox:
        api = VendorApi(sandbox.base_url, sandbox.client_id, sandbox.client_secret)
        environment = {**os.environ, CONNECTION_ENV: connection_json(api)}
        for run in range(1, options.runs + 1):
            sandbox.reset()
            figures.append(measure_upload_memory(staging, work / f"memory-{run}", environment))
    return {key: median(figure[key] for figure in figures) for key in figures[0]}


def measure_parse(options: Options, work: Path) -> dict[int, dict[str, float]]:
    """Median cold and warm parse times of the DAG file for each site count."""
    from bench.parse_time import measure_parse_time, write_sites_file

    timings: dict[int, list[dict[str, float]]] = defaultdict(list)
    for _ in range(options.runs):
        for sites in options.parse_sites:
            sites_file = write_sites_file(work / f"sites-{sites}.yaml", sites)
            timing = measure_parse_time(sites_file, work / "parse-home")
            if timing["dags"] != sites or timing["import_errors"]:
                raise RuntimeError(f"parsing {sites} sites gave {timing['dags']} DAGs and import errors")
            timings[sites].append(timing)
    return {
        sites: {key: median(timing[key] for timing in runs) for key in ("cold", "warm")}
        for sites, runs in timings.items()
    }


def measure_ledger(options: Options) -> dict[str, dict[str, float]]:
    """Ledger rates on SQLite and, when it answers, PostgreSQL (medians of the runs)."""
    from bench.bench_ledger import bench, postgres_database

    backends: dict[str, list[dict[str, float]]] = defaultdict(list)
    for _ in range(options.runs):
        with tempfile.TemporaryDirectory(prefix="bench-ledger-") as directory:
            url = f"sqlite:///{Path(directory) / 'ledger.sqlite3'}"
            backends["SQLite"].append(
                bench(url, options.ledger_studies, options.ledger_instances_per_study, 2, verbose=False)
            )
        with postgres_database() as postgres:
            if postgres is not None:
                backends["PostgreSQL"].append(
                    bench(
                        postgres.render_as_string(hide_password=False),
                        options.ledger_studies,
                        options.ledger_instances_per_study,
                        2,
                        verbose=False,
                    )
                )
    return {
        backend: {label: median(rates[label] for rates in runs) for label in runs[0]}
        for backend, runs in backends.items()
    }


# --- the report --------------------------------------------------------------------------------


@dataclass
class Report:
    """Everything measured, ready to print."""

    options: Options
    started: datetime
    machine: str
    uploads: UploadResults | None = None
    memory: dict[str, float] | None = None
    scan: dict[str, float] | None = None
    parse: dict[int, dict[str, float]] | None = None
    ledger: dict[str, dict[str, float]] | None = None
    machine_after: str = ""
    seconds: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)

    def all_failures(self) -> dict[str, str]:
        """Return every failure: whole sections, and datasets of the upload section."""
        failures = {f"the {section} section": error for section, error in self.failures.items()}
        if self.uploads is not None:
            failures.update({f"uploads ({where})": error for where, error in self.uploads.failures.items()})
        return failures

    def upload_rows(self) -> list[list[str]]:
        """Return the rows of the upload table (medians of the runs)."""
        rows = []
        if self.uploads is None:
            return rows
        for (condition, dataset, method), samples in self.uploads.samples.items():
            rows.append(
                [
                    condition,
                    dataset,
                    method,
                    str(samples[0].workers),
                    f"{samples[0].instances:,}",
                    number(median(sample.seconds for sample in samples), 2),
                    number(median(sample.instances_per_second for sample in samples)),
                    number(median(sample.mb_per_second for sample in samples)),
                    number(median(sample.uploader_cpu for sample in samples), 2),
                    number(median(sample.service_cpu for sample in samples), 2),
                    number(median(sample.proxy_cpu for sample in samples), 2) if condition == WAN else "—",
                    str(sum(sample.retries for sample in samples)),
                    str(len(samples)),
                ]
            )
        return rows

    def sweep_rows(self) -> list[list[str]]:
        """Return the rows of the ceiling sweep table."""
        if self.uploads is None:
            return []
        return [
            [
                condition,
                dataset,
                str(sample.workers),
                f"{sample.instances:,}",
                number(sample.instances_per_second),
            ]
            for (condition, dataset), sweep in self.uploads.sweeps.items()
            for sample in sweep
        ]

    def target_rows(self) -> list[list[str]]:
        """Return each target with its measured value and whether it is met."""
        rows: list[list[str]] = []
        if self.uploads is not None:
            for (condition, dataset, name), values in self.uploads.ratios.items():
                figure = f"{name} ({condition}, {dataset})"
                rows.append(_target_row(figure, median(values), _ratio_target(condition, name)))
            rows.extend(self._dag_overhead_rows())
        if self.memory is not None:
            figure = f"peak RSS growth, one {format_size(self.options.large_instance)} instance (MiB)"
            rows.append(_target_row(figure, self.memory["growth_mib"], RSS_GROWTH_TARGET, 1))
        if self.scan is not None:
            ratio = self.scan["bare"] / self.scan["scan"]
            rows.append(_target_row("scan files/s ÷ bare pydicom files/s", ratio, SCAN_TARGET))
        if self.parse:
            most = max(self.parse)
            figure = f"DAG-file parse time, {most} sites, cold (s)"
            rows.append(_target_row(figure, self.parse[most]["cold"], PARSE_TARGET))
        return rows

    def _dag_overhead_rows(self) -> list[list[str]]:
        """Return the fixed and per-instance costs of a DAG run (no target: for the reader)."""
        assert self.uploads is not None
        rows = []
        for (condition, dataset, method), samples in self.uploads.samples.items():
            if method != DAG:
                continue
            empty = self.uploads.samples.get((condition, dataset, DAG_EMPTY), [])
            ceiling = self.uploads.samples.get((condition, dataset, CEILING), [])
            fixed = median(sample.seconds for sample in empty)
            per_instance = [
                (dag.seconds - blank.seconds - raw.seconds) / dag.instances * 1000
                for dag, blank, raw in zip(samples, empty, ceiling, strict=False)
            ]
            figure = f"fixed cost of a DAG run, empty staging ({condition}) (s)"
            rows.append(_target_row(figure, fixed, None, 1))
            figure = f"DAG per-instance overhead beyond the ceiling and the fixed cost ({condition}) (ms)"
            rows.append(_target_row(figure, median(per_instance), None))
        return rows

    def render(self, command: str) -> str:
        """Return the whole report as Markdown."""
        options = self.options
        parts = [
            f"Command: `{command}`",
            f"Date: {self.started:%Y-%m-%d %H:%M} UTC; took {self.seconds / 60:.1f} min",
            f"Machine at start: {self.machine}",
            f"Machine at end: {self.machine_after}",
            f"Runs per figure: {options.runs} (medians; ratios are medians of per-run ratios)",
        ]
        if self.uploads is not None:
            parts += [
                "",
                f"Sandbox clocks: quiet period {options.quiet_period:g} s, "
                f"processing {options.processing_time:g} s; "
                f"WAN = {options.wan_rtt_ms:g} ms round trip added in front of the API and the store "
                f"({options.wan_model} model); "
                "split = loopback with the sandbox's processes on the last CPU and the uploader on "
                "the others (no target); "
                f"the site's upload_concurrency {options.upload_concurrency}; "
                f"{CEILING_MD5_AT_LIMIT} = ceiling+md5 with the sweep's best thread count within "
                "that limit (the vendor allows 20 parallel uploads), run only where the best is above it; "
                f"naive runs on at most {options.naive_max_instances} instances, the sweep on at most "
                f"{options.sweep_max_instances}.",
                "",
                "### Uploads",
                "",
                markdown_table(UPLOAD_COLUMNS, self.upload_rows()),
                "",
                "### Ceiling sweep (thread pool over one pooled session; the best is used above)",
                "",
                markdown_table(SWEEP_COLUMNS, self.sweep_rows()),
            ]
            parts += self._retry_lines()
        parts += ["", "### Targets", "", markdown_table(TARGET_COLUMNS, self.target_rows())]
        parts += self._other_tables()
        for section, error in self.all_failures().items():
            parts += ["", f"**{section} failed**: {error.splitlines()[0]}"]
        return "\n".join(parts) + "\n"

    def _retry_lines(self) -> list[str]:
        """Return why the raw clients re-sent uploads, per row of the upload table (nothing if none)."""
        if self.uploads is None:
            return []
        lines = []
        for (condition, dataset, method), samples in self.uploads.samples.items():
            reasons = Counter(reason for sample in samples for reason in sample.retry_reasons)
            if reasons:
                counted = "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common())
                lines.append(f"- {condition} {dataset} {method}: {counted}")
        return ["", "Raw clients' re-sent uploads, and why:", "", *lines] if lines else []

    def _other_tables(self) -> list[str]:
        """Return the memory, scan, parse and ledger tables."""
        parts: list[str] = []
        if self.memory is not None:
            memory = self.memory
            rows = [
                [
                    format_size(self.options.large_instance),
                    number(memory["baseline_mib"]),
                    number(memory["peak_mib"]),
                    number(memory["growth_mib"]),
                    number(memory["seconds"], 1),
                    number(memory["bytes"] / memory["seconds"] / 1e6 if memory["seconds"] else float("nan")),
                ]
            ]
            parts += [
                "",
                "### Memory while uploading one large instance (loopback)",
                "",
                markdown_table(MEMORY_COLUMNS, rows),
            ]
        if self.scan is not None:
            files, processes = self.scan["files"], int(self.scan.get("processes", 1))
            labels = {
                "bare": "bare pydicom, 1 process",
                "scan": "scan, 1 process",
                "plan": "plan, 1 process",
                "scan_workers": f"scan, {processes} processes (default)",
                "plan_workers": f"plan, {processes} processes (default)",
            }
            rows = [
                [
                    label,
                    number(self.scan[method], 2),
                    number(files / self.scan[method], 0),
                    number(self.scan["bare"] / self.scan[method], 2),
                ]
                for method, label in labels.items()
                if method in self.scan
            ]
            parts += ["", f"### Header scan, {files:,.0f} files", "", markdown_table(SCAN_COLUMNS, rows)]
        if self.parse is not None:
            rows = [
                [str(sites), number(t["cold"], 3), number(t["warm"], 3)]
                for sites, t in sorted(self.parse.items())
            ]
            parts += ["", "### DAG-file parse time", "", markdown_table(PARSE_COLUMNS, rows)]
        if self.ledger is not None:
            rows = [
                [backend, label, number(rate, 0)]
                for backend, rates in self.ledger.items()
                for label, rate in rates.items()
            ]
            parts += ["", "### Ledger", "", markdown_table(LEDGER_COLUMNS, rows)]
        return parts


UPLOAD_COLUMNS = (
    Column("condition", "<"),
    Column("dataset", "<"),
    Column("method", "<"),
    Column("workers"),
    Column("instances"),
    Column("wall s"),
    Column("inst/s"),
    Column("MB/s"),
    Column("uploader CPU s"),
    Column("sandbox+store CPU s"),
    Column("proxy CPU s"),
    Column("retried"),
    Column("runs"),
)
SWEEP_COLUMNS = (
    Column("condition", "<"),
    Column("dataset", "<"),
    Column("threads"),
    Column("instances"),
    Column("inst/s"),
)
TARGET_COLUMNS = (Column("figure", "<"), Column("measured"), Column("target"), Column("met?", "<"))
MEMORY_COLUMNS = (
    Column("instance"),
    Column("RSS before MiB"),
    Column("peak RSS MiB"),
    Column("growth MiB"),
    Column("upload s"),
    Column("MB/s"),
)
SCAN_COLUMNS = (Column("method", "<"), Column("median s"), Column("files/s"), Column("÷ bare time"))
PARSE_COLUMNS = (Column("sites"), Column("cold parse s"), Column("warm re-parse s"))
LEDGER_COLUMNS = (Column("backend", "<"), Column("measurement", "<"), Column("rate /s"))


@dataclass(frozen=True)
class Target:
    """A target of the issue: its text and its test.

    :param text: e.g. ``≥ 0.9``.
    :param test: whether a measured value meets it.
    """

    text: str
    test: Callable[[float], bool]

    def verdict(self, value: float) -> str:
        """Return ``met`` or ``MISSED`` (``—`` when nothing was measured)."""
        if value != value:  # NaN
            return "—"
        return "met" if self.test(value) else "MISSED"


AT_LEAST_NINE_TENTHS = Target("≥ 0.9", lambda value: value >= 0.9)
AT_LEAST_TEN = Target("≥ 10", lambda value: value >= 10)
AT_MOST_ONE = Target("≤ 1", lambda value: value <= 1)
RSS_GROWTH_TARGET = Target("< 200", lambda value: value < 200)
SCAN_TARGET = Target("≥ 0.8", lambda value: value >= 0.8)
PARSE_TARGET = Target("< 2", lambda value: value < 2)


def _ratio_target(condition: str, name: str) -> Target | None:
    """Return a ratio's target, or ``None`` when the issue sets none (plugin/naive on loopback, split...)."""
    if condition == SPLIT:
        return None
    if name == PLUGIN_OVER_CEILING:
        return AT_LEAST_NINE_TENTHS
    if name == PLUGIN_OVER_NAIVE and condition == WAN:
        return AT_LEAST_TEN
    if name == DAG_WALL_OVER_LIMIT:
        return AT_MOST_ONE
    return None


def _target_row(figure: str, value: float, target: Target | None, digits: int = 2) -> list[str]:
    """Return one row of the targets table."""
    if target is None:
        return [figure, number(value, digits), "—", "—"]
    return [figure, number(value, digits), target.text, target.verdict(value)]


# --- running everything ------------------------------------------------------------------------


def prepare_environment(scratch: Path) -> None:
    """Point Airflow at a throw-away home before anything imports it (unless a caller already did)."""
    os.environ["AIRFLOW_HOME"] = str(scratch / "airflow-home")
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"


def run_benchmarks(options: Options, scratch: Path, loopback_sandbox: Sandbox | None = None) -> Report:
    """Run the selected sections; generated data goes under ``scratch``.

    :param options: what to measure.
    :param scratch: a temporary folder (the caller deletes it).
    :param loopback_sandbox: a running sandbox to use for the loopback condition (tests).
    """
    from bench import product

    with product.quiet_task_logs():
        return _run_sections(options, scratch, loopback_sandbox)


def _upload_section(options: Options, scratch: Path, sandbox: Sandbox | None, report: Report) -> None:
    """Generate the datasets and measure the uploads."""
    staged = [
        write_dataset(spec, scratch / f"dataset-{index}", namespace=index)
        for index, spec in enumerate(options.datasets, start=1)
    ]
    dag_measured = any(condition in DAG_CONDITIONS for condition in options.conditions)
    dag_staged = (
        write_dataset(options.dag_dataset, scratch / "dag-dataset", namespace=len(staged) + 1)
        if options.dag_dataset and dag_measured
        else None
    )
    report.uploads = measure_uploads(options, staged, dag_staged, scratch, sandbox)


def _memory_section(options: Options, scratch: Path, sandbox: Sandbox | None, report: Report) -> None:
    """Measure the memory of one large upload."""
    report.memory = measure_memory(options, scratch, sandbox)


def _scan_section(options: Options, scratch: Path, sandbox: Sandbox | None, report: Report) -> None:
    """Measure the header scan against bare pydicom."""
    from bench.bench_scan import measure_scan

    report.scan = measure_scan(options.scan_files, options.runs, verbose=False)


def _parse_section(options: Options, scratch: Path, sandbox: Sandbox | None, report: Report) -> None:
    """Measure the DAG file's parse time."""
    report.parse = measure_parse(options, scratch)


def _ledger_section(options: Options, scratch: Path, sandbox: Sandbox | None, report: Report) -> None:
    """Measure the ledger's write rates."""
    report.ledger = measure_ledger(options)


SECTION_RUNNERS: dict[str, Callable[[Options, Path, Sandbox | None, Report], None]] = {
    "uploads": _upload_section,
    "memory": _memory_section,
    "scan": _scan_section,
    "parse": _parse_section,
    "ledger": _ledger_section,
}


def _run_sections(options: Options, scratch: Path, loopback_sandbox: Sandbox | None) -> Report:
    """Run the selected sections (see :func:`run_benchmarks`); a failing section is reported, not fatal."""
    started = time.perf_counter()
    report = Report(options, datetime.now(UTC), machine_description())
    for section in SECTIONS:
        if section not in options.sections:
            continue
        section_scratch = scratch / section
        section_scratch.mkdir(parents=True, exist_ok=True)
        try:
            SECTION_RUNNERS[section](options, section_scratch, loopback_sandbox, report)
        except Exception as error:
            log.exception("the %s section failed", section)
            report.failures[section] = f"{type(error).__name__}: {error}"
    report.seconds = time.perf_counter() - started
    report.machine_after = machine_description()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks from the command line and print the report."""
    arguments = build_parser().parse_args(argv)
    options = options_from(arguments)
    logging.basicConfig(
        level=logging.INFO if arguments.verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
    )
    log.setLevel(logging.INFO)
    # A SIGTERM unwinds like Ctrl-C, so the sandboxes and the scratch folder go with the run.
    signal.signal(signal.SIGTERM, _exit_on_terminate)
    command = " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])])
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dicom-ingest-bench-")))
        prepare_environment(scratch)
        report = run_benchmarks(options, scratch)
    text = report.render(command)
    print(text)
    if arguments.output:
        arguments.output.write_text(text)
    if arguments.json:
        arguments.json.write_text(json.dumps(_json_document(report), indent=2, default=str))
    return 1 if report.all_failures() else 0


def _exit_on_terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _json_document(report: Report) -> dict[str, Any]:
    """Return every raw sample and figure as JSON-able data."""
    uploads = report.uploads
    return {
        "started": report.started.isoformat(),
        "machine": report.machine,
        "options": asdict(report.options),
        "samples": [
            {"condition": condition, "dataset": dataset, **asdict(sample)}
            for (condition, dataset, _), samples in (uploads.samples.items() if uploads else [])
            for sample in samples
        ],
        "ratios": [
            {"condition": condition, "dataset": dataset, "ratio": name, "values": values}
            for (condition, dataset, name), values in (uploads.ratios.items() if uploads else [])
        ],
        "memory": report.memory,
        "scan": report.scan,
        "parse": report.parse,
        "ledger": report.ledger,
        "failures": report.all_failures(),
    }
