"""Plan one run of a site: scan its staging area, write the upload plan and record it in the ledger.

:class:`DicomPlanOperator` is the first task of a site's DAG. It hands XCom only the plan's
location and its batches' ids and counts; the mapped upload tasks read their batch back from
the plan files, and every file's fate is in the ledger and the plan's ``invalid.jsonl``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from dicom_ingest.sites.runtime import SiteRuntime

if TYPE_CHECKING:
    from airflow.sdk import Context

    from dicom_ingest.ledger import Ledger, PlannedStudy
    from dicom_ingest.staging import Plan

log = logging.getLogger(__name__)

_TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
_FALSE_WORDS = frozenset({"false", "no", "off", "0", "none", ""})


def templated_flag(value: object) -> bool:
    """Read a boolean operator argument that may arrive as a rendered template (``"True"``).

    Airflow renders ``{{ params.dry_run }}`` to text, so ``"True"`` and ``"false"`` are accepted
    as well as real booleans.

    :param value: the argument as rendered.
    :raises ValueError: the value is not a recognisable boolean.
    """
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    word = str(value).strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ValueError(f"expected a boolean (true or false), got {word!r}")


class DoneStudies:
    """Tell planning which studies the vendor already confirmed, remembering every answer.

    The plan asks about one study at a time, in scan order, so the ledger is asked once per
    distinct study and never twice about the same one.

    :param ledger: the site's ledger.
    :param site_id: the site.
    """

    def __init__(self, ledger: Ledger, site_id: str) -> None:
        self._ledger = ledger
        self._site_id = site_id
        self._answers: dict[str, bool] = {}

    def __call__(self, study_uid: str) -> bool:
        """Tell whether ``study_uid`` is verified in the ledger.

        :param study_uid: a StudyInstanceUID found in the staging area.
        """
        if study_uid not in self._answers:
            self._answers[study_uid] = bool(self._ledger.done_studies(self._site_id, [study_uid]))
        return self._answers[study_uid]


@dataclass
class PlanRecord:
    """What planning a run found and recorded, in counts (safe for logs and XCom).

    :param files_per_reason: staged files per reason code (``valid``, ``not_dicom``, ...).
    :param studies_planned: studies in the plan's batches.
    :param instances_planned: their instances.
    :param bytes_planned: their bytes.
    :param studies_skipped_done: studies left out because the vendor already confirmed them.
    :param studies_held: held-back studies per reason.
    :param files_quarantined: files recorded as not uploadable, per reason.
    """

    files_per_reason: dict[str, int] = field(default_factory=dict)
    studies_planned: int = 0
    instances_planned: int = 0
    bytes_planned: int = 0
    studies_skipped_done: int = 0
    studies_held: Counter[str] = field(default_factory=Counter)
    files_quarantined: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        """Return the counts as a JSON-able dict."""
        return {
            "files_per_reason": dict(self.files_per_reason),
            "studies_planned": self.studies_planned,
            "instances_planned": self.instances_planned,
            "bytes_planned": self.bytes_planned,
            "studies_skipped_done": self.studies_skipped_done,
            "studies_held": dict(self.studies_held),
            "files_quarantined": dict(self.files_quarantined),
        }


class RunPlanner:
    """Build a run's plan and record it in the site's ledger.

    :param runtime: the site, as a task sees it.
    :param run_id: the Airflow run being planned.
    """

    def __init__(self, runtime: SiteRuntime, run_id: str) -> None:
        self.runtime = runtime
        self.run_id = run_id

    @property
    def site_id(self) -> str:
        """Return the site's id."""
        return self.runtime.site_id

    def build(self, staging_override: str | None = None) -> Plan:
        """Scan the run's staging area and write the plan into the run's work location.

        :param staging_override: a staging location replacing the site's for this run.
        :raises StagingThresholdError: too many invalid files; nothing was planned.
        """
        from dicom_ingest.staging import build_plan

        return build_plan(
            self.runtime.staging_uri(staging_override),
            self.runtime.work_uri(self.run_id),
            self.runtime.staging_options(),
            skip_study=DoneStudies(self.runtime.ledger, self.site_id),
        )

    def record(self, plan: Plan) -> PlanRecord:
        """Record the plan in the ledger: its batches, quarantined files and held-back studies.

        Files of a held-back study are recorded with the study (``hold_study``), not as
        quarantined files: nothing is wrong with them, the study waits for its metadata (or for
        its conflict to be resolved) and is planned again by a later run.

        :param plan: the plan written by :meth:`build`.
        """
        from dicom_ingest.staging.classify import STUDY_REASONS

        ledger = self.runtime.ledger
        outcome = PlanRecord(files_per_reason=plan.reason_counts)
        outcome.studies_skipped_done = _skipped_done_studies(plan.manifest)
        for batch in plan.batches:
            recorded = ledger.record_plan(
                self.site_id, self.run_id, batch.batch_id, self._ledger_studies(plan, batch.batch_id)
            )
            outcome.studies_planned += batch.studies
            outcome.instances_planned += batch.instances
            outcome.bytes_planned += batch.bytes
            outcome.studies_skipped_done += recorded.studies_already_done
        held: dict[str, str] = {}
        for record in plan.iter_invalid():
            if record.reason in STUDY_REASONS and record.study_uid:
                held.setdefault(record.study_uid, record.reason.value)
                continue
            ledger.mark_quarantined(
                self.site_id,
                self.run_id,
                _location(plan, record.relative_path),
                record.reason.value,
                record.message,
                study_uid=record.study_uid,
                size=record.size,
            )
            outcome.files_quarantined[record.reason.value] += 1
        for study_uid, reason in held.items():
            ledger.hold_study(self.site_id, study_uid, self.run_id, reason)
            outcome.studies_held[reason] += 1
        return outcome

    def _ledger_studies(self, plan: Plan, batch_id: str) -> Iterator[PlannedStudy]:
        """Stream a batch's studies as the ledger takes them (UIDs, locations and sizes only)."""
        from dicom_ingest.ledger import PlannedInstance, PlannedStudy

        for study in plan.iter_batch(batch_id):
            yield PlannedStudy(
                study_uid=study.study_uid,
                instances=[
                    PlannedInstance(
                        sop_uid=instance.sop_uid,
                        path=_location(plan, instance.relative_path),
                        size=instance.size,
                        series_uid=instance.series_uid,
                    )
                    for instance in study.instances
                ],
            )


