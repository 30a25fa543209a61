"""Session-wide test setup.

Airflow reads its configuration when it is first imported, so the environment
is pointed at a throw-away AIRFLOW_HOME here, before any test module imports it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

_airflow_home = Path(tempfile.mkdtemp(prefix="dicom-ingest-airflow-"))
atexit.register(shutil.rmtree, _airflow_home, ignore_errors=True)
os.environ["AIRFLOW_HOME"] = str(_airflow_home)
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "True"
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO_ROOT / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(REPO_ROOT / "plugins")
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_airflow_home / 'airflow.db'}"


# --- The vendor sandbox, shared by every test folder ------------------------------------------

# Imported here, after the environment block, which must stay first.
from collections.abc import Iterator  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import pytest  # noqa: E402

if TYPE_CHECKING:
    from dicom_ingest_sandbox.testing import Sandbox

#: Fast clocks for the session's sandbox; tests that change them restore them.
SANDBOX_TEST_CLOCKS = {
    "quiet_period": 1,
    "processing_time": 0.5,
    "metadata_deadline": 8,
    "overwrite_window": 5,
    "url_ttl": 900,
    "token_ttl": 3600,
    "required_metadata": "patient_age,patient_sex",
}


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    """Run one sandbox process (HTTP API + object store) for the whole test session.

    Its data dir is a private temporary folder rather than pytest's numbered ``tmp_path`` folders,
    which a concurrent pytest run may prune while this session still uses them.
    """
    from dicom_ingest_sandbox.testing import running_sandbox

    with (
        tempfile.TemporaryDirectory(prefix="dicom-ingest-sandbox-") as data_dir,
        running_sandbox(Path(data_dir), **SANDBOX_TEST_CLOCKS) as running,
    ):
        yield running


@pytest.fixture
def fresh_sandbox_state(sandbox: Sandbox) -> Sandbox:
    """Give a test the session's sandbox with no orders, objects, audit events, calls or faults."""
    sandbox.configure(**SANDBOX_TEST_CLOCKS)
    sandbox.reset()
    return sandbox
