"""Measurement primitives shared by every benchmark: CPU clocks, samples, medians and tables.

Nothing here asserts a speed: numbers go to the reader. Each figure is the median of several
runs, and a ratio is the median of the ratios taken within each run, so that two methods
measured side by side share whatever else the machine was doing at the time.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

BYTES_PER_MB = 1_000_000
BYTES_PER_MIB = 2**20


REPO_ROOT = Path(__file__).resolve().parent.parent
DAG_FILE = REPO_ROOT / "dags" / "dicom_ingest_sites.py"
"""The site DAG file the benchmarks parse and run."""


def run_json_child(
    module: str, arguments: Sequence[str], environment: Mapping[str, str], *, timeout: float, what: str
) -> dict[str, Any]:
    """Run ``python -m module arguments`` from the repository root; return the JSON object it printed last.

    :param module: the module to run.
    :param arguments: its command line arguments.
    :param environment: the child's whole environment.
    :param timeout: seconds the child may take.
    :param what: what the child does, for the error message.
    :raises RuntimeError: the child failed (with the end of its standard error).
    """
    completed = subprocess.run(
        [sys.executable, "-m", module, *arguments],
        env=dict(environment),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def own_cpu_seconds() -> float:
    """Return the CPU seconds (user + system) this process used so far, all threads together."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu_seconds() -> float:
    """Return the CPU seconds of this process's finished (waited-for) children and their children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def median(values: Iterable[float]) -> float:
    """Return the median, or NaN for no values.

    :param values: the measurements.
    """
    collected = list(values)
    return statistics.median(collected) if collected else float("nan")


class ServiceCpu:
    """Read the CPU time of the sandbox's processes: the API, the object store and the latency proxies.

    :param pids: process id by role (``api``, ``store``, ``proxy``); a ``None`` pid is left out.
    """

    def __init__(self, pids: Mapping[str, int | None]) -> None:
        self.processes = {role: psutil.Process(pid) for role, pid in pids.items() if pid is not None}

    def read(self) -> dict[str, float]:
        """Return the CPU seconds so far of each role."""
        readings = {}
        for role, process in self.processes.items():
            times = process.cpu_times()
            readings[role] = times.user + times.system
        return readings


class CannotSplitCores(RuntimeError):
    """The services cannot have a core of their own here (fewer than two CPUs, or not Linux)."""


def _pin_threads(pid: int, cpus: set[int]) -> None:
    """Let every thread of process ``pid`` run only on ``cpus`` (a thread that has just ended is skipped)."""
    for thread in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(thread), cpus)
        except ProcessLookupError:
            continue


@contextmanager
def cores_apart(service_pids: Iterable[int]) -> Iterator[tuple[set[int], set[int]]]:
    """Give the services a core of their own for the duration: as if they ran on another machine.

    Every thread of the services' processes and of their children runs on this process's last
    CPU; every thread of this process (and so every thread and child it starts later) runs on the
    others. This process's threads may use all its CPUs again afterwards; the services are left
    pinned (they are stopped after a benchmark condition).

    :param service_pids: the services' process ids.
    :return: ``(services' CPUs, this process's CPUs)``.
    :raises CannotSplitCores: this process may run on fewer than two CPUs, or the system has no
        per-thread CPU affinity (not Linux).
    """
    if not hasattr(os, "sched_getaffinity") or not Path("/proc/self/task").is_dir():
        raise CannotSplitCores(
            "the services need a core of their own, which takes Linux's per-thread CPU affinity"
        )
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise CannotSplitCores(f"the services need a core of their own, and this process may use {len(cpus)}")
    service_cpus, own_cpus = {cpus[-1]}, set(cpus[:-1])
    processes = [psutil.Process(pid) for pid in service_pids]
    children = [child for parent in processes for child in parent.children(recursive=True)]
    for process in [*processes, *children]:
        _pin_threads(process.pid, service_cpus)
    _pin_threads(os.getpid(), own_cpus)
    try:
        yield service_cpus, own_cpus
    finally:
        _pin_threads(os.getpid(), set(cpus))


@dataclass
class Sample:
    """One timed run of one method over one dataset.

    :param method: ``naive``, ``ceiling``, ``plugin``, ``dag`` or ``dag-empty``.
    :param seconds: wall time of the uploads (for ``dag``: the whole ``airflow dags test``).
    :param instances: instances sent.
    :param bytes: bytes sent.
    :param uploader_cpu: CPU seconds of the uploading process (and its children).
    :param service_cpu: CPU seconds of the sandbox's API and store while they received the run.
    :param proxy_cpu: CPU seconds of the latency proxies (0 on loopback).
    :param workers: parallel uploads used.
    :param retry_reasons: why each upload a raw client had to send twice was re-sent (a 5xx
        answer or a dropped connection, never a URL).
    """

    method: str
    seconds: float
    instances: int
    bytes: int
    uploader_cpu: float
    service_cpu: float
    proxy_cpu: float = 0.0
    workers: int = 1
    retry_reasons: tuple[str, ...] = ()

    @property
    def retries(self) -> int:
        """Return how many uploads a raw client sent twice."""
        return len(self.retry_reasons)

    @property
    def instances_per_second(self) -> float:
        """Return instances sent per wall second."""
        return self.instances / self.seconds if self.seconds > 0 else float("nan")

    @property
    def mb_per_second(self) -> float:
        """Return megabytes (10^6 bytes) sent per wall second."""
        return self.bytes / BYTES_PER_MB / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class ServiceWindow:
    """Measure the sandbox's CPU over a window that ends once it has taken in what was sent.

    :param services: the sandbox's processes.
    """

    services: ServiceCpu
    started: dict[str, float] = field(default_factory=dict)

    def __enter__(self) -> ServiceWindow:
        self.started = self.services.read()
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Nothing to release; :meth:`used` reads the end of the window."""

    def used(self) -> tuple[float, float]:
        """Return ``(API + store, proxies)`` CPU seconds since the window opened."""
        now = self.services.read()
        spent = {role: now[role] - self.started.get(role, 0.0) for role in now}
        return spent.get("api", 0.0) + spent.get("store", 0.0), spent.get("proxy", 0.0)


