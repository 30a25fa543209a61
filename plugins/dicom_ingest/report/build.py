"""Build the report of one run of a site from its plan files and its ledger.

The plan says what the run meant to do: the studies of its batches, the studies it left out as
already done, and every staged file it will not upload, with its reason (``invalid.jsonl``).
The ledger says what became of each planned study. Every planned study must end verified
(delivered), failed, held, or skipped as already done; anything else is *unaccounted for*, and
the run fails.

Reports carry UIDs, states, reasons, counts, sizes and rates, and the staging-relative path of
each file that was not uploaded (needed to act on it); never tag values, tokens or URLs.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from dicom_ingest.ledger import BatchStudy, EventRecord, InstanceState, Ledger, RunSummary, StudyState
from dicom_ingest.staging import InstanceRecord, Plan, Reason, StagingError
from dicom_ingest.staging.classify import STUDY_REASONS
from dicom_ingest.staging.plan import INVALID_FILE
from dicom_ingest.staging.source import to_storage_path

REPORT_FORMAT_VERSION = 1

_SENT_INSTANCE_STATES = (InstanceState.UPLOADED, InstanceState.METADATA_SENT, InstanceState.VERIFIED)
_SENT_STUDY_STATES = (StudyState.UPLOADED, StudyState.METADATA_SENT, StudyState.VERIFIED)


def counted(count: int, singular: str, plural: str | None = None) -> str:
    """Return ``"1 study"`` or ``"3 studies"``.

    :param count: how many.
    :param singular: the noun for one.
    :param plural: the noun for several; ``singular + "s"`` when omitted.
    """
    return f"{count} {singular if count == 1 else plural or singular + 's'}"


class RunStatus(StrEnum):
    """The outcome of a run, as its report states it."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DRY_RUN = "dry_run"


@dataclass(frozen=True)
class Volume:
    """A number of studies, instances and bytes.

    :param studies: studies.
    :param instances: instances.
    :param bytes: bytes of the instances.
    """

    studies: int = 0
    instances: int = 0
    bytes: int = 0

    def __add__(self, other: Volume) -> Volume:
        """Add two volumes."""
        return Volume(
            self.studies + other.studies, self.instances + other.instances, self.bytes + other.bytes
        )


@dataclass(frozen=True)
class NotUploadedFile:
    """A staged file the run did not upload.

    :param path: its path below the staging root.
    :param reason: the reason code.
    :param message: what is wrong, naming the file (no tag values).
    :param size: its size in bytes.
    """

    path: str
    reason: str
    message: str
    size: int


@dataclass(frozen=True)
class StudyOutcome:
    """A study that did not simply end delivered: failed, held back or unaccounted for.

    :param study_uid: StudyInstanceUID.
    :param state: its state in the ledger (or the plan's decision).
    :param reason: the reason code, if any.
    :param instances: its instances in this run.
    :param order_id: the vendor's order, if one is known.
    :param message: an explanation (no tag values).
    """

    study_uid: str
    state: str
    reason: str | None
    instances: int
    order_id: str | None = None
    message: str | None = None


@dataclass(frozen=True)
class UploadTiming:
    """When the run's instances went up, and how fast.

    :param started_at: the first instance recorded as uploaded.
    :param finished_at: the last one.
    :param instances: instances recorded as uploaded in between.
    """

    started_at: datetime | None = None
    finished_at: datetime | None = None
    instances: int = 0

    @property
    def seconds(self) -> float:
        """Seconds from the first to the last recorded upload."""
        if self.started_at is None or self.finished_at is None:
            return 0.0
        return (self.finished_at - self.started_at).total_seconds()


