"""bench.harness.cores_apart: the services get a core of their own, the benchmark the others."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import psutil
import pytest

from bench.harness import CannotSplitCores, cores_apart

SERVICE_SCRIPT = """
import subprocess, sys, threading, time
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""
"""A stand-in service: a process with a second thread and a child process; prints the child's pid."""


def thread_affinities(pid: int) -> dict[int, set[int]]:
    return {int(thread): os.sched_getaffinity(int(thread)) for thread in os.listdir(f"/proc/{pid}/task")}


@pytest.fixture
def service() -> Iterator[tuple[int, int]]:
    process = subprocess.Popen([sys.executable, "-c", SERVICE_SCRIPT], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    child = int(process.stdout.readline())
    try:
        yield process.pid, child
    finally:
        psutil.Process(child).kill()
        process.kill()
        process.wait()


@pytest.fixture
def all_cpus() -> Iterator[set[int]]:
    cpus = os.sched_getaffinity(0)
    try:
        yield cpus
    finally:
        os.sched_setaffinity(0, cpus)


def test_the_services_threads_and_children_get_the_last_cpu_and_this_process_the_others(
    service: tuple[int, int], all_cpus: set[int]
) -> None:
    if len(all_cpus) < 2:
        pytest.skip(f"needs two CPUs; this process may use {len(all_cpus)}")
    service_pid, child_pid = service
    last = max(all_cpus)
    started_inside: list[set[int]] = []

    with cores_apart([service_pid]) as (service_cpus, own_cpus):
        assert service_cpus == {last}
        assert own_cpus == all_cpus - {last}
        service_threads = thread_affinities(service_pid)
        assert len(service_threads) >= 2
        assert all(cpus == {last} for cpus in service_threads.values())
        assert all(cpus == {last} for cpus in thread_affinities(child_pid).values())
        assert all(cpus == own_cpus for cpus in thread_affinities(os.getpid()).values())
        thread = threading.Thread(target=lambda: started_inside.append(os.sched_getaffinity(0)))
        thread.start()
        thread.join()

    assert started_inside == [all_cpus - {last}]
    assert all(cpus == all_cpus for cpus in thread_affinities(os.getpid()).values())


def test_one_cpu_is_refused_before_anything_is_pinned(service: tuple[int, int], all_cpus: set[int]) -> None:
    service_pid, _ = service
    before = thread_affinities(service_pid)
    os.sched_setaffinity(0, {min(all_cpus)})

    with pytest.raises(CannotSplitCores, match="may use 1"), cores_apart([service_pid]):
        pass

    assert thread_affinities(service_pid) == before
