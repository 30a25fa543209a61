"""One Celery topology (:class:`scripts.stack.Stack`) shared by the tests of this folder.

The stack runs this repository's ``dags/`` with a sites file holding the shipped demo site
(``include/sites.yaml``) with faster clocks: short retry delays and sensor polls, a small upload
pool and small batches, so that one run spreads over several mapped batches on two cores. Each
test stages its own days of sample data under the stack's demo root.

Outside CI the tests skip when PostgreSQL or Redis is not reachable; under ``CI=true`` they fail.
When a test fails, the tail of every process's log is added to its report.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from scripts.stack import REPO_ROOT, Stack
from tests.services import require_postgres, require_redis

DEMO_SITE_ID = "demo"
DEMO_DAG_ID = f"dicom_ingest__{DEMO_SITE_ID}"
SHIPPED_SITES_FILE = REPO_ROOT / "include" / "sites.yaml"

SANDBOX_CLOCKS: dict[str, Any] = {
    "quiet_period": 2,
    "processing_time": 2,
    "metadata_deadline": 120,
    "overwrite_window": 300,
}
"""Vendor clocks of the stack's sandbox: orders finish a few seconds after their last instance."""

DEMO_SITE_OVERRIDES: dict[str, Any] = {
    "upload_concurrency": 2,
    "batch": {"max_instances": 10},
    "max_active_batches": 2,
    "retries": 3,
    "retry_delay_seconds": 2,
    "sensor": {"poke_interval": 1, "timeout": 300},
}
"""What the tests change in the shipped demo site: timings and sizes only."""

HEARTBEAT_TIMEOUT_SECONDS = 20.0
"""How long the scheduler waits before failing the task instance of a killed worker."""


def demo_site_entry() -> dict[str, Any]:
    """Return the shipped demo site's entry with :data:`DEMO_SITE_OVERRIDES` applied."""
    shipped = yaml.safe_load(SHIPPED_SITES_FILE.read_text())
    entry = next(site for site in shipped["sites"] if site["id"] == DEMO_SITE_ID)
    return {**entry, **DEMO_SITE_OVERRIDES}


@pytest.fixture(scope="module")
def stack_files() -> Iterator[Path]:
    """Hold the stack's sites file and demo root in a private folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="dicom-ingest-distributed-") as folder:
        yield Path(folder)


@pytest.fixture(scope="module")
def stack(stack_files: Path) -> Iterator[Stack]:
    """Run the distributed topology with the demo site's DAG parsed and unpaused."""
    require_postgres()
    require_redis()
    sites_file = stack_files / "sites.yaml"
    sites_file.write_text(yaml.safe_dump({"sites": [demo_site_entry()]}, sort_keys=False))
    with Stack(
        sites_file=sites_file,
        demo_root=stack_files / "demo",
        sandbox_clocks=SANDBOX_CLOCKS,
        workers=1,
        worker_concurrency=2,
        heartbeat_timeout=HEARTBEAT_TIMEOUT_SECONDS,
    ) as running:
        running.wait_for_dag(DEMO_DAG_ID)
        yield running


@pytest.fixture
def demo_root(stack: Stack) -> Path:
    """Return the demo site's staging root (``$DICOM_INGEST_DEMO_ROOT``) of the stack."""
    assert stack.demo_root is not None
    return stack.demo_root


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Add the tail of every stack process's log to the report of a failed test."""
    report = yield
    stack = getattr(item, "funcargs", {}).get("stack")
    if report.failed and isinstance(stack, Stack) and stack.base_dir is not None:
        report.sections.append(("stack process logs", stack.log_tails()))
    return report