@dataclass(frozen=True)
class Timing:
    """What :func:`timed_in_process` measured.

    :param result: what the work returned.
    :param seconds: its wall time.
    :param uploader_cpu: this process's CPU seconds during the work.
    :param service_cpu: the sandbox's API and store CPU seconds until it had taken everything in.
    :param proxy_cpu: the latency proxies' CPU seconds over the same window.
    """

    result: Any
    seconds: float
    uploader_cpu: float
    service_cpu: float
    proxy_cpu: float


def timed_in_process(work: Callable[[], Any], settle: Callable[[], None], services: ServiceCpu) -> Timing:
    """Run ``work`` in this process and measure it.

    :param work: the uploads.
    :param settle: waits (untimed) until the sandbox has taken in everything ``work`` sent.
    :param services: the sandbox's processes.
    """
    with ServiceWindow(services) as window:
        cpu_before = own_cpu_seconds()
        started = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - started
        uploader_cpu = own_cpu_seconds() - cpu_before
        settle()
        service_cpu, proxy_cpu = window.used()
    return Timing(result, seconds, uploader_cpu, service_cpu, proxy_cpu)


@dataclass(frozen=True)
class Column:
    """One column of a printed table."""

    title: str
    align: str = ">"


def markdown_table(columns: Sequence[Column], rows: Iterable[Sequence[str]]) -> str:
    """Render rows as a GitHub-flavoured Markdown table whose columns line up in plain text too.

    :param columns: titles and alignment.
    :param rows: cell texts, one sequence per row.
    """
    materialised = [list(row) for row in rows]
    widths = [
        max([len(column.title), *(len(row[index]) for row in materialised)])
        for index, column in enumerate(columns)
    ]

    def line(cells: Sequence[str]) -> str:
        padded = [
            f"{cell:{column.align}{width}}"
            for cell, column, width in zip(cells, columns, widths, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = [
        ("-" * (width - 1) + ":") if column.align == ">" else "-" * width
        for column, width in zip(columns, widths, strict=True)
    ]
    return "\n".join([line([column.title for column in columns]), line(rule), *map(line, materialised)])


def number(value: float, digits: int = 1) -> str:
    """Format a figure for a table; NaN (not measured) becomes an em dash.

    :param value: the figure.
    :param digits: decimals shown.
    """
    if value != value:  # NaN
        return "—"
    return f"{value:,.{digits}f}"


def machine_description() -> str:
    """Describe the machine: CPU model, cores, memory, load average."""
    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(
                (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), ""
            )
    except OSError:
        model = ""
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    memory = psutil.virtual_memory().total / 2**30
    return f"{os.cpu_count()} cores ({model or 'unknown CPU'}), {memory:.1f} GiB memory, load average {load}"
