"""The parts of the hook and of the staging area the batch uploader uses.

:class:`~dicom_ingest.hooks.dicom_ingest.DicomIngestHook` and
:class:`~dicom_ingest.staging.source.StagingSource` provide them; unit tests pass stand-ins.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

if TYPE_CHECKING:
    from dicom_ingest.hooks.models import OrderStatus, UploadResult


class UploadLookahead(Protocol):
    """Work a client may prepare ahead of the uploads announced to it (presigned URLs)."""

    def expect(self, uploads: int) -> None:
        """Announce uploads still to come.

        :param uploads: how many.
        """
        ...


class VendorClient(Protocol):
    """The vendor calls a batch upload makes (thread-safe: upload workers share one client)."""

    def presigning_ahead(self, uploads_at_once: int | None = None) -> AbstractContextManager[UploadLookahead]:
        """Within the block, uploads may use presigned URLs requested while earlier ones were sending.

        :param uploads_at_once: the uploads that run at once; no more URLs are requested ahead.
        """
        ...

    def upload_instance(self, source: BinaryIO, *, size: int | None = None) -> UploadResult:
        """Stream one instance to the vendor's store, with the connection's retries.

        :param source: the open instance, at its start.
        :param size: bytes to send.
        """
        ...

    def order_ids(self, study_uid: str) -> list[str]:
        """Return the ids of a study's orders, oldest first.

        :param study_uid: the StudyInstanceUID.
        :raises DicomIngestOrderNotFoundError: when the vendor knows no order of the study (yet).
        """
        ...

    def add_metadata(
        self, *, order_id: str | None = None, study_uid: str | None = None, metadata: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Merge metadata into an order.

        :param order_id: the order.
        :param study_uid: the study (its most recent order), when the order id is unknown.
        :param metadata: the fields.
        """
        ...

    def get_status(self, *, order_id: str | None = None, study_uid: str | None = None) -> OrderStatus:
        """Return an order's status.

        :param order_id: the order.
        :param study_uid: the study (its most recent order), when the order id is unknown.
        """
        ...


class StagedFiles(Protocol):
    """Where a plan's instances are read from."""

    def open(self, relative_path: str) -> BinaryIO:
        """Open a staged file for streaming.

        :param relative_path: the path below the staging root, as the plan lists it.
        """
        ...
