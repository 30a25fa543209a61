"""Peak memory of the product's upload path while it sends one very large instance.

A child interpreter plans a staging area holding one sparse instance (2 GiB by default), then
resets its peak resident set size (Linux ``/proc/self/clear_refs``), uploads the instance
through the upload task's engine, and reports how far the peak rose above the resident size it
had just before: the memory the upload itself needed. Run by :func:`measure_upload_memory`;
as a program (``python -m bench.memory STAGING WORK``) it prints JSON.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from bench.harness import run_json_child

_STATUS_FIELD = re.compile(r"^(VmRSS|VmHWM):\s+(\d+) kB$", re.MULTILINE)
CHILD_TIMEOUT_SECONDS = 1800.0
_RESET_PEAK = "5"
"""Written to ``/proc/self/clear_refs``: sets the peak resident size (VmHWM) to the current one."""


def _memory_kib() -> dict[str, int]:
    """Return this process's current (``VmRSS``) and peak (``VmHWM``) resident size in KiB."""
    status = Path("/proc/self/status").read_text()
    return {name: int(value) for name, value in _STATUS_FIELD.findall(status)}


def measure_upload_memory(staging: Path, work: Path, environment: Mapping[str, str]) -> dict[str, float]:
    """Upload the staging area's instance in a child interpreter; return its memory figures.

    :param staging: a staging area with the large instance.
    :param work: a folder for the plan, ledger and Airflow home of the child.
    :param environment: the child's environment (with the vendor connection).
    :return: ``baseline_mib``, ``peak_mib``, ``growth_mib``, ``seconds``, ``bytes`` and ``uploaded``.
    """
    return run_json_child(
        "bench.memory",
        [str(staging), str(work)],
        environment,
        timeout=CHILD_TIMEOUT_SECONDS,
        what="the large upload",
    )


def main() -> None:
    """Plan, reset the peak, upload, and print the memory figures as JSON."""
    staging, work = Path(sys.argv[1]), Path(sys.argv[2])
    os.environ["AIRFLOW_HOME"] = str(work / "airflow-home")
    from bench import product

    site = product.operator_arguments(
        product.site_entry(
            str(staging),
            upload_concurrency=8,
            ledger_path=str(work / "ledger.sqlite"),
            work_location=str(work / "work"),
            reports_location=str(work / "reports"),
        )
    )
    with product.quiet_task_logs():
        plan = product.plan_run(site, "memory")
        Path("/proc/self/clear_refs").write_text(_RESET_PEAK)
        baseline = _memory_kib()["VmRSS"]
        started = time.perf_counter()
        results = product.upload_batches(site, plan, "memory")
        seconds = time.perf_counter() - started
        peak = _memory_kib()["VmHWM"]
    print(
        json.dumps(
            {
                "baseline_mib": baseline / 1024,
                "peak_mib": peak / 1024,
                "growth_mib": (peak - baseline) / 1024,
                "seconds": seconds,
                "bytes": sum(result["bytes"] for result in results),
                "uploaded": sum(result["uploaded"] for result in results),
            }
        )
    )


if __name__ == "__main__":
    main()
