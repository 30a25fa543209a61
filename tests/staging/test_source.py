"""Listing a local staging area: order, links, special files, URIs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dicom_ingest.staging.errors import StagingSourceError
from dicom_ingest.staging.source import EntryKind, SourceEntry, StagingSource


def _tree(root: Path, files: dict[str, bytes]) -> None:
    for relative_path, content in files.items():
        path = root / relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def test_walk_is_depth_first_sorted_by_name_with_sizes(staging_root: Path) -> None:
    _tree(
        staging_root,
        {"b/2.dcm": b"22", "a/z.dcm": b"z", "a/sub/x.dcm": b"xxx", "c.dcm": b"", "a/b.dcm": b"bb"},
    )

    entries = list(StagingSource.from_uri(str(staging_root)).walk())

    assert entries == [
        SourceEntry("a/b.dcm", 2),
        SourceEntry("a/sub/x.dcm", 3),
        SourceEntry("a/z.dcm", 1),
        SourceEntry("b/2.dcm", 2),
        SourceEntry("c.dcm", 0),
    ]


def test_file_uri_and_plain_path_list_the_same(staging_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tree(staging_root, {"x y/1.dcm": b"1"})
    monkeypatch.chdir(staging_root.parent)

    by_uri = list(StagingSource.from_uri(f"file://{staging_root}").walk())
    by_relative_path = list(StagingSource.from_uri(staging_root.name).walk())

    assert by_uri == by_relative_path == [SourceEntry("x y/1.dcm", 1)]


def test_links_are_judged_by_their_target(staging_root: Path, tmp_path: Path) -> None:
    _tree(staging_root, {"real/a.dcm": b"aaaa"})
    _tree(tmp_path / "outside", {"secret.dcm": b"s", "dir/s.dcm": b"s"})
    os.symlink(staging_root / "real" / "a.dcm", staging_root / "link-inside.dcm")
    os.symlink(staging_root / "real", staging_root / "link-to-real")
    os.symlink(tmp_path / "outside" / "secret.dcm", staging_root / "link-outside.dcm")
    os.symlink(tmp_path / "outside" / "dir", staging_root / "link-outside-dir")
    os.symlink("../outside/secret.dcm", staging_root / "relative-escape.dcm")
    os.symlink(staging_root / "gone.dcm", staging_root / "broken.dcm")

    entries = {entry.relative_path: entry for entry in StagingSource.from_uri(str(staging_root)).walk()}

    assert entries == {
        "broken.dcm": SourceEntry("broken.dcm", 0, EntryKind.BROKEN_LINK),
        "link-inside.dcm": SourceEntry("link-inside.dcm", 4),
        "link-outside-dir": SourceEntry("link-outside-dir", 0, EntryKind.OUTSIDE_ROOT),
        "link-outside.dcm": SourceEntry("link-outside.dcm", 0, EntryKind.OUTSIDE_ROOT),
        "real/a.dcm": SourceEntry("real/a.dcm", 4),
        "relative-escape.dcm": SourceEntry("relative-escape.dcm", 0, EntryKind.OUTSIDE_ROOT),
    }


def test_special_files_are_listed_not_opened(staging_root: Path) -> None:
    os.mkfifo(staging_root / "pipe")

    assert list(StagingSource.from_uri(str(staging_root)).walk()) == [
        SourceEntry("pipe", 0, EntryKind.SPECIAL)
    ]


@pytest.mark.parametrize("missing", ["does-not-exist", "file.dcm"])
def test_missing_root_or_file_root_is_an_error(staging_root: Path, missing: str) -> None:
    (staging_root / "file.dcm").write_bytes(b"x")

    with pytest.raises(StagingSourceError, match="not an existing folder"):
        list(StagingSource.from_uri(str(staging_root / missing)).walk())


def test_empty_uri_is_refused() -> None:
    with pytest.raises(StagingSourceError, match="empty"):
        StagingSource.from_uri("  ")


def test_open_reads_below_the_root(staging_root: Path) -> None:
    _tree(staging_root, {"a/b.dcm": b"content"})
    source = StagingSource.from_uri(str(staging_root))

    with source.open("a/b.dcm", block_size=4) as stream:
        assert stream.read() == b"content"
    assert source.path("a/b.dcm").read_bytes() == b"content"