def _location(plan: Plan, relative_path: str) -> str:
    """Return the full location of a staged file, the ledger's key for it across runs."""
    return f"{plan.source_uri.rstrip('/')}/{relative_path}"


def _skipped_done_studies(manifest: Mapping[str, Any]) -> int:
    """Return how many studies the plan left out as already done."""
    skipped = manifest.get("studies", {}).get("skipped_done", {})
    return int(skipped.get("studies", 0)) if isinstance(skipped, Mapping) else 0


def batch_summaries(plan: Plan) -> list[dict[str, Any]]:
    """Return the plan's batches as the mapped upload tasks receive them (ids and counts).

    :param plan: the written plan.
    """
    return [
        {
            "batch_id": batch.batch_id,
            "index": index,
            "studies": batch.studies,
            "instances": batch.instances,
            "bytes": batch.bytes,
        }
        for index, batch in enumerate(plan.batches, start=1)
    ]


def _reason_list(counts: Mapping[str, int]) -> str:
    """Render ``{"not_dicom": 2, "zero_byte": 1}`` as ``not_dicom=2, zero_byte=1`` (or ``none``)."""
    return ", ".join(f"{reason}={count}" for reason, count in sorted(counts.items()) if count) or "none"


class DicomPlanOperator(BaseOperator):
    """Plan a run of a site: scan its staging area, write the upload plan, record it in the ledger.

    Studies the vendor already confirmed are left out, invalid files are quarantined (by the
    site's policy) and recorded with their reason, and studies lacking required metadata are
    held back. The XCom value is small: the plan's location, its batches (ids and counts) and
    counts per reason. Too many invalid files fail the task without retry, before anything is
    uploaded; the plan's ``invalid.jsonl`` then lists them. A staging location that does not
    exist fails the task too (an empty folder is a run with nothing to send): a wrong path or a
    missing mount must not pass for a quiet day.

    :param site: the site's configuration, ``SiteConfig.model_dump(mode="json")`` (templated, so
        ``{{ ds }}`` in its locations is rendered per run).
    :param staging_override: a staging location replacing the site's for this run (templated;
        empty means none).
    :param dry_run: plan and record, but hand no batch to the upload tasks (templated).
    """

    template_fields: Sequence[str] = ("site", "staging_override", "dry_run")
    ui_color = "#e8f1fb"

    def __init__(
        self,
        *,
        site: dict[str, Any],
        staging_override: str | None = None,
        dry_run: bool | str = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.site = site
        self.staging_override = staging_override
        self.dry_run = dry_run

    def execute(self, context: Context) -> dict[str, Any]:
        """Build and record the plan; return the plan's location, batches and counts.

        :param context: the task's context.
        """
        dry_run = templated_flag(self.dry_run)
        runtime = SiteRuntime.from_dict(self.site)
        planner = RunPlanner(runtime, context["run_id"])
        try:
            plan = self._build(planner)
            outcome = planner.record(plan)
        finally:
            runtime.close()
        batches = batch_summaries(plan)
        self._log_summary(planner.site_id, outcome, len(batches), dry_run)
        return {
            "work_uri": str(plan.work),
            "batches": [] if dry_run else batches,
            "counts": outcome.to_dict(),
            "dry_run": dry_run,
        }

    def _build(self, planner: RunPlanner) -> Plan:
        """Build the plan; too many invalid files fail the task for good, with the counts per reason."""
        from dicom_ingest.staging import StagingThresholdError

        try:
            return planner.build(self.staging_override or None)
        except StagingThresholdError as exc:
            log.error(
                "Site %s: %d of %d staged files are invalid (%s); nothing is uploaded",
                planner.site_id,
                exc.invalid,
                exc.total,
                _reason_list(exc.counts),
            )
            raise AirflowFailException(str(exc)) from exc

    @staticmethod
    def _log_summary(site_id: str, outcome: PlanRecord, batches: int, dry_run: bool) -> None:
        """Log what the plan holds, in counts only."""
        log.info(
            "Site %s: %d studies (%d instances, %d bytes) planned in %d batches; "
            "%d studies already done; held back: %s; not uploaded: %s; staged files: %s",
            site_id,
            outcome.studies_planned,
            outcome.instances_planned,
            outcome.bytes_planned,
            batches,
            outcome.studies_skipped_done,
            _reason_list(outcome.studies_held),
            _reason_list(outcome.files_quarantined),
            _reason_list(outcome.files_per_reason),
        )
        if dry_run:
            log.info("Dry run: the plan is recorded and nothing will be uploaded")