@dataclass
class RunReport:
    """The report of one run of one site.

    :param site_id: the site.
    :param run_id: the Airflow run.
    :param dry_run: whether the run only planned.
    :param has_plan: whether the run's plan exists (``False`` when planning failed).
    :param staging_uri: the staging area the plan was made from.
    :param batches: how many batches the plan has.
    :param planned: what the plan's batches hold.
    :param delivered: studies whose order the vendor delivered.
    :param uploaded: instances (and bytes) of the run that reached the vendor's store.
    :param skipped_done: studies left out because the vendor had already confirmed them.
    :param failed: studies that failed (upload, metadata or the vendor's order).
    :param held: studies held back, with their reason.
    :param unaccounted: planned studies that ended in none of the expected states.
    :param not_uploaded: staged files that were not uploaded, with their reason (except the files
        of studies held back for missing metadata: nothing is wrong with them, and they are
        reported with their study).
    :param files_per_reason: staged files per reason code, as the scan classified them.
    :param abandoned_orders: orders left behind by re-sends, per study.
    :param timing: when the uploads happened.
    :param generated_at: when the report was built.
    """

    site_id: str
    run_id: str
    dry_run: bool
    has_plan: bool
    staging_uri: str | None = None
    batches: int = 0
    planned: Volume = field(default_factory=Volume)
    delivered: Volume = field(default_factory=Volume)
    uploaded: Volume = field(default_factory=Volume)
    skipped_done: Volume = field(default_factory=Volume)
    failed: list[StudyOutcome] = field(default_factory=list)
    held: list[StudyOutcome] = field(default_factory=list)
    unaccounted: list[StudyOutcome] = field(default_factory=list)
    not_uploaded: list[NotUploadedFile] = field(default_factory=list)
    files_per_reason: dict[str, int] = field(default_factory=dict)
    abandoned_orders: dict[str, list[str]] = field(default_factory=dict)
    timing: UploadTiming = field(default_factory=UploadTiming)
    generated_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def unaccounted_instances(self) -> int:
        """Planned instances that are neither verified, skipped as done, failed nor held."""
        return sum(study.instances for study in self.unaccounted)

    @property
    def orders_failed(self) -> list[StudyOutcome]:
        """Failed studies whose order the vendor opened (and failed, or that could not complete)."""
        return [study for study in self.failed if study.order_id]

    @property
    def not_uploaded_per_reason(self) -> dict[str, int]:
        """Files not uploaded, per reason code."""
        return dict(sorted(Counter(item.reason for item in self.not_uploaded).items()))

    @property
    def held_per_reason(self) -> dict[str, dict[str, int]]:
        """Held-back studies and their instances, per reason code."""
        totals: dict[str, dict[str, int]] = {}
        for study in self.held:
            entry = totals.setdefault(study.reason or "unknown", {"studies": 0, "instances": 0})
            entry["studies"] += 1
            entry["instances"] += study.instances
        return dict(sorted(totals.items()))

    @property
    def bytes_per_second(self) -> float | None:
        """Upload rate in bytes per second, when the uploads took measurable time."""
        seconds = self.timing.seconds
        return self.uploaded.bytes / seconds if seconds > 0 else None

    @property
    def instances_per_second(self) -> float | None:
        """Upload rate in instances per second, when the uploads took measurable time."""
        seconds = self.timing.seconds
        return self.timing.instances / seconds if seconds > 0 else None

    @property
    def problems(self) -> list[str]:
        """Why the run failed, one sentence each; empty when it did not."""
        problems = []
        if not self.has_plan:
            problems.append("the run has no plan: planning failed or did not run")
        if self.failed:
            reasons = Counter(study.reason or "unknown" for study in self.failed)
            per_reason = ", ".join(f"{reason}={count}" for reason, count in sorted(reasons.items()))
            problems.append(f"{counted(len(self.failed), 'study', 'studies')} failed ({per_reason})")
        if self.unaccounted and not self.dry_run:
            instances = counted(self.unaccounted_instances, "planned instance")
            studies = counted(len(self.unaccounted), "study", "studies")
            problems.append(
                f"{instances} of {studies} unaccounted for "
                "(neither verified, skipped as done, failed nor held)"
            )
        return problems

    @property
    def status(self) -> RunStatus:
        """``succeeded``, ``failed`` or ``dry_run``."""
        if self.problems:
            return RunStatus.FAILED
        return RunStatus.DRY_RUN if self.dry_run else RunStatus.SUCCEEDED

    def to_dict(self) -> dict[str, Any]:
        """Return the report as a JSON-able dict."""
        rate = self.bytes_per_second
        return {
            "version": REPORT_FORMAT_VERSION,
            "site_id": self.site_id,
            "run_id": self.run_id,
            "status": self.status.value,
            "dry_run": self.dry_run,
            "generated_at": self.generated_at.isoformat(),
            "staging_uri": self.staging_uri,
            "problems": self.problems,
            "planned": {**asdict(self.planned), "batches": self.batches},
            "uploaded": asdict(self.uploaded),
            "delivered": asdict(self.delivered),
            "skipped_done": asdict(self.skipped_done),
            "orders": {
                "delivered": self.delivered.studies,
                "failed": len(self.orders_failed),
                "abandoned": sum(len(orders) for orders in self.abandoned_orders.values()),
            },
            "failed": [asdict(study) for study in self.failed],
            "held": {
                "per_reason": self.held_per_reason,
                "studies": [asdict(study) for study in self.held],
            },
            "unaccounted": {
                "instances": self.unaccounted_instances,
                "studies": [asdict(study) for study in self.unaccounted],
            },
            "not_uploaded": {
                "per_reason": self.not_uploaded_per_reason,
                "files": [asdict(item) for item in self.not_uploaded],
            },
            "files_per_reason": dict(self.files_per_reason),
            "abandoned_orders": self.abandoned_orders,
            "timing": {
                "upload_started_at": _iso(self.timing.started_at),
                "upload_finished_at": _iso(self.timing.finished_at),
                "seconds": round(self.timing.seconds, 3),
                "bytes_per_second": round(rate, 1) if rate is not None else None,
                "instances_per_second": _rounded(self.instances_per_second),
            },
        }

    def to_json(self) -> str:
        """Return the report as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2)


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _rounded(value: float | None) -> float | None:
    return round(value, 2) if value is not None else None


class RunReportBuilder:
    """Gather a run's report from its plan and its ledger.

    :param ledger: the site's ledger.
    :param site_id: the site.
    :param run_id: the Airflow run.
    :param dry_run: whether the run only planned.
    """

    def __init__(self, ledger: Ledger, site_id: str, run_id: str, *, dry_run: bool) -> None:
        self.ledger = ledger
        self.site_id = site_id
        self.run_id = run_id
        self.dry_run = dry_run

    def build(self, work_uri: str) -> RunReport:
        """Build the report of the plan written to ``work_uri`` (or of its absence).

        :param work_uri: the run's work location.
        """
        report = RunReport(self.site_id, self.run_id, self.dry_run, has_plan=False)
        try:
            plan = Plan.load(work_uri)
        except StagingError:
            report.not_uploaded = self._files_of_failed_planning(work_uri)
            return report
        report.has_plan = True
        report.staging_uri = plan.source_uri
        report.batches = len(plan.batches)
        report.files_per_reason = plan.reason_counts
        report.skipped_done = _skipped_done(plan.manifest)
        held_files = self._read_not_uploaded(plan.iter_invalid(), report)
        self._read_batches(plan, report)
        report.held.extend(held_files)
        summary = self.ledger.run_summary(self.site_id, self.run_id)
        report.uploaded = _uploaded(summary)
        report.timing = _upload_timing(self.ledger.run_events(self.site_id, self.run_id))
        return report

    def _files_of_failed_planning(self, work_uri: str) -> list[NotUploadedFile]:
        """List the invalid files a planning that stopped at the threshold wrote, if it did."""
        invalid = to_storage_path(work_uri) / INVALID_FILE
        if not invalid.exists():
            return []
        with invalid.open("r") as lines:
            records = [InstanceRecord.from_dict(json.loads(line)) for line in lines if line.strip()]
        return [_not_uploaded(record) for record in records]

    @staticmethod
    def _read_not_uploaded(records: Iterable[InstanceRecord], report: RunReport) -> list[StudyOutcome]:
        """Fill the report's files not uploaded; return the held-back studies found among them."""
        held: dict[str, StudyOutcome] = {}
        for record in records:
            reason = record.reason.value
            if record.reason in STUDY_REASONS and record.study_uid:
                known = held.get(record.study_uid)
                held[record.study_uid] = StudyOutcome(
                    study_uid=record.study_uid,
                    state=StudyState.HELD.value,
                    reason=known.reason if known else reason,
                    instances=(known.instances if known else 0) + 1,
                    message=known.message if known else _study_message(record.message),
                )
            if record.reason is not Reason.METADATA_MISSING:
                report.not_uploaded.append(_not_uploaded(record))
        return list(held.values())

    def _read_batches(self, plan: Plan, report: RunReport) -> None:
        """Account for every study of every batch with its state in the ledger (not in a dry run)."""
        for batch in plan.batches:
            report.planned += Volume(batch.studies, batch.instances, batch.bytes)
            if self.dry_run:
                continue
            states = {
                study.study_uid: study
                for study in self.ledger.studies_in_batch(self.site_id, self.run_id, batch.batch_id)
            }
            absent: dict[str, int] = {}
            for study in plan.iter_batch(batch.batch_id):
                volume = Volume(1, len(study.instances), study.bytes)
                known = states.get(study.study_uid)
                if known is None:
                    absent[study.study_uid] = volume.instances
                    continue
                self._account(report, known, volume)
            done = self.ledger.done_studies(self.site_id, absent) if absent else set()
            for study_uid, instances in absent.items():
                if study_uid in done:
                    report.skipped_done += Volume(1, instances, 0)
                else:
                    report.unaccounted.append(StudyOutcome(study_uid, "unknown", None, instances))

    @staticmethod
    def _account(report: RunReport, study: BatchStudy, volume: Volume) -> None:
        """Put one planned study of the run in its place in the report."""
        if study.abandoned_order_ids:
            report.abandoned_orders[study.study_uid] = list(study.abandoned_order_ids)
        outcome = StudyOutcome(
            study_uid=study.study_uid,
            state=study.state,
            reason=study.reason,
            instances=volume.instances,
            order_id=study.order_id,
        )
        if study.state == StudyState.VERIFIED:
            report.delivered += volume
        elif study.state == StudyState.FAILED:
            report.failed.append(outcome)
        elif study.state == StudyState.HELD:
            report.held.append(outcome)
        else:
            report.unaccounted.append(outcome)


