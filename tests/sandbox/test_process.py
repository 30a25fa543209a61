"""The sandbox as a process: default start-up, clean stop on signals (no orphan store), the walk-through."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import requests

from dicom_ingest_sandbox.testing import READY_PREFIX, start_sandbox
from tests.sandbox.support import TIMEOUT

pytestmark = pytest.mark.sandbox

STOP_TIMEOUT = 20


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def console_script() -> str:
    beside_python = Path(sys.executable).with_name("dicom-ingest-sandbox")
    return str(beside_python) if beside_python.exists() else shutil.which("dicom-ingest-sandbox") or ""


def store_process(base_url: str, admin_token: str) -> psutil.Process:
    state = requests.get(
        f"{base_url}/_sandbox/state", headers={"X-Admin-Token": admin_token}, timeout=TIMEOUT
    )
    return psutil.Process(state.json()["store"]["pid"])


def read_until_ready(process: subprocess.Popen[str]) -> list[str]:
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith(READY_PREFIX):
            return lines
    pytest.fail("the sandbox exited before it was ready:\n" + "\n".join(lines))


def test_default_start_prints_demo_credentials_and_the_ready_line(tmp_path: Path) -> None:
    script = console_script()
    assert script, "the dicom-ingest-sandbox console script is not installed"
    port = free_port()
    process = subprocess.Popen(
        [script, "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        lines = read_until_ready(process)
        output = "\n".join(lines)
        assert lines[-1] == f"{READY_PREFIX} http://127.0.0.1:{port}"
        for credential in ("demo-client", "demo-secret", "demo-admin"):
            assert credential in output
        token = requests.get(
            f"http://127.0.0.1:{port}/oauth2/token",
            params={"grant_type": "client_credentials"},
            auth=("demo-client", "demo-secret"),
            timeout=TIMEOUT,
        )
        assert token.status_code == 200
        assert (tmp_path / ".sandbox-data" / "audit.jsonl").is_file()
        assert (tmp_path / ".sandbox-data" / "store" / "ingest").is_dir()
        store = store_process(f"http://127.0.0.1:{port}", "demo-admin")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=STOP_TIMEOUT)
    assert process.returncode == 0
    assert not store.is_running()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_stops_the_store_too(tmp_path: Path, stop_signal: signal.Signals) -> None:
    sandbox = start_sandbox(tmp_path)
    try:
        store = store_process(sandbox.base_url, sandbox.admin_token)
        assert "rclone" in store.name()
        assert store.ppid() == sandbox.pid
        command_lines = " ".join(psutil.Process(sandbox.pid).cmdline() + store.cmdline())
        assert sandbox.client_secret not in command_lines
        assert sandbox.admin_token not in command_lines
        sandbox.process.send_signal(stop_signal)
        sandbox.process.wait(timeout=STOP_TIMEOUT)
    finally:
        sandbox.stop()
    assert sandbox.process.returncode == 0
    assert not store.is_running()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{sandbox.base_url}/_sandbox/health", timeout=TIMEOUT)


@pytest.mark.skipif(
    sys.platform != "linux", reason="the store is tied to the sandbox's life through Linux prctl"
)
def test_the_store_dies_with_a_killed_sandbox(tmp_path: Path) -> None:
    sandbox = start_sandbox(tmp_path)
    try:
        store = store_process(sandbox.base_url, sandbox.admin_token)
        sandbox.process.kill()
        sandbox.process.wait(timeout=STOP_TIMEOUT)
        store.wait(timeout=STOP_TIMEOUT)
    finally:
        sandbox.stop()
    assert not store.is_running()


def test_a_busy_port_fails_fast_without_starting_the_store(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "dicom_ingest_sandbox.cli",
                "--port",
                str(port),
                "--data-dir",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert READY_PREFIX not in result.stdout
    assert not (tmp_path / "store.log").exists()


def test_the_walkthrough_delivers_both_studies_prints_no_secret_and_leaves_nothing_running() -> None:
    before = {process.pid for process in psutil.process_iter()}
    result = subprocess.run(
        [sys.executable, "-m", "dicom_ingest_sandbox.walkthrough"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(": DELIVERED") == 2
    assert "PATCH fields patient_age" in result.stdout
    assert "All orders DELIVERED" in result.stdout
    for secret_marker in ("X-Amz-Signature", "X-Amz-Credential", "eyJ"):
        assert secret_marker not in result.stdout + result.stderr
    leftovers = [
        process
        for process in psutil.process_iter(["pid", "name", "cmdline"])
        if process.pid not in before
        and "dicom-ingest-walkthrough-" in " ".join(process.info["cmdline"] or [])
    ]
    assert leftovers == []
