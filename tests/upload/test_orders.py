"""Resolving a study's order after its last instance, abandoned orders, and the vendor's 409."""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import pytest

from dicom_ingest.ledger import Ledger, StudyDetail, StudyState
from dicom_ingest.staging.plan import PlannedStudy
from dicom_ingest.upload import BatchUploader
from tests.upload.support import (
    BATCH,
    FAILED,
    OWNER,
    RUN,
    SITE,
    FakeClock,
    FakeSleep,
    FakeVendor,
    record_plan,
    record_sent,
    stage_study,
)

METADATA_WAIT = 30.0
FIRST_LOOKUP_WAIT = 0.1


def detail_of(ledger: Ledger, uid: str) -> StudyDetail:
    """Return the study's ledger record."""
    detail = ledger.study_detail(SITE, uid)
    assert detail is not None
    return detail


def fail_after_first_instance(
    ledger: Ledger, vendor: FakeVendor, study: PlannedStudy, *, known_order: str | None
) -> None:
    """Play an earlier try that sent one instance into ``order-old`` and failed; the vendor failed that order.

    :param ledger: the ledger.
    :param vendor: the stand-in vendor.
    :param study: the study.
    :param known_order: the order the ledger recorded for the failed try, if any.
    """
    earlier = ledger.claim_study(SITE, study.study_uid, RUN, BATCH, owner=OWNER)
    first = study.instances[0]
    record_sent(ledger, [first])
    ledger.mark_study_failed(SITE, study.study_uid, "upload_failed", known_order, token=earlier.token)
    vendor.add_order(study.study_uid, "order-old", status=FAILED, sops=[first.sop_uid])


def test_the_order_lookup_waits_with_gently_growing_backoff_while_the_vendor_files_the_instances(
    make_uploader: Callable[..., BatchUploader],
    vendor: FakeVendor,
    ledger: Ledger,
    staging_root: Path,
    sleep: FakeSleep,
) -> None:
    study = stage_study(staging_root, 1, 2)
    record_plan(ledger, [study])
    vendor.unfiled_lookups = 4

    result = make_uploader(metadata_wait=METADATA_WAIT).run([study])

    assert len(sleep.waits) == 4
    assert sleep.waits == sorted(sleep.waits) and sleep.waits[-1] > sleep.waits[0]
    # The last study's lookup ends every batch: it starts short and grows by at most half each
    # time, so an order the vendor files within 0.8 s is found by the fifth lookup.
    assert sleep.waits[0] <= FIRST_LOOKUP_WAIT
    assert all(later <= 1.5 * earlier + 1e-9 for earlier, later in pairwise(sleep.waits))
    assert sum(sleep.waits) < 1.0
    assert vendor.patched_orders() == vendor.orders[study.study_uid]
    assert (result.orders, result.failed) == (1, 0)


def test_a_study_whose_order_never_appears_fails_after_the_waiting_time_without_metadata(
    make_uploader: Callable[..., BatchUploader],
    vendor: FakeVendor,
    ledger: Ledger,
    staging_root: Path,
    clock: FakeClock,
) -> None:
    study = stage_study(staging_root, 1, 2)
    record_plan(ledger, [study])
    vendor.unfiled_lookups = 10_000
    started = clock()

    result = make_uploader(metadata_wait=METADATA_WAIT).run([study])

    assert dict(result.failures) == {study.study_uid: "order_not_found"}
    assert vendor.patches == []
    assert METADATA_WAIT <= clock() - started < METADATA_WAIT + 10
    assert detail_of(ledger, study.study_uid).state == StudyState.FAILED


def test_a_resend_that_opens_a_new_order_abandons_the_old_one_and_never_completes_it(
    make_uploader: Callable[..., BatchUploader], vendor: FakeVendor, ledger: Ledger, staging_root: Path
) -> None:
    study = stage_study(staging_root, 1, 3)
    record_plan(ledger, [study])
    # The ledger knows the earlier try's order; the vendor failed it since, so the re-send
    # opens a new one.
    fail_after_first_instance(ledger, vendor, study, known_order="order-old")

    result = make_uploader().run([study])

    new_order = vendor.orders[study.study_uid][-1]
    assert new_order != "order-old"
    assert vendor.filed[new_order] == {instance.sop_uid for instance in study.instances}
    assert vendor.patched_orders() == [new_order]
    detail = detail_of(ledger, study.study_uid)
    assert (detail.state, detail.order_id, detail.abandoned_order_ids) == (
        StudyState.METADATA_SENT,
        new_order,
        ["order-old"],
    )
    assert result.orders == 1


def test_a_resend_waits_for_its_new_order_rather_than_taking_the_old_one(
    make_uploader: Callable[..., BatchUploader],
    vendor: FakeVendor,
    ledger: Ledger,
    staging_root: Path,
    sleep: FakeSleep,
) -> None:
    study = stage_study(staging_root, 1, 2)
    record_plan(ledger, [study])
    fail_after_first_instance(ledger, vendor, study, known_order=None)
    # The vendor lists the re-send's new order only after a few lookups.
    listed = vendor.order_ids
    lookups: list[int] = []

    def slow_listing(uid: str) -> list[str]:
        lookups.append(1)
        return listed(uid) if len(lookups) > 3 else ["order-old"]

    vendor.order_ids = slow_listing  # type: ignore[method-assign]

    make_uploader().run([study])

    new_order = vendor.orders[study.study_uid][-1]
    assert vendor.patched_orders() == [new_order]
    assert sleep.waits, "the uploader must wait for the new order instead of taking the old one"
    assert detail_of(ledger, study.study_uid).abandoned_order_ids == ["order-old"]


@pytest.mark.parametrize(
    ("metadata_complete", "state", "reason"),
    [
        pytest.param(True, StudyState.METADATA_SENT, None, id="complete-by-tags"),
        pytest.param(False, StudyState.FAILED, "metadata_rejected", id="incomplete"),
    ],
)
def test_a_409_counts_as_sent_only_when_the_vendor_has_complete_metadata(
    make_uploader: Callable[..., BatchUploader],
    vendor: FakeVendor,
    ledger: Ledger,
    staging_root: Path,
    metadata_complete: bool,
    state: str,
    reason: str | None,
) -> None:
    study = stage_study(staging_root, 1, 2)
    record_plan(ledger, [study])

    def order_moves_on(_: str) -> None:
        # Once the study's last instance is filed, the vendor starts processing before the PATCH.
        (order_id,) = vendor.orders[study.study_uid]
        if len(vendor.filed[order_id]) == len(study.instances):
            vendor.statuses[order_id] = "DX_STARTED"
            if metadata_complete:
                vendor.complete_by_tags.add(order_id)

    vendor.filed_listeners.append(order_moves_on)
    uploader = make_uploader(concurrency=1)

    result = uploader.run([study])

    detail = detail_of(ledger, study.study_uid)
    order_id = vendor.orders[study.study_uid][0]
    assert (detail.state, detail.reason, detail.order_id) == (state, reason, order_id)
    assert vendor.patches == []
    assert result.failed == (0 if metadata_complete else 1)


def test_a_study_without_metadata_to_send_gets_no_patch(
    make_uploader: Callable[..., BatchUploader], vendor: FakeVendor, ledger: Ledger, staging_root: Path
) -> None:
    study = stage_study(staging_root, 1, 2, metadata={})
    record_plan(ledger, [study])

    result = make_uploader().run([study])

    assert vendor.patches == []
    detail = detail_of(ledger, study.study_uid)
    assert (detail.state, detail.order_id) == (StudyState.METADATA_SENT, vendor.orders[study.study_uid][0])
    assert result.orders == 1