def _not_uploaded(record: InstanceRecord) -> NotUploadedFile:
    return NotUploadedFile(record.relative_path, record.reason.value, record.message, record.size)


def _study_message(file_message: str) -> str:
    """Keep the study part of a held-back file's message (``<path>: study held back: <why>``)."""
    marker = "study held back: "
    return file_message.split(marker, 1)[1] if marker in file_message else file_message


def _skipped_done(manifest: Mapping[str, Any]) -> Volume:
    """Return the studies the plan left out as already done."""
    skipped = manifest.get("studies", {}).get("skipped_done", {})
    if not isinstance(skipped, Mapping):
        return Volume()
    return Volume(int(skipped.get("studies", 0)), int(skipped.get("instances", 0)), 0)


def _uploaded(summary: RunSummary) -> Volume:
    """Return the run's instances (and bytes) whose bytes reached the vendor's store."""
    studies = sum(summary.studies_by_state.get(state, 0) for state in _SENT_STUDY_STATES)
    instances = sum(summary.instances_by_state.get(state, 0) for state in _SENT_INSTANCE_STATES)
    return Volume(studies, instances, summary.bytes_uploaded)


def _upload_timing(events: Iterable[EventRecord]) -> UploadTiming:
    """Find the first and last instance uploads of the run in its history."""
    started = finished = None
    count = 0
    for event in events:
        if event.sop_uid is None or event.to_state != InstanceState.UPLOADED:
            continue
        count += 1
        started = event.at if started is None or event.at < started else started
        finished = event.at if finished is None or event.at > finished else finished
    return UploadTiming(started, finished, count)
