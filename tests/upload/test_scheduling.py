"""The order in which instances go out: study by study, and never stuck behind another study's big file."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from dicom_ingest.ledger import Ledger, StudyState
from dicom_ingest.upload import BatchUploader
from tests.upload.support import SITE, FakeVendor, Patch, record_plan, sop_uid, stage_study, study_uid

BIG_FILE_BYTES = 4 * 1024 * 1024


def test_the_next_study_does_not_wait_behind_a_large_file(
    make_uploader: Callable[..., BatchUploader], vendor: FakeVendor, ledger: Ledger, staging_root: Path
) -> None:
    big_study = stage_study(staging_root, 1, 3, sizes={0: BIG_FILE_BYTES})
    next_study = stage_study(staging_root, 2, 3)
    record_plan(ledger, [big_study, next_study])
    # The big file's upload only ends once the next study's last instance has started: an
    # uploader that held the next study back until the big file was done would never open it.
    big_file_done = vendor.gates[sop_uid(1, 0)] = threading.Event()
    # The other worker's first upload waits for the big file's to start, so a worker descheduled
    # between taking the big file and starting it cannot see the next study start first.
    big_file_started = vendor.gates[sop_uid(1, 1)] = threading.Event()
    started_events = {sop_uid(1, 0): big_file_started, sop_uid(2, 2): big_file_done}
    vendor.start_listeners.append(lambda sop: started_events[sop].set() if sop in started_events else None)

    result = make_uploader(concurrency=2).run([big_study, next_study])

    assert vendor.gate_timeouts == []
    assert vendor.started_studies() == [study_uid(1)] * 3 + [study_uid(2)] * 3
    assert (result.uploaded, result.orders, result.failed) == (6, 2, 0)


def test_instances_go_out_study_after_study_in_plan_order(
    make_uploader: Callable[..., BatchUploader], vendor: FakeVendor, ledger: Ledger, staging_root: Path
) -> None:
    studies = [stage_study(staging_root, number, 3) for number in (4, 1, 3, 2)]
    record_plan(ledger, studies)

    make_uploader(concurrency=1).run(studies)

    assert vendor.put_starts == [instance.sop_uid for study in studies for instance in study.instances]


def test_a_study_gets_its_metadata_while_later_studies_are_still_uploading(
    make_uploader: Callable[..., BatchUploader], vendor: FakeVendor, ledger: Ledger, staging_root: Path
) -> None:
    first = stage_study(staging_root, 1, 2)
    second = stage_study(staging_root, 2, 3)
    record_plan(ledger, [first, second])
    # The second study's last instance waits for the first study's PATCH: metadata sent only at
    # the end of the batch would never arrive.
    first_patched = vendor.gates[sop_uid(2, 2)] = threading.Event()

    def on_patch(patch: Patch) -> None:
        if vendor.order_study[patch.order_id] == study_uid(1):
            first_patched.set()

    vendor.patch_listeners.append(on_patch)

    result = make_uploader(concurrency=2).run([first, second])

    assert vendor.gate_timeouts == []
    assert [vendor.order_study[order] for order in vendor.patched_orders()] == [study_uid(1), study_uid(2)]
    assert vendor.patches[0].metadata == {"patient_age": 45, "patient_sex": "F"}
    for study in (first, second):
        detail = ledger.study_detail(SITE, study.study_uid)
        assert detail is not None
        assert detail.state == StudyState.METADATA_SENT
        assert detail.order_id == vendor.orders[study.study_uid][-1]
    assert result.orders == 2


def test_every_instance_is_streamed_from_its_staged_file_and_recorded(
    make_uploader: Callable[..., BatchUploader], vendor: FakeVendor, ledger: Ledger, staging_root: Path
) -> None:
    study = stage_study(staging_root, 1, 4, sizes={2: 300_000})
    record_plan(ledger, [study])

    result = make_uploader(concurrency=3).run([study])

    detail = ledger.study_detail(SITE, study.study_uid)
    assert detail is not None
    order_id = vendor.orders[study.study_uid][0]
    assert vendor.filed[order_id] == {instance.sop_uid for instance in study.instances}
    assert {instance.sop_uid: instance.key for instance in detail.instances} == {
        instance.sop_uid: f"incoming/{instance.sop_uid}" for instance in study.instances
    }
    assert all(instance.md5 and instance.md5 == instance.etag for instance in detail.instances)
    assert (result.uploaded, result.bytes) == (4, study.bytes)


def test_the_next_study_is_claimed_before_the_workers_run_out_of_work(
    make_uploader: Callable[..., BatchUploader],
    vendor: FakeVendor,
    ledger: Ledger,
    staging_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first, second = (stage_study(staging_root, number, 2) for number in (1, 2))
    record_plan(ledger, [first, second])
    claimed: set[str] = set()
    second_claimed = threading.Event()
    claim_study = ledger.claim_study

    def spying_claim(site: str, study: str, *args: object, **kwargs: object) -> object:
        answer = claim_study(site, study, *args, **kwargs)
        claimed.add(study)
        if study == second.study_uid:
            second_claimed.set()
        return answer

    monkeypatch.setattr(ledger, "claim_study", spying_claim)
    # The one worker holds the first study's first instance until the second study is claimed:
    # an uploader that claims only once the queue is empty never gets there.
    vendor.gates[sop_uid(1, 0)] = second_claimed

    result = make_uploader(concurrency=1).run([first, second])

    assert vendor.gate_timeouts == []
    assert claimed == {first.study_uid, second.study_uid}
    assert (result.uploaded, result.orders) == (4, 2)
