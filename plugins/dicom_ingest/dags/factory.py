"""Build one Airflow DAG per enabled site of ``sites.yaml``.

Each DAG, ``dicom_ingest__<site id>``, has this shape::

    plan  ->  batches  ->  ingest_batch (mapped task group, one per batch)  ->  report
                              upload  ->  wait_for_orders

``plan`` scans the run's staging area, writes the plan and records it in the ledger;
``batches`` turns the plan's XCom into the arguments of the mapped group (nothing to map in a
dry run or when nothing is left to send); each ``ingest_batch`` instance uploads one batch of
whole studies, then waits (deferred) for the vendor's verdict on its orders; ``report`` runs
whatever happened upstream, writes the run's report and fails the run when anything in it
failed. It is the DAG's only leaf, so the run's state is its state.

Everything here is pure: building a DAG reads the sites file and nothing else (no network, no
database, no Airflow Variable), and imports no hook, staging, ledger or DICOM code, which the
tasks import when they run.

A bad entry of the sites file must not take the other sites down, and must still show in the
UI's list of DAG import errors. Airflow 3.3 offers no way to do both from one file: an
exception while a file is imported discards every DAG the file defined; a DAG that fails only
its own validation leaves the others in the bag, but the file's import error then marks every
DAG of that file stale (``DagModel.is_stale``: no longer scheduled); and warnings raised while
parsing are not stored for the UI (the ``DagWarning`` rows come from Airflow's own checks, such
as a non-existent pool). So the site DAG file builds the valid sites only (:func:`build_dags`),
and a second DAG file, which defines no DAG, raises one import error listing every rejected
entry by file, line, site and field (:func:`check_sites`). Fixing the entry clears the error at
the next parse, and the site's DAG appears.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, CronDataIntervalTimetable, Param, TriggerRule, task, task_group

from dicom_ingest.exceptions import DicomIngestConfigError
from dicom_ingest.operators.plan import DicomPlanOperator
from dicom_ingest.operators.report import DicomIngestReportOperator
from dicom_ingest.operators.upload import DicomUploadBatchOperator
from dicom_ingest.sensors.orders import DicomOrderSensor
from dicom_ingest.sites import SiteConfig, describe_site, load_sites, sites_file_path
from dicom_ingest.sites.config import AIRFLOW_CRON_PRESETS

DAG_TAG = "dicom_ingest"
PLAN_TASK_ID = "plan"
BATCHES_TASK_ID = "batches"
GROUP_ID = "ingest_batch"
UPLOAD_TASK_ID = "upload"
WAIT_TASK_ID = "wait_for_orders"
REPORT_TASK_ID = "report"

BATCH_LABEL_TEMPLATE = "{{ batch_label }}"
"""The mapped upload task's label, e.g. ``batch 3: 12 studies, 4,211 instances`` (set by the task)."""
WAIT_LABEL_TEMPLATE = "{{ batch_label | default(task.batch_id) }}"
"""The order sensor's label: the upload's form when the sensor sets it, else the batch id.

A deferred sensor resumes in a fresh context, so the label must not depend on it being set."""

DRY_RUN_TEMPLATE = "{{ params.dry_run }}"
STAGING_OVERRIDE_TEMPLATE = "{{ params.staging_override or '' }}"

INCLUDE_FOLDER = "include"
SITES_FILE_NAME = "sites.yaml"


class InvalidSitesError(DicomIngestConfigError):
    """Entries of the sites file were rejected; the message names each one's file, line, site and field."""


def sites_file_for(dag_file: str | os.PathLike[str]) -> Path:
    """Return the sites file of a DAG file: ``$DICOM_INGEST_SITES_FILE``, else the project's own.

    The project's own is ``include/sites.yaml`` beside the folder holding the DAG file, which is
    where the Airflow image and a checkout of this repository keep it.

    :param dag_file: the DAG file's path (its ``__file__``).
    """
    project = Path(dag_file).absolute().parent.parent
    return sites_file_path(default=project / INCLUDE_FOLDER / SITES_FILE_NAME)


def build_dags(sites_file: str | os.PathLike[str] | None = None) -> dict[str, DAG]:
    """Build the DAG of every valid, enabled site, by DAG id; rejected entries are left out.

    :param sites_file: the sites file; :func:`~dicom_ingest.sites.sites_file_path` decides when omitted.
    :raises SitesFileError: the file as a whole cannot be used (missing, not YAML, wrong shape).
    """
    loaded = load_sites(sites_file)
    return {site.dag_id: build_site_dag(site) for site in loaded.enabled_sites}


