"""Render a run report as a readable plain-text summary."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from pydantic import ByteSize

from dicom_ingest.report.build import NotUploadedFile, RunReport, RunStatus, StudyOutcome, Volume, counted

_INDENT = "  "


def render_text(report: RunReport, *, list_files: bool = True) -> str:
    """Return the report as plain text: a status line, the counts, then the details.

    :param report: the run's report.
    :param list_files: list every file not uploaded with its path, reason and message; without
        it only their counts per reason are given (for logs: staging paths may name patients).
    """
    lines = [
        f"DICOM ingest report: site {report.site_id}, run {report.run_id}",
        f"Status: {_status_line(report)}",
    ]
    if report.staging_uri:
        lines.append(f"Staging: {report.staging_uri}")
    lines += ["", *_counts(report)]
    lines += _section("Problems", report.problems)
    lines += _section("Failed studies", (_study_line(study) for study in report.failed))
    lines += _section("Held-back studies", (_study_line(study) for study in report.held))
    lines += _section("Unaccounted-for studies", (_study_line(study) for study in report.unaccounted))
    lines += _section(
        "Abandoned orders",
        (f"{study_uid}: {', '.join(orders)}" for study_uid, orders in report.abandoned_orders.items()),
    )
    if list_files:
        lines += _section(
            "Files not uploaded",
            (_file_line(item) for item in report.not_uploaded),
        )
    return "\n".join(lines) + "\n"


def _status_line(report: RunReport) -> str:
    """Say how the run went in one line."""
    if report.status is RunStatus.FAILED:
        return f"FAILED ({counted(len(report.problems), 'problem')}, listed below)"
    if report.status is RunStatus.DRY_RUN:
        return "DRY RUN: the plan was made and recorded; nothing was uploaded"
    return "SUCCEEDED"


def _counts(report: RunReport) -> list[str]:
    """Return the lines of counts."""
    rows = [
        ("Planned", f"{_volume(report.planned)} in {counted(report.batches, 'batch', 'batches')}"),
        ("Uploaded", _uploaded(report)),
        ("Delivered", _studies(report.delivered)),
        ("Skipped as done", _studies(report.skipped_done)),
        ("Failed", f"{_studies_count(len(report.failed))}, {len(report.orders_failed)} with a vendor order"),
        ("Held back", _held(report.held_per_reason)),
        ("Not uploaded", _per_reason(report.not_uploaded_per_reason, "file")),
        ("Abandoned orders", str(sum(len(orders) for orders in report.abandoned_orders.values()))),
        ("Unaccounted for", counted(report.unaccounted_instances, "instance")),
    ]
    width = max(len(label) for label, _ in rows) + 1
    return [f"{label + ':':<{width}} {value}" for label, value in rows]


def _studies_count(count: int) -> str:
    return counted(count, "study", "studies")


def _volume(volume: Volume) -> str:
    return f"{_studies_count(volume.studies)}, {counted(volume.instances, 'instance')}, {_size(volume.bytes)}"


def _studies(volume: Volume) -> str:
    return f"{_studies_count(volume.studies)} ({counted(volume.instances, 'instance')})"


def _size(count: int) -> str:
    return ByteSize(count).human_readable(decimal=True)


def _uploaded(report: RunReport) -> str:
    """Describe what went up, and how fast."""
    text = f"{counted(report.uploaded.instances, 'instance')}, {_size(report.uploaded.bytes)}"
    rate = report.bytes_per_second
    if rate is not None:
        text += (
            f" in {report.timing.seconds:.1f} s ({_size(int(rate))}/s, "
            f"{report.instances_per_second or 0:.1f} instances/s)"
        )
    return text


def _held(per_reason: Mapping[str, Mapping[str, int]]) -> str:
    """Describe held-back studies per reason."""
    if not per_reason:
        return _studies_count(0)
    studies = sum(entry["studies"] for entry in per_reason.values())
    details = ", ".join(
        f"{reason}: {_studies_count(entry['studies'])}, {counted(entry['instances'], 'instance')}"
        for reason, entry in per_reason.items()
    )
    return f"{_studies_count(studies)} ({details})"


def _per_reason(counts: Mapping[str, int], noun: str) -> str:
    """Render ``{"zero_byte": 1, "not_dicom": 2}`` as ``3 files (not_dicom=2, zero_byte=1)``."""
    total = counted(sum(counts.values()), noun)
    if not counts:
        return total
    return f"{total} ({', '.join(f'{reason}={count}' for reason, count in counts.items())})"


def _study_line(study: StudyOutcome) -> str:
    """Describe one study that did not simply end delivered."""
    parts = [study.study_uid, study.state]
    if study.reason:
        parts.append(f"reason {study.reason}")
    if study.order_id:
        parts.append(f"order {study.order_id}")
    parts.append(counted(study.instances, "instance"))
    text = ", ".join(parts)
    return f"{text}: {study.message}" if study.message else text


def _file_line(item: NotUploadedFile) -> str:
    """Describe one file not uploaded: its path, reason and what is wrong."""
    message = item.message.removeprefix(f"{item.path}: ")
    return f"{item.path} [{item.reason}]: {message}"


def _section(title: str, entries: Iterable[str]) -> list[str]:
    """Return a titled list, or nothing when it is empty."""
    items = [f"{_INDENT}{entry}" for entry in entries]
    return ["", f"{title}:", *items] if items else []
