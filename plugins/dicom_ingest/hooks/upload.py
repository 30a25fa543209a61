"""How one instance travels from its source to the vendor's store.

:class:`HashingReader` streams a source with a known length (an S3 presigned PUT needs a
Content-Length, so a generator body will not do) and hashes what it hands out. An upload
strategy decides which calls move the bytes: :class:`SinglePutUpload` asks for one presigned
URL and PUTs the whole instance to it, which is what the vendor's current API offers. A
multipart strategy (the vendor's ``/upload/multipart/...`` endpoints) or an order-first one
(``POST /new-order`` before the uploads) plugs in beside it through the same
:class:`UploadTransport` calls without changing the hook's public methods.
"""

from __future__ import annotations

import hashlib
import io
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from tenacity import Retrying

from dicom_ingest.exceptions import DicomIngestError, DicomIngestIntegrityError, DicomIngestUrlExpiredError
from dicom_ingest.hooks.models import PresignedUrl, UploadResult

if TYPE_CHECKING:
    from collections.abc import Iterator

UploadSource = str | os.PathLike[str] | BinaryIO | Any
"""A local path, a binary file object, or an ``ObjectStoragePath`` (anything with ``open``/``stat``)."""


class HashingReader:
    """Hand out at most ``size`` bytes of a binary stream and MD5 them on the way.

    ``requests`` takes the Content-Length from ``len()`` and then calls :meth:`read` in
    blocks, so the instance is never held in memory. :meth:`rewind` restarts from the
    position the stream had when wrapped; a PUT is only ever retried from there.

    :param stream: an open binary stream, positioned where the instance starts.
    :param size: the number of bytes to send.
    """

    def __init__(self, stream: BinaryIO, size: int) -> None:
        self._stream = stream
        self.size = size
        self._start = stream.tell() if stream.seekable() else None
        self._digest = hashlib.md5(usedforsecurity=False)
        self.bytes_read = 0

    def __len__(self) -> int:
        return self.size

    def read(self, amount: int | None = -1) -> bytes:
        """Return the next block (never past ``size``) and add it to the hash.

        :param amount: the most bytes wanted; ``-1`` or ``None`` for the rest.
        :raises DicomIngestIntegrityError: when the stream ends before ``size`` bytes.
        """
        remaining = self.size - self.bytes_read
        if remaining <= 0:
            return b""
        wanted = remaining if amount is None or amount < 0 else min(amount, remaining)
        chunk = self._stream.read(wanted)
        if not chunk:
            # Sending fewer bytes than the announced Content-Length would only end in a timeout.
            raise DicomIngestIntegrityError(
                f"The source ended after {self.bytes_read} of {self.size} bytes",
                expected_md5=self.md5,
                etag=None,
            )
        self._digest.update(chunk)
        self.bytes_read += len(chunk)
        return chunk

    def rewind(self) -> None:
        """Go back to the start of the instance and reset the hash, before a (re)try.

        :raises DicomIngestError: when bytes were already read from a stream that cannot seek.
        """
        if self.bytes_read == 0:
            return
        if self._start is None:
            raise DicomIngestError("The source stream cannot seek back to its start, so it cannot be re-sent")
        self._stream.seek(self._start)
        self._digest = hashlib.md5(usedforsecurity=False)
        self.bytes_read = 0

    @property
    def md5(self) -> str:
        """Hex MD5 of the bytes read since the last rewind."""
        return self._digest.hexdigest()


@contextmanager
def open_source(source: UploadSource, size: int | None = None) -> Iterator[HashingReader]:
    """Open an upload source as a :class:`HashingReader`; files opened here are closed afterwards.

    :param source: a path (``str`` or ``os.PathLike``), an ``ObjectStoragePath`` (or any object with
        ``open("rb")`` and ``stat()``), or a binary file object positioned at the instance's start
        (left open).
    :param size: the number of bytes to send; by default the file's size, or for a file object
        everything from its position to its end.
    """
    if isinstance(source, str | os.PathLike) and not hasattr(source, "stat"):
        source = Path(source)
    if hasattr(source, "read"):
        yield HashingReader(source, _remaining_size(source) if size is None else size)
        return
    with source.open("rb") as stream:
        yield HashingReader(stream, source.stat().st_size if size is None else size)


def _remaining_size(stream: BinaryIO) -> int:
    """Return the bytes from a seekable stream's position to its end, keeping the position."""
    if not stream.seekable():
        raise ValueError("size is required when uploading from a stream that cannot seek")
    start = stream.tell()
    end = stream.seek(0, io.SEEK_END)
    stream.seek(start)
    return end - start


class UploadTransport(Protocol):
    """The calls an upload strategy may make; the sync hook provides them."""

    def next_presigned_url(self) -> PresignedUrl:
        """Return a presigned PUT URL for a new instance (one requested ahead, or one attempt now)."""
        ...

    def put_object(self, target: PresignedUrl, body: HashingReader) -> str:
        """PUT ``body`` to ``target`` in a single attempt and return the store's ETag (unquoted)."""
        ...

    def retrying(self, operation: str) -> Retrying:
        """Return the retry policy of the connection for one logical operation."""
        ...

    def clock(self) -> float:
        """Return the transport's current clock reading in seconds."""
        ...


class UploadStrategy(Protocol):
    """Moves one instance's bytes to the vendor and reports how it went."""

    def upload(self, transport: UploadTransport, body: HashingReader) -> UploadResult:
        """Send ``body`` through ``transport``.

        :param transport: the hook's calls.
        :param body: the instance stream, at its start.
        """
        ...


class SinglePutUpload:
    """One presigned URL, one PUT of the whole instance, retried from the start of the stream.

    A retry re-uses the URL while it is valid, so a re-sent instance lands on the same key; a URL
    the store calls expired is replaced by a fresh one, never retried.
    """

    def upload(self, transport: UploadTransport, body: HashingReader) -> UploadResult:
        """Presign, PUT, and check the ETag against the MD5 of what was sent.

        :param transport: the hook's calls.
        :param body: the instance stream, at its start.
        :raises DicomIngestIntegrityError: when the store's ETag is not the MD5 of the bytes sent.
        """
        started = transport.clock()
        attempts = 0
        target: PresignedUrl | None = None
        key = etag = ""
        for attempt in transport.retrying("upload"):
            with attempt:
                attempts += 1
                if target is None or not target.is_usable(transport.clock()):
                    target = transport.next_presigned_url()
                body.rewind()
                try:
                    etag = transport.put_object(target, body)
                except DicomIngestUrlExpiredError:
                    target = None
                    raise
                key = target.key
        check_integrity(body, etag)
        return UploadResult(
            key=key,
            size=body.size,
            md5=body.md5,
            etag=etag,
            attempts=attempts,
            seconds=transport.clock() - started,
        )


def check_integrity(body: HashingReader, etag: str) -> None:
    """Refuse an upload whose byte count or ETag does not match what the stream produced.

    :param body: the stream after a completed PUT.
    :param etag: the store's ETag, unquoted.
    :raises DicomIngestIntegrityError: on a short source or an ETag other than the MD5.
    """
    if body.bytes_read != body.size:
        raise DicomIngestIntegrityError(
            f"The source ended after {body.bytes_read} of {body.size} bytes", expected_md5=body.md5, etag=etag
        )
    if etag.lower() != body.md5:
        raise DicomIngestIntegrityError(
            "The store's ETag does not match the MD5 of the bytes sent", expected_md5=body.md5, etag=etag
        )
