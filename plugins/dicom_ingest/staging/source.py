"""Open a staging area and stream its files.

A staging area is a URI: a plain path, a ``file://`` URI, or ``s3://[conn_id@]bucket/prefix``
(read through Airflow's :class:`~airflow.sdk.ObjectStoragePath` and the connection's
credentials; any other fsspec protocol Airflow knows works the same way). Templating such as
``.../{{ ds }}/`` is rendered by Airflow before the URI reaches this module.

Listing streams: folders are read one at a time (local ones with :func:`os.scandir`, remote ones
with one listing call per folder, whose cache is dropped right after), so memory depends on the
largest folder, not on the number of files. Entries are yielded in a deterministic order: each
folder's entries sorted by name, depth first.

Symbolic links (local staging only) are judged by their target: a link that leaves the staging
root is yielded as :attr:`EntryKind.OUTSIDE_ROOT` and never opened; a link to a file inside the
root is read like that file; a link to a folder inside the root is not followed, because that
folder is scanned in its own place anyway. Broken links and special files (sockets, pipes,
devices) are yielded with their own kinds so that they are classified, not dropped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO

from airflow.sdk import ObjectStoragePath

from dicom_ingest.staging.errors import StagingSourceError

LOCAL_PROTOCOLS = frozenset({"", "file", "local"})


class EntryKind(StrEnum):
    """What a listed entry is."""

    FILE = "file"
    OUTSIDE_ROOT = "outside_root"
    BROKEN_LINK = "broken_link"
    SPECIAL = "special"


@dataclass(frozen=True, slots=True)
class SourceEntry:
    """One listed entry of a staging area.

    :param relative_path: the path below the staging root, ``/``-separated.
    :param size: the size in bytes (of the link's target for links inside the root; 0 for
        entries that are not readable files).
    :param kind: whether this is a readable file or something to classify without reading.
    """

    relative_path: str
    size: int
    kind: EntryKind = EntryKind.FILE

    @property
    def name(self) -> str:
        """The file name, without folders."""
        return self.relative_path.rpartition("/")[2]

    @property
    def folder(self) -> str:
        """The folder below the root that holds the entry, ``""`` for the root itself."""
        return self.relative_path.rpartition("/")[0]


def to_storage_path(uri: str) -> ObjectStoragePath:
    """Return the :class:`ObjectStoragePath` for a URI or a plain (absolute or relative) path.

    :param uri: ``/data/x``, ``relative/x``, ``file:///data/x`` or ``s3://[conn_id@]bucket/prefix``.
    """
    text = uri.strip()
    if not text:
        raise StagingSourceError("the staging location is empty")
    if "://" not in text:
        text = f"file://{Path(text).expanduser().absolute()}"
    return ObjectStoragePath(text)


class StagingSource:
    """A staging area: list it, open its files.

    :param root: the staging root.
    """

    def __init__(self, root: ObjectStoragePath) -> None:
        self.root = root
        self.is_local = root.protocol in LOCAL_PROTOCOLS
        self._local_root = root.path.rstrip("/") or "/"

    @classmethod
    def from_uri(cls, uri: str) -> StagingSource:
        """Open the staging area at ``uri`` (see :func:`to_storage_path`).

        :param uri: the staging location.
        """
        return cls(to_storage_path(uri))

    @property
    def uri(self) -> str:
        """The staging root as a URI (with the connection id, never credentials)."""
        return str(self.root)

    def path(self, relative_path: str) -> ObjectStoragePath:
        """Return the storage path of a file below the root.

        :param relative_path: a path from :meth:`walk`.
        """
        return self.root / relative_path

    def open(self, relative_path: str, *, block_size: int | None = None) -> BinaryIO:
        """Open a file below the root for binary reading.

        :param relative_path: a path from :meth:`walk`.
        :param block_size: the read-ahead buffer size; small for header reads, default otherwise.
        """
        if self.is_local:
            buffering = block_size if block_size is not None else -1
            return open(os.path.join(self._local_root, relative_path), "rb", buffering=buffering)
        options: dict[str, Any] = {"block_size": block_size} if block_size else {}
        return self.path(relative_path).open("rb", **options)

    def read_prefix(self, relative_path: str, size: int) -> bytes:
        """Return the first ``size`` bytes of a file below the root (fewer if the file is shorter).

        An object store answers it with one ranged GET; opening the object as a file would cost
        a metadata request (HEAD) first.

        :param relative_path: a path from :meth:`walk`.
        :param size: how many bytes to read.
        """
        if self.is_local:
            with open(os.path.join(self._local_root, relative_path), "rb", buffering=size) as stream:
                return stream.read(size)
        path = self.path(relative_path)
        return path.fs.cat_file(path.path, start=0, end=size)

    def walk(self) -> Iterator[SourceEntry]:
        """Yield every entry below the root, depth first, each folder sorted by name.

        :raises StagingSourceError: the root does not exist, is not a folder, or cannot be listed.
        """
        if self.is_local:
            real_root = os.path.realpath(self._local_root)
            if not os.path.isdir(real_root):
                raise StagingSourceError(f"staging location {self.uri} is not an existing folder")
            yield from self._walk_local(real_root, "")
        else:
            yield from self._walk_remote(self.root.path.rstrip("/"), "")

    def _walk_local(self, real_root: str, folder: str) -> Iterator[SourceEntry]:
        directory = os.path.join(self._local_root, folder) if folder else self._local_root
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as exc:
            raise StagingSourceError(f"cannot list {self.uri}/{folder} ({type(exc).__name__})") from exc
        for entry in entries:
            relative_path = f"{folder}/{entry.name}" if folder else entry.name
            if entry.is_symlink():
                judged = self._judge_link(real_root, relative_path, entry.path)
                if judged is not None:
                    yield judged
            elif entry.is_dir(follow_symlinks=False):
                yield from self._walk_local(real_root, relative_path)
            elif entry.is_file(follow_symlinks=False):
                yield SourceEntry(relative_path, entry.stat(follow_symlinks=False).st_size)
            else:
                yield SourceEntry(relative_path, 0, EntryKind.SPECIAL)

    @staticmethod
    def _judge_link(real_root: str, relative_path: str, full_path: str) -> SourceEntry | None:
        """Classify a symbolic link by its target; ``None`` for a link to a folder inside the root."""
        target = os.path.realpath(full_path)
        if os.path.commonpath([real_root, target]) != real_root:
            return SourceEntry(relative_path, 0, EntryKind.OUTSIDE_ROOT)
        if os.path.isdir(target):
            return None
        if os.path.isfile(target):
            return SourceEntry(relative_path, os.stat(target).st_size)
        kind = EntryKind.SPECIAL if os.path.exists(target) else EntryKind.BROKEN_LINK
        return SourceEntry(relative_path, 0, kind)

    def _walk_remote(self, base: str, folder: str) -> Iterator[SourceEntry]:
        directory = f"{base}/{folder}" if folder else base
        filesystem = self.root.fs
        try:
            listing = filesystem.ls(directory, detail=True)
        except FileNotFoundError as exc:
            raise StagingSourceError(f"staging location {self.uri}/{folder} does not exist") from exc
        except OSError as exc:
            raise StagingSourceError(f"cannot list {self.uri}/{folder} ({type(exc).__name__})") from exc
        finally:
            filesystem.invalidate_cache(directory)
        children = sorted(
            (info["name"].rstrip("/"), info.get("type"), int(info.get("size") or 0)) for info in listing
        )
        del listing
        for full_name, kind, size in children:
            name = full_name.rpartition("/")[2]
            if full_name == directory or not name:
                continue
            relative_path = f"{folder}/{name}" if folder else name
            if kind == "directory":
                yield from self._walk_remote(base, relative_path)
            else:
                yield SourceEntry(relative_path, size)
