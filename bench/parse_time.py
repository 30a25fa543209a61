"""DAG-file parse time of ``dags/dicom_ingest_sites.py`` with 1, 10, 100... sites in ``sites.yaml``.

Each measurement runs in a fresh interpreter that has already imported Airflow (as the DAG
processor has), so the figure is what parsing the file costs: importing the product's DAG
factory, reading and validating the sites file, and building one DAG per site. The second
parse in the same interpreter (``warm``) shows the file's own work once the imports are done.

Run as ``python -m bench.parse_time SITES_FILE`` by :func:`measure_parse_time`; it prints JSON.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from bench.harness import DAG_FILE, REPO_ROOT, run_json_child

CHILD_TIMEOUT_SECONDS = 300.0


def site_entries(count: int) -> list[dict[str, Any]]:
    """Return ``count`` realistic, distinct site entries (S3 staging, manifests, quarantine).

    :param count: how many sites.
    """
    return [
        {
            "id": f"hospital_{number:04d}",
            "enabled": True,
            "schedule": f"{number % 60} {number % 24} * * *",
            "timezone": "Europe/Paris",
            "start_date": "2025-01-01",
            "catchup": False,
            "staging": f"s3://aws_hospital@hospital-{number:04d}-staging/outgoing/{{{{ ds }}}}/",
            "conn_id": "dicom_ingest_default",
            "required_metadata": ["patient_age", "patient_sex"],
            "metadata": {
                "sidecar": "metadata.json",
                "manifest": f"s3://aws_hospital@hospital-{number:04d}-staging/manifests/{{{{ ds }}}}.csv",
            },
            "upload_concurrency": 8,
            "quarantine": {
                "policy": "copy",
                "location": f"s3://aws_hospital@hospital-{number:04d}-quarantine/{{{{ ds }}}}/",
            },
            "batch": {"max_instances": 5000, "max_bytes": "20GiB"},
            "max_active_batches": 2,
            "retries": 2,
            "tags": [f"region_{number % 7}"],
        }
        for number in range(count)
    ]


def write_sites_file(path: Path, count: int) -> Path:
    """Write a sites file of ``count`` sites.

    :param path: the file to write.
    :param count: how many sites.
    """
    path.write_text(yaml.safe_dump({"sites": site_entries(count)}, sort_keys=False))
    return path


def measure_parse_time(sites_file: Path, airflow_home: Path) -> dict[str, float]:
    """Parse the DAG file with ``sites_file`` in a fresh interpreter; return cold and warm seconds.

    :param sites_file: the sites file to parse the DAG file with.
    :param airflow_home: an ``AIRFLOW_HOME`` for the interpreter (no database is used).
    """
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("AIRFLOW_", "DICOM_INGEST_"))
    }
    environment.update(
        {
            "AIRFLOW_HOME": str(airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAG_FILE.parent),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "DICOM_INGEST_SITES_FILE": str(sites_file),
        }
    )
    return run_json_child(
        "bench.parse_time", [str(sites_file)], environment, timeout=CHILD_TIMEOUT_SECONDS, what="parsing"
    )


def _parse_once(dag_bag_class: Any) -> tuple[float, int, int]:
    """Parse the DAG file once; return seconds, DAGs found and import errors."""
    started = time.perf_counter()
    bag = dag_bag_class(dag_folder=str(DAG_FILE))
    seconds = time.perf_counter() - started
    return seconds, len(bag.dags), len(bag.import_errors)


def main() -> None:
    """Import Airflow, then parse the DAG file twice and print the timings as JSON."""
    import airflow.sdk  # noqa: F401  (the DAG processor has Airflow imported before it parses)
    from airflow.dag_processing.dagbag import DagBag

    cold, dags, errors = _parse_once(DagBag)
    warm, _, _ = _parse_once(DagBag)
    print(json.dumps({"cold": cold, "warm": warm, "dags": dags, "import_errors": errors}))


if __name__ == "__main__":
    main()
