"""What the uploader logs: steady progress lines with counts and rates, and never patient data."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from dicom_ingest.ledger import Ledger
from dicom_ingest.upload import BatchUploader, ProgressMeter
from tests.upload.support import FakeClock, FakeVendor, record_plan, sop_uid, stage_study

PATIENT_FOLDER = "DOE_JANE_19800101"
ACCESSION = "ACC-PHI-31337"
AGE = 67
SEX = "F"
PROGRESS_LINE = re.compile(r"^Batch \S+: \d+/\d+ instances")


def test_no_path_or_metadata_value_reaches_the_logs(
    make_uploader: Callable[..., BatchUploader],
    vendor: FakeVendor,
    ledger: Ledger,
    staging_root: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    metadata = {"patient_age": AGE, "patient_sex": SEX, "accession_number": ACCESSION}
    fine = stage_study(staging_root, 1, 2, folder=f"{PATIENT_FOLDER}/ct", metadata=metadata)
    failing = stage_study(staging_root, 2, 2, folder=f"{PATIENT_FOLDER}/mr", metadata=metadata)
    vanished = stage_study(staging_root, 3, 2, folder=f"{PATIENT_FOLDER}/us", metadata=metadata)
    record_plan(ledger, [fine, failing, vanished])
    vendor.failing_sops.add(sop_uid(2, 0))
    (staging_root / vanished.instances[1].relative_path).unlink()
    caplog.set_level(logging.DEBUG)

    result = make_uploader(concurrency=2, progress_interval=0.0).run([fine, failing, vanished])

    assert result.failed == 2 and result.orders == 1  # the failure paths were taken, and logged
    assert vendor.patches[0].metadata == metadata
    for record in caplog.records:
        message = record.getMessage()
        assert PATIENT_FOLDER not in message and ACCESSION not in message, message
        assert str(staging_root) not in message, message
        assert not {AGE, SEX, ACCESSION} & set(map(_hashable, record.args or ())), message


def _hashable(value: object) -> object:
    """Return a log argument in a form that can go into a set."""
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def test_progress_is_logged_at_a_steady_pace_and_once_at_the_end(
    make_uploader: Callable[..., BatchUploader],
    ledger: Ledger,
    staging_root: Path,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    studies = [stage_study(staging_root, number, 3) for number in (1, 2)]
    record_plan(ledger, studies)
    slow_vendor = FakeVendor(upload_seconds=4.0, clock=clock)
    uploader = make_uploader(concurrency=1, progress_interval=10.0, client=slow_vendor)
    caplog.set_level(logging.INFO, logger="dicom_ingest.upload")

    uploader.run(studies)

    lines = [record.getMessage() for record in caplog.records if PROGRESS_LINE.match(record.getMessage())]
    assert 2 <= len(lines) <= 4, lines  # 24 s of uploads at one line per 10 s, plus the final line
    assert lines[-1].startswith("Batch batch-00001: 6/6 instances")
    assert lines[-1].endswith("2/2 studies finished")


def test_the_progress_line_estimates_the_time_left_from_the_byte_rate() -> None:
    clock = FakeClock(now=0.0)
    meter = ProgressMeter("batch-00007", studies=4, instances=40, total_bytes=4_000_000, clock=clock)
    meter.instances_settled(10, 1_000_000)  # a study skipped as done
    for _ in range(10):
        meter.instance_uploaded(100_000)
    meter.study_finished()
    clock.advance(10.0)

    assert meter.eta_seconds() == pytest.approx(20.0)  # 2 MB left at 0.1 MB/s


def test_the_progress_line_has_no_estimate_before_anything_was_sent(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(now=0.0)
    meter = ProgressMeter("batch-00007", studies=1, instances=3, total_bytes=3_000, clock=clock)
    clock.advance(5.0)
    caplog.set_level(logging.INFO)

    meter.log(logging.getLogger("tests.upload"))

    assert meter.eta_seconds() is None
    assert caplog.records[-1].getMessage() == (
        "Batch batch-00007: 0/3 instances, 0.0/0.0 MB, 0.00 MB/s, 0.0 instances/s, ETA unknown, "
        "0/1 studies finished"
    )
