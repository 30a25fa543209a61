"""The store watcher: every complete object is reported once, and an idle bucket is not listed again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dicom_ingest_sandbox import ingest
from dicom_ingest_sandbox.ingest import StoreWatcher


def _put(bucket: Path, key: str, body: bytes) -> None:
    """Write an object the way the store does: a hidden temporary file renamed into place."""
    target = bucket / key
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.partial")
    temporary.write_bytes(body)
    temporary.rename(target)


def _settle(*folders: Path) -> None:
    """Move the folders' modification times into the past, as if nothing had changed for a while."""
    for folder in folders:
        past = folder.stat().st_mtime_ns - int(10 * ingest.SETTLE_SECONDS * 1e9)
        os.utime(folder, ns=(past, past))


def _keys(watcher: StoreWatcher) -> list[str]:
    return [received.key for received in watcher.scan()]


def test_each_new_object_is_reported_once(tmp_path: Path) -> None:
    watcher = StoreWatcher(tmp_path)
    _put(tmp_path, "a/one.dcm", b"one")
    _put(tmp_path, "two.dcm", b"two")
    assert sorted(_keys(watcher)) == ["a/one.dcm", "two.dcm"]
    assert _keys(watcher) == []
    _put(tmp_path, "a/three.dcm", b"three")
    assert _keys(watcher) == ["a/three.dcm"]


def test_a_rewritten_object_is_reported_again_with_its_new_content(tmp_path: Path) -> None:
    watcher = StoreWatcher(tmp_path)
    _put(tmp_path, "one.dcm", b"first")
    assert _keys(watcher) == ["one.dcm"]
    _put(tmp_path, "one.dcm", b"second body")
    [received] = watcher.scan()
    assert (received.key, received.size) == ("one.dcm", len(b"second body"))


def test_temporary_files_are_not_objects(tmp_path: Path) -> None:
    watcher = StoreWatcher(tmp_path)
    (tmp_path / ".upload.partial").write_bytes(b"half")
    (tmp_path / "x.partial").write_bytes(b"half")
    assert _keys(watcher) == []


def test_an_object_renamed_into_a_settled_looking_folder_is_still_found(tmp_path: Path) -> None:
    """A folder changed within the timestamp granularity must be listed again, even if its time looks old."""
    watcher = StoreWatcher(tmp_path)
    _put(tmp_path, "a/one.dcm", b"one")
    assert _keys(watcher) == ["a/one.dcm"]
    _put(tmp_path, "a/two.dcm", b"two")
    assert _keys(watcher) == ["a/two.dcm"]


def test_an_idle_bucket_is_not_listed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    watcher = StoreWatcher(tmp_path)
    for number in range(50):
        _put(tmp_path, f"a/{number}.dcm", b"x")
    assert len(watcher.scan()) == 50
    _settle(tmp_path, tmp_path / "a")
    assert _keys(watcher) == []  # notes the folders' settled times
    listed: list[str] = []
    real_scandir = os.scandir

    def counting_scandir(path: str) -> object:
        listed.append(path)
        return real_scandir(path)

    monkeypatch.setattr(ingest.os, "scandir", counting_scandir)
    assert _keys(watcher) == []
    assert listed == []
    _put(tmp_path, "a/new.dcm", b"new")
    assert _keys(watcher) == ["a/new.dcm"]
    assert listed == [os.fspath(tmp_path / "a")]


def test_forget_reports_everything_again(tmp_path: Path) -> None:
    watcher = StoreWatcher(tmp_path)
    _put(tmp_path, "one.dcm", b"one")
    assert _keys(watcher) == ["one.dcm"]
    _settle(tmp_path)
    watcher.forget()
    assert _keys(watcher) == ["one.dcm"]
