"""Every reason code a single file can get, with pydicom's bundled files and generated ones."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_ingest.metadata.fields import DEFAULT_TAG_MAPPING
from dicom_ingest.staging.classify import HeaderClassifier, InstanceRecord, Reason, quiet_pydicom
from dicom_ingest.staging.source import StagingSource
from tests.staging.conftest import Classify
from tests.staging.factory import (
    PATIENT_ID,
    PATIENT_NAME,
    copy_bundled,
    make_dataset,
    odd_values_allowed,
    uid,
    write_instance,
)


@pytest.mark.parametrize(
    ("bundled", "transfer_syntax"),
    [
        ("CT_small.dcm", "1.2.840.10008.1.2.1"),
        ("MR_small_bigendian.dcm", "1.2.840.10008.1.2.2"),
        ("MR_small_implicit.dcm", "1.2.840.10008.1.2"),
        ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91"),
        ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5"),
        ("image_dfl.dcm", "1.2.840.10008.1.2.1.99"),
        ("test-SR.dcm", "1.2.840.10008.1.2.1"),
    ],
)
def test_real_world_encodings_are_valid_with_their_uids(
    staging_root: Path, classify: Classify, bundled: str, transfer_syntax: str
) -> None:
    copy_bundled(bundled, staging_root / bundled)
    expected = pydicom.dcmread(get_testdata_file(bundled, download=False), stop_before_pixels=True)

    record = classify(bundled).record

    assert record.reason is Reason.VALID, record.message
    assert record.study_uid == expected.StudyInstanceUID
    assert record.sop_uid == expected.SOPInstanceUID
    assert record.series_uid == expected.SeriesInstanceUID
    assert record.sop_class_uid == expected.SOPClassUID
    assert record.transfer_syntax_uid == transfer_syntax
    assert record.size == (staging_root / bundled).stat().st_size


def test_generated_instance_is_valid_and_carries_its_order_fields(
    staging_root: Path, classify: Classify
) -> None:
    write_instance(
        staging_root / "a.dcm", study_uid=uid(1), sop_uid=uid(1, 1), patient_age="090Y", patient_sex="m"
    )

    result = classify("a.dcm")

    assert result.record.reason is Reason.VALID
    assert result.order_fields == {"patient_age": 90, "patient_sex": "M", "accession_number": "ACC-1"}


def test_file_without_preamble_or_meta_is_not_dicom_even_if_pydicom_could_force_it(
    staging_root: Path, classify: Classify
) -> None:
    copy_bundled("ExplVR_LitEndNoMeta.dcm", staging_root / "bare.dcm")
    forced = pydicom.dcmread(staging_root / "bare.dcm", force=True)
    assert "SOPInstanceUID" in forced  # the decision is about files pydicom *can* read

    record = classify("bare.dcm").record

    assert record.reason is Reason.NOT_DICOM
    assert "bare DICOM dataset without the Part 10 header" in record.message
    assert "rewrite it as a Part 10 file" in record.message


@pytest.mark.parametrize("bundled", ["no_meta.dcm", "zipMR.gz", "rtplan.dump"])
def test_files_that_are_not_dicom_say_so(staging_root: Path, classify: Classify, bundled: str) -> None:
    copy_bundled(bundled, staging_root / bundled)

    record = classify(bundled).record

    assert record.reason is Reason.NOT_DICOM
    assert record.message.startswith(f"{bundled}: not a DICOM file")


def test_text_file_is_not_dicom(staging_root: Path, classify: Classify) -> None:
    (staging_root / "notes.txt").write_text("scanner notes\n" * 50)

    assert classify("notes.txt").record.reason is Reason.NOT_DICOM


@pytest.mark.parametrize("bundled", ["MR_truncated.dcm", "rtplan_truncated.dcm"])
def test_bundled_truncated_files_are_unreadable(staging_root: Path, classify: Classify, bundled: str) -> None:
    copy_bundled(bundled, staging_root / bundled)

    record = classify(bundled).record

    assert record.reason is Reason.UNREADABLE
    assert "truncated" in record.message


@pytest.mark.parametrize(
    "bundled", ["CT_small.dcm", "JPEG2000.dcm", "MR_small_bigendian.dcm", "test-SR.dcm", "image_dfl.dcm"]
)
@pytest.mark.parametrize("kept_fraction", [0.05, 0.3, 0.6, 0.95])
@pytest.mark.parametrize("header_prefix_bytes", [1024, 65536], ids=["prefix-1k", "prefix-64k"])
def test_files_cut_short_are_unreadable(
    staging_root: Path, classify: Classify, bundled: str, kept_fraction: float, header_prefix_bytes: int
) -> None:
    data = Path(get_testdata_file(bundled, download=False)).read_bytes()
    (staging_root / "cut.dcm").write_bytes(data[: int(len(data) * kept_fraction)])
    (staging_root / "whole.dcm").write_bytes(data)

    assert classify("cut.dcm", header_prefix_bytes=header_prefix_bytes).record.reason is Reason.UNREADABLE
    assert classify("whole.dcm", header_prefix_bytes=header_prefix_bytes).record.reason is Reason.VALID


def test_header_larger_than_the_prefix_is_read_from_the_file(staging_root: Path, classify: Classify) -> None:
    dataset = make_dataset(study_uid=uid(2), sop_uid=uid(2, 1))
    dataset.add_new(0x00091010, "OB", b"x" * 20_000)  # a private element larger than the prefix
    dataset.save_as(staging_root / "big-header.dcm", enforce_file_format=True)
    data = (staging_root / "big-header.dcm").read_bytes()
    (staging_root / "big-header-cut.dcm").write_bytes(data[:15_000])

    assert classify("big-header.dcm", header_prefix_bytes=4096).record.reason is Reason.VALID
    assert classify("big-header-cut.dcm", header_prefix_bytes=4096).record.reason is Reason.UNREADABLE


def test_empty_file_is_zero_byte(staging_root: Path, classify: Classify) -> None:
    (staging_root / "empty.dcm").touch()

    assert classify("empty.dcm").record.reason is Reason.ZERO_BYTE


@pytest.mark.parametrize("bundled", ["no_meta_group_length.dcm", "meta_missing_tsyntax.dcm"])
def test_bundled_files_without_study_uid(staging_root: Path, classify: Classify, bundled: str) -> None:
    copy_bundled(bundled, staging_root / bundled)

    assert classify(bundled).record.reason is Reason.MISSING_STUDY_UID


def test_generated_file_without_study_uid(staging_root: Path, classify: Classify) -> None:
    write_instance(staging_root / "a.dcm", study_uid="", sop_uid=uid(3, 1))

    record = classify("a.dcm").record

    assert record.reason is Reason.MISSING_STUDY_UID
    assert record.message == "a.dcm: no StudyInstanceUID"


def test_generated_file_without_sop_uid(staging_root: Path, classify: Classify) -> None:
    write_instance(staging_root / "a.dcm", study_uid=uid(4), sop_uid="")

    record = classify("a.dcm").record

    assert record.reason is Reason.MISSING_SOP_UID
    assert record.study_uid == uid(4)


@pytest.mark.parametrize("bundled", ["DICOMDIR", "DICOMDIR-empty.dcm"])
def test_dicomdir_is_recognised_by_its_sop_class(
    staging_root: Path, classify: Classify, bundled: str
) -> None:
    copy_bundled(bundled, staging_root / "media" / "DIR.dcm")

    assert classify("media/DIR.dcm").record.reason is Reason.DICOMDIR


def test_file_over_the_size_limit_is_too_large_and_not_read(staging_root: Path, classify: Classify) -> None:
    (staging_root / "huge.dcm").write_bytes(b"\x00" * 2048)  # not DICOM: proves it is never parsed

    record = classify("huge.dcm", max_file_size=1024).record

    assert record.reason is Reason.TOO_LARGE
    assert "2048 bytes" in record.message


def test_link_leaving_the_root_is_outside_root(
    staging_root: Path, tmp_path: Path, classify: Classify
) -> None:
    outside = write_instance(tmp_path / "elsewhere" / "secret.dcm", study_uid=uid(5), sop_uid=uid(5, 1))
    os.symlink(outside, staging_root / "link.dcm")

    record = classify("link.dcm").record

    assert record.reason is Reason.OUTSIDE_ROOT
    assert record.sop_uid is None


def test_broken_link_and_fifo_are_unreadable(staging_root: Path, classify: Classify) -> None:
    os.symlink(staging_root / "missing.dcm", staging_root / "broken.dcm")
    os.mkfifo(staging_root / "pipe.dcm")

    assert classify("broken.dcm").record.reason is Reason.UNREADABLE
    assert classify("pipe.dcm").record.reason is Reason.UNREADABLE


def test_messages_and_logs_show_no_patient_data(staging_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    for name, study in (("ok.dcm", uid(6)), ("nostudy.dcm", "")):
        dataset = make_dataset(study_uid=study, sop_uid=uid(6, len(name)), patient_age="4X5", patient_sex="x")
        with odd_values_allowed():
            dataset.StudyDate = "1980013X"  # invalid DA: pydicom's own validation would quote it
            dataset.save_as(staging_root / name, enforce_file_format=True)
    source = StagingSource.from_uri(str(staging_root))
    classifier = HeaderClassifier(
        source,
        max_file_size=10**9,
        header_prefix_bytes=65536,
        tag_mapping={**DEFAULT_TAG_MAPPING, "study_date": "StudyDate"},
    )
    caplog.clear()
    caplog.set_level(logging.DEBUG)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [classifier.classify(entry) for entry in source.walk()]

    assert [result.record.reason for result in results] == [Reason.MISSING_STUDY_UID, Reason.VALID]
    assert results[1].order_fields["study_date"] == "1980013X"  # read for the order, and only there
    texts = [result.record.message for result in results] + [caplog.text] + [str(w.message) for w in caught]
    for secret in (PATIENT_NAME, PATIENT_ID, "19800101", "1980013X", "4X5", "'x'", "ACC-1"):
        assert not any(secret in text for text in texts), secret
    assert pydicom.config.settings.reading_validation_mode == pydicom.config.WARN  # restored afterwards


def test_record_round_trips_through_a_dict() -> None:
    record = InstanceRecord(
        relative_path="a/b.dcm",
        size=3,
        study_uid="1.2",
        sop_uid="1.2.3",
        reason=Reason.DUPLICATE,
        message="m",
    )

    assert InstanceRecord.from_dict(record.to_dict()) == record


def test_quiet_pydicom_silences_validation_and_restores_the_mode() -> None:
    before = pydicom.config.settings.reading_validation_mode

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_pydicom():
            inside = pydicom.config.settings.reading_validation_mode
            warnings.warn("Invalid value for VR PN: 'DOE^JANE'", UserWarning, stacklevel=1)

    assert inside == pydicom.config.IGNORE
    assert caught == []
    assert pydicom.config.settings.reading_validation_mode == before
