"""What the ledger's claim answers make the uploader do: skip, leave, resume metadata, upload all."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from dicom_ingest.ledger import DEFAULT_LEASE, ClaimAction, Ledger, StudyState
from dicom_ingest.upload import BatchUploader
from tests.ledger.support import FakeClock as LedgerClock
from tests.upload.support import (
    BATCH,
    OWNER,
    RUN,
    SITE,
    FakeVendor,
    record_plan,
    record_sent,
    stage_study,
    study_uid,
)

OTHER_WORKER = "another-host:4242"


def test_each_claim_answer_is_followed(
    make_uploader: Callable[..., BatchUploader], vendor: FakeVendor, ledger: Ledger, staging_root: Path
) -> None:
    verified, held, busy, resumable, fresh = (stage_study(staging_root, number, 2) for number in range(1, 6))
    studies = [verified, held, busy, resumable, fresh]
    record_plan(ledger, studies)
    # verified: the vendor confirmed its order earlier.
    ledger.mark_verified(SITE, verified.study_uid, "order-earlier", "DELIVERED")
    # held: waiting for its metadata.
    ledger.hold_study(SITE, held.study_uid, RUN, "metadata_missing")
    # busy: another live worker is uploading it.
    assert (
        ledger.claim_study(SITE, busy.study_uid, RUN, BATCH, owner=OTHER_WORKER).action
        is ClaimAction.UPLOAD_ALL
    )
    # resumable: an earlier try uploaded every instance, then stopped before the metadata.
    earlier = ledger.claim_study(SITE, resumable.study_uid, RUN, BATCH, owner=OWNER)
    record_sent(ledger, resumable.instances)
    ledger.mark_study_uploaded(SITE, resumable.study_uid, token=earlier.token)
    vendor.add_order(resumable.study_uid, "order-resumable", sops=[i.sop_uid for i in resumable.instances])

    result = make_uploader().run(studies)

    assert vendor.started_studies() == [fresh.study_uid] * 2
    assert vendor.announced == [2]  # presigned URLs are prepared only for the study sent
    assert vendor.lookahead_depth == 2  # and no more ahead than the batch's uploads at once
    assert sorted(vendor.patched_orders()) == sorted(["order-resumable", vendor.orders[fresh.study_uid][0]])
    states = {study.study_uid: ledger.study_detail(SITE, study.study_uid) for study in studies}
    assert {uid: detail.state for uid, detail in states.items() if detail} == {
        verified.study_uid: StudyState.VERIFIED,
        held.study_uid: StudyState.HELD,
        busy.study_uid: StudyState.UPLOADING,
        resumable.study_uid: StudyState.METADATA_SENT,
        fresh.study_uid: StudyState.METADATA_SENT,
    }
    assert states[busy.study_uid].claim_owner == OTHER_WORKER
    assert states[resumable.study_uid].order_id == "order-resumable"
    xcom = result.to_xcom()
    assert isinstance(xcom.pop("seconds"), float)
    assert xcom == {
        "batch_id": BATCH,
        "index": 0,
        "studies": 5,
        "instances": 10,
        "uploaded": 2,
        "skipped_done": 1,
        "failed": 0,
        "held": 1,
        "busy": 1,
        "bytes": fresh.bytes,
        "orders": 2,
    }


def test_a_second_run_of_a_finished_batch_sends_nothing(
    make_uploader: Callable[..., BatchUploader], vendor: FakeVendor, ledger: Ledger, staging_root: Path
) -> None:
    studies = [stage_study(staging_root, number, 3) for number in (1, 2)]
    record_plan(ledger, studies)
    first = make_uploader().run(studies)
    starts, patches = list(vendor.put_starts), list(vendor.patches)

    second = make_uploader().run(studies)

    assert (first.uploaded, first.orders) == (6, 2)
    assert (second.uploaded, second.orders, second.skipped_done) == (0, 0, 2)
    assert (vendor.put_starts, vendor.patches) == (starts, patches)
    assert vendor.announced == [3, 3]  # no presigned URL is prepared for the second run


def test_a_retry_takes_its_own_interrupted_study_back_at_once_and_resends_it_whole(
    make_uploader: Callable[..., BatchUploader], vendor: FakeVendor, ledger: Ledger, staging_root: Path
) -> None:
    study = stage_study(staging_root, 1, 4)
    record_plan(ledger, [study])
    # An earlier try of the same batch claimed the study, sent two instances and died; its
    # claim is still within the lease.
    ledger.claim_study(SITE, study.study_uid, RUN, BATCH, owner=OWNER)
    record_sent(ledger, study.instances[:2])
    vendor.add_order(study.study_uid, "order-partial", sops=[i.sop_uid for i in study.instances[:2]])

    result = make_uploader().run([study])

    assert sorted(vendor.put_starts) == sorted(instance.sop_uid for instance in study.instances)
    assert vendor.orders[study_uid(1)] == ["order-partial"]
    assert vendor.patched_orders() == ["order-partial"]
    detail = ledger.study_detail(SITE, study.study_uid)
    assert detail is not None
    assert (detail.state, detail.resend_count, detail.abandoned_order_ids) == (
        StudyState.METADATA_SENT,
        1,
        [],
    )
    assert (result.uploaded, result.busy, result.orders) == (4, 0, 1)


class TakeoverLedger(Ledger):
    """A ledger on which another worker takes a study over, past the lease, at its next renewal.

    :param clock: the ledger's clock, moved past the lease for the takeover.
    """

    def __init__(self, url: str, clock: LedgerClock) -> None:
        super().__init__(url, clock=clock)
        self._clock_to_move = clock
        self.study_to_take: str | None = None
        self.took_over = False

    def renew_claim(self, site_id: str, study_uid: str, token: str) -> None:
        if study_uid == self.study_to_take:
            self.study_to_take = None
            self._clock_to_move.advance(DEFAULT_LEASE * 2)
            self.took_over = self.claim_study(site_id, study_uid, RUN, BATCH, owner=OTHER_WORKER).took_over
        super().renew_claim(site_id, study_uid, token)


class LogLineEvent(logging.Handler):
    """An event set once a log line containing ``text`` is emitted."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


def test_a_study_taken_over_by_another_worker_mid_upload_is_left_to_it(
    make_uploader: Callable[..., BatchUploader], vendor: FakeVendor, folder: Path, staging_root: Path
) -> None:
    ledger = TakeoverLedger(f"sqlite:///{folder / 'takeover.sqlite3'}", LedgerClock())
    study = stage_study(staging_root, 1, 3)
    record_plan(ledger, [study])
    first_sop = study.instances[0].sop_uid
    # The worker stalls on the study's first instance until the uploader has let the study go.
    vendor.start_listeners.append(
        lambda sop: setattr(ledger, "study_to_take", study.study_uid) if sop == first_sop else None
    )
    let_go = LogLineEvent("another worker took it over")
    vendor.gates[first_sop] = let_go.seen
    engine_log = logging.getLogger("dicom_ingest.upload.engine")
    engine_log.addHandler(let_go)

    try:
        with ledger:
            result = make_uploader(concurrency=1, ledger=ledger, renew_interval=0.0).run([study])
            detail = ledger.study_detail(SITE, study.study_uid)
    finally:
        engine_log.removeHandler(let_go)

    assert ledger.took_over
    assert vendor.gate_timeouts == []
    assert vendor.put_starts == [first_sop]
    assert vendor.patches == []
    assert detail is not None
    assert (detail.state, detail.claim_owner) == (StudyState.UPLOADING, OTHER_WORKER)
    assert (result.busy, result.failed, result.orders) == (1, 0, 0)
