"""Run one upload method once over a generated dataset, for a profiler to watch.

::

    uvx py-spy record --subprocesses -o plugin.svg -- python -m bench.profile_upload plugin 2000x512KiB/20
    python -m bench.profile_upload plugin 2000x512KiB/20 --cprofile plugin.pstats

The dataset is generated in a temporary folder and a sandbox started for the run (with
``--latency-ms`` for the WAN condition); both are gone afterwards. With ``--cprofile`` the
upload alone (not the set-up) is profiled with the standard library's profiler, and the top
functions by cumulative and by own time are printed.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

from bench.datasets import write_dataset
from bench.harness import own_cpu_seconds
from bench.run import parse_dataset
from dicom_ingest_sandbox.latency import LATENCY_MODELS

METHODS = ("plugin", "ceiling", "ceiling+md5", "naive")
TOP_FUNCTIONS = 30
IDLE_FIELD = 3
"""Position of the idle ticks on the ``cpu`` line of ``/proc/stat``."""


def _machine_ticks() -> tuple[int, int]:
    """Return the whole machine's idle and total CPU ticks so far (``/proc/stat``)."""
    with open("/proc/stat") as stat:
        ticks = [int(value) for value in stat.readline().split()[1:]]
    return ticks[IDLE_FIELD], sum(ticks)


def _context_switches() -> int:
    """Return the context switches of this process so far, all threads, voluntary or not."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_nvcsw + usage.ru_nivcsw


def main(argv: Sequence[str] | None = None) -> int:
    """Generate the dataset, start a sandbox, run the method once (profiled when asked)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=METHODS)
    parser.add_argument("dataset", type=parse_dataset, help="INSTANCESxSIZE/STUDIES")
    parser.add_argument(
        "--workers", type=int, default=8, help="threads (ceiling) or upload_concurrency (plugin)"
    )
    parser.add_argument("--latency-ms", type=float, default=0.0, help="round trip added by the sandbox")
    parser.add_argument(
        "--latency-model", choices=LATENCY_MODELS, default="tcp", help="the sandbox's --latency-model"
    )
    parser.add_argument("--cprofile", type=Path, help="profile the upload with cProfile into this file")
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a dicom_ingest connection extra for the plugin, e.g. presign_ahead=false (repeatable)",
    )
    arguments = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="dicom-ingest-profile-") as folder:
        scratch = Path(folder)
        os.environ["AIRFLOW_HOME"] = str(scratch / "airflow-home")
        from bench import product
        from bench.clients import VendorApi, naive_upload, pooled_upload
        from dicom_ingest_sandbox.testing import running_sandbox

        dataset = write_dataset(arguments.dataset, scratch / "staging", namespace=1)
        sandbox_flags = (
            {"latency_ms": arguments.latency_ms, "latency_model": arguments.latency_model}
            if arguments.latency_ms
            else {}
        )
        with ExitStack() as stack:
            sandbox = stack.enter_context(
                running_sandbox(scratch / "sandbox", quiet_period=5, processing_time=1, **sandbox_flags)
            )
            stack.enter_context(product.quiet_task_logs())
            api = VendorApi(sandbox.base_url, sandbox.client_id, sandbox.client_secret)
            upload: Callable[[], object]
            if arguments.method == "plugin":
                site = product.operator_arguments(
                    product.site_entry(
                        str(dataset.root),
                        upload_concurrency=arguments.workers,
                        ledger_path=str(scratch / "ledger.sqlite"),
                        work_location=str(scratch / "work"),
                        reports_location=str(scratch / "reports"),
                    )
                )
                extra = dict(item.split("=", 1) for item in arguments.extra)
                stack.enter_context(product.vendor_connection(api, extra))
                plan = product.plan_run(site, "profile")

                def upload() -> object:
                    return product.upload_batches(site, plan, "profile")

            elif arguments.method in {"ceiling", "ceiling+md5"}:
                verify = arguments.method == "ceiling+md5"

                def upload() -> object:
                    return pooled_upload(api, dataset.files, arguments.workers, verify=verify)

            else:

                def upload() -> object:
                    return naive_upload(api, dataset.files)

            profiler = cProfile.Profile() if arguments.cprofile else None
            cpu_before, switches_before = own_cpu_seconds(), _context_switches()
            idle_before, ticks_before = _machine_ticks()
            started = time.perf_counter()
            if profiler is not None:
                profiler.runcall(upload)
            else:
                upload()
            seconds = time.perf_counter() - started
            cpu, switches = own_cpu_seconds() - cpu_before, _context_switches() - switches_before
            idle_after, ticks_after = _machine_ticks()
            instances = arguments.dataset.instances
            print(
                f"{arguments.method}: {instances / seconds:.1f} instances/s ({seconds:.2f} s), "
                f"uploader CPU {cpu:.2f} s ({cpu / instances * 1000:.2f} ms per instance), "
                f"{switches / instances:.0f} context switches per instance, "
                f"machine idle {(idle_after - idle_before) / max(1, ticks_after - ticks_before):.1%}"
            )
    if profiler is not None and arguments.cprofile is not None:
        profiler.dump_stats(arguments.cprofile)
        stats = pstats.Stats(str(arguments.cprofile), stream=sys.stdout)
        stats.sort_stats("cumulative").print_stats(TOP_FUNCTIONS)
        stats.sort_stats("tottime").print_stats(TOP_FUNCTIONS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
