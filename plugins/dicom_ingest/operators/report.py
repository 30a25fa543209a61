"""Report on one run of a site, and fail the run when anything in it went wrong.

:class:`DicomIngestReportOperator` is the last task of a site's DAG. It runs whatever happened
upstream (trigger rule ``all_done``), and since it is the DAG's only leaf its outcome is the
run's: it raises, after writing the report, when a study failed, when a planned instance is
unaccounted for, or when the run has no plan.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator, TriggerRule
from airflow.sdk.exceptions import AirflowFailException

from dicom_ingest.operators.plan import templated_flag
from dicom_ingest.sites.runtime import SiteRuntime

if TYPE_CHECKING:
    from airflow.sdk import Context

    from dicom_ingest.report import ReportFiles, RunReport

log = logging.getLogger(__name__)


class DicomIngestReportOperator(BaseOperator):
    """Write the run's report (JSON and text) to the site's reports location, log it, and judge the run.

    The report covers studies and instances planned, uploaded, delivered, skipped as already
    done, failed (with the vendor's reasons), held back (with their reason), abandoned orders,
    every staged file that was not uploaded (staging-relative path, reason, message), bytes and
    upload rate. Files that were not uploaded do not fail the run on their own.

    :param site: the site's configuration, ``SiteConfig.model_dump(mode="json")`` (templated).
    :param work_uri: the run's work location (templated); by default the one the site's
        configuration gives for this run, which is where the plan task writes, so the report
        can be made even when planning failed and left no XCom behind.
    :param dry_run: whether the run only planned (templated); a dry run's planned studies are
        expected to stay unsent.
    """

    template_fields: Sequence[str] = ("site", "work_uri", "dry_run")
    ui_color = "#eef6e8"

    def __init__(
        self,
        *,
        site: dict[str, Any],
        work_uri: str | None = None,
        dry_run: bool | str = False,
        trigger_rule: str = TriggerRule.ALL_DONE,
        **kwargs: Any,
    ) -> None:
        super().__init__(trigger_rule=trigger_rule, **kwargs)
        self.site = site
        self.work_uri = work_uri
        self.dry_run = dry_run

    def execute(self, context: Context) -> dict[str, Any]:
        """Build, write and log the report; raise when the run failed.

        :param context: the task's context.
        :raises AirflowFailException: after writing the report, when a study failed, a planned
            instance is unaccounted for, or the run has no plan.
        """
        from dicom_ingest.report import RunReportBuilder, render_text, write_report

        run_id = context["run_id"]
        runtime = SiteRuntime.from_dict(self.site)
        try:
            builder = RunReportBuilder(
                runtime.ledger, runtime.site_id, run_id, dry_run=templated_flag(self.dry_run)
            )
            report = builder.build(self.work_uri or runtime.work_uri(run_id))
        finally:
            runtime.close()
        files = write_report(report, runtime.reports_uri())
        log.info(
            "Report written to %s and %s\n%s", files.json, files.text, render_text(report, list_files=False)
        )
        if report.problems:
            raise AirflowFailException(
                f"Run {run_id} of site {runtime.site_id} failed: {'; '.join(report.problems)}. "
                f"See the report at {files.text}"
            )
        return _xcom_summary(report, files)


def _xcom_summary(report: RunReport, files: ReportFiles) -> dict[str, Any]:
    """Return the report's main counts and its files, small enough for XCom."""
    return {
        "status": report.status.value,
        "report_json": files.json,
        "report_text": files.text,
        "studies_planned": report.planned.studies,
        "instances_planned": report.planned.instances,
        "instances_uploaded": report.uploaded.instances,
        "bytes_uploaded": report.uploaded.bytes,
        "studies_delivered": report.delivered.studies,
        "studies_skipped_done": report.skipped_done.studies,
        "studies_held": len(report.held),
        "files_not_uploaded": len(report.not_uploaded),
    }