def check_sites(sites_file: str | os.PathLike[str] | None = None) -> None:
    """Raise one error listing every rejected entry of the sites file, if there is any.

    A file that cannot be used at all is left to :func:`build_dags` to report, so the same
    problem is not reported twice.

    :param sites_file: the sites file; :func:`~dicom_ingest.sites.sites_file_path` decides when omitted.
    :raises InvalidSitesError: naming, for each problem, the file, line, site and field.
    """
    from dicom_ingest.sites import SitesFileError

    try:
        loaded = load_sites(sites_file)
    except SitesFileError:
        return
    if loaded.errors:
        sites = ", ".join(error.label for error in loaded.errors)
        raise InvalidSitesError(
            f"{len(loaded.errors)} entries of {loaded.path} were rejected and have no DAG ({sites}); "
            f"the other sites are not affected:\n{loaded.error_report()}"
        )


def build_site_dag(site: SiteConfig) -> DAG:
    """Build the DAG of one site.

    :param site: the site's validated configuration.
    """
    site_args = site.model_dump(mode="json")
    with DAG(
        dag_id=site.dag_id,
        schedule=_timetable(site),
        start_date=_start_date(site),
        catchup=site.catchup,
        max_active_runs=1,
        doc_md=describe_site(site),
        tags=_tags(site),
        default_args={
            "owner": site.owner,
            "retries": site.retries,
            "retry_delay": timedelta(seconds=site.retry_delay_seconds),
            "pool": site.pool,
        },
        params={
            "dry_run": Param(
                False,
                type="boolean",
                title="Dry run",
                description="Plan the run and write its report, but upload nothing.",
            ),
            "staging_override": Param(
                None,
                type=["null", "string"],
                title="Staging location",
                description=(
                    "Scan this location instead of the site's staging area for this run "
                    "(a local path, file:// or s3://[conn_id@]bucket/prefix)."
                ),
            ),
        },
    ) as dag:
        plan = DicomPlanOperator(
            task_id=PLAN_TASK_ID,
            site=site_args,
            staging_override=STAGING_OVERRIDE_TEMPLATE,
            dry_run=DRY_RUN_TEMPLATE,
        )
        ingest = _ingest_batch_group(site, site_args).expand_kwargs(batch_arguments(plan.output))
        report = DicomIngestReportOperator(
            task_id=REPORT_TASK_ID,
            site=site_args,
            dry_run=DRY_RUN_TEMPLATE,
            trigger_rule=TriggerRule.ALL_DONE,
            retries=0,
        )
        ingest >> report
    return dag


@task(task_id=BATCHES_TASK_ID, retries=0)
def batch_arguments(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Turn the plan task's XCom into one set of ``ingest_batch`` arguments per batch.

    The plan's XCom is a dict, and Airflow maps over lists only (``plan.output["batches"]``
    would name another XCom key, not the dict's item), hence this small step.

    :param plan: the plan task's return value.
    """
    return [{"batch": batch, "work_uri": plan["work_uri"]} for batch in plan["batches"]]


def _ingest_batch_group(site: SiteConfig, site_args: dict[str, Any]) -> Any:
    """Return the task group that uploads one batch and waits for its orders (to be expanded).

    :param site: the site's validated configuration.
    :param site_args: the same, as the operators take it.
    """

    @task_group(group_id=GROUP_ID)
    def ingest_batch(batch: dict[str, Any], work_uri: str) -> None:
        upload = DicomUploadBatchOperator(
            task_id=UPLOAD_TASK_ID,
            site=site_args,
            work_uri=work_uri,
            batch=batch,
            map_index_template=BATCH_LABEL_TEMPLATE,
            max_active_tis_per_dagrun=site.max_active_batches,
        )
        wait = DicomOrderSensor(
            task_id=WAIT_TASK_ID,
            site=site_args,
            batch_id=_batch_id_of(upload.task_id),
            map_index_template=WAIT_LABEL_TEMPLATE,
        )
        upload >> wait

    return ingest_batch


def _batch_id_of(upload_task_id: str) -> str:
    """Template the batch id out of this group instance's upload XCom.

    ``map_indexes=ti.map_index`` pulls the upload of the same group instance; without it, a run
    with one batch gets that upload's dict while a run with several gets the list of all of them.

    :param upload_task_id: the upload task's full id (``ingest_batch.upload``).
    """
    return f"{{{{ ti.xcom_pull(task_ids='{upload_task_id}', map_indexes=ti.map_index)['batch_id'] }}}}"


def _timetable(site: SiteConfig) -> CronDataIntervalTimetable:
    """Return the site's schedule in its time zone.

    A run covers one interval and runs when it ends; its logical date (``{{ ds }}``) is the
    interval's start, so a daily run at 02:00 ingests the previous day's staging folder.
    """
    expression = AIRFLOW_CRON_PRESETS.get(site.schedule, site.schedule)
    return CronDataIntervalTimetable(expression, timezone=site.timezone)


def _start_date(site: SiteConfig) -> datetime:
    """Return midnight of the site's first day, in its time zone."""
    first = site.start_date
    return pendulum.datetime(first.year, first.month, first.day, tz=site.timezone)


def _tags(site: SiteConfig) -> list[str]:
    """Return the DAG's tags: the product's, the site's, then the site's own tags."""
    tags = [DAG_TAG, f"site:{site.id}", *site.tags]
    return list(dict.fromkeys(tags))
