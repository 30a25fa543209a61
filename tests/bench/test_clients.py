"""The raw clients' one retry: when they send a file again, why, and how the report lists it.

The transport is faked: these tests are about the clients' decisions, not about HTTP.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
from urllib3.exceptions import ProtocolError

from bench.clients import ConnectionDropped, UploadRefused, VendorApi, _send_one
from bench.datasets import StagedFile
from bench.harness import Sample
from bench.run import CEILING, LOOPBACK, WAN, Report, UploadResults, build_parser, options_from

SIGNED_URL = "http://store.invalid/bucket/key?X-Amz-Signature=0123456789abcdef"
API = VendorApi("http://api.invalid", "client", "secret")


class FakeResponse:
    def __init__(self, status: int, *, text: str = "", json: Any = None, etag: str = "") -> None:
        self.status_code = status
        self.ok = status < 400
        self.text = text
        self._json = json
        self.headers = {"ETag": etag}

    def json(self) -> Any:
        return self._json


class FakeTransport:
    """Answers presigns with a signed URL and PUTs with what each test queues (a response or an error)."""

    def __init__(self, *put_outcomes: FakeResponse | BaseException) -> None:
        self.put_outcomes = list(put_outcomes)
        self.presigns = 0
        self.puts = 0

    def get(self, url: str, **_: Any) -> FakeResponse:
        self.presigns += 1
        return FakeResponse(200, json={"url": SIGNED_URL})

    def put(self, url: str, *, data: Any, **_: Any) -> FakeResponse:
        self.puts += 1
        data.read()
        outcome = self.put_outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


@pytest.fixture
def staged(tmp_path: Path) -> StagedFile:
    path = tmp_path / "instance.dcm"
    path.write_bytes(b"DICM" * 64)
    return StagedFile(path, path.stat().st_size)


def quick_options() -> Any:
    return options_from(build_parser().parse_args(["--quick"]))


def send(transport: FakeTransport, staged: StagedFile) -> str | None:
    return _send_one(transport.get, transport.put, API, "token", staged)


def test_a_first_success_is_not_retried(staged: StagedFile) -> None:
    transport = FakeTransport(FakeResponse(200))

    assert send(transport, staged) is None
    assert (transport.presigns, transport.puts) == (1, 1)


def test_a_dropped_connection_is_retried_and_named_by_call_and_classes_only(staged: StagedFile) -> None:
    dropped = requests.ConnectionError(
        ProtocolError(f"Connection aborted while sending {SIGNED_URL}", ConnectionResetError(104, "reset"))
    )
    transport = FakeTransport(dropped, FakeResponse(200))

    reason = send(transport, staged)

    assert reason == "PUT lost its connection (ConnectionError / ProtocolError / ConnectionResetError)"
    assert (transport.presigns, transport.puts) == (2, 2)


def test_a_server_error_is_retried_and_named_by_its_s3_code(staged: StagedFile) -> None:
    error_document = "<Error><Code>InternalError</Code><Message>Dir.Rename error</Message></Error>"
    transport = FakeTransport(FakeResponse(500, text=error_document), FakeResponse(200))

    assert send(transport, staged) == "PUT answered 500 (InternalError: Dir.Rename error)"
    assert transport.puts == 2


def test_a_client_error_is_not_retried(staged: StagedFile) -> None:
    transport = FakeTransport(FakeResponse(403, text="<Code>AccessDenied</Code><Message>no</Message>"))

    with pytest.raises(UploadRefused, match="PUT answered 403"):
        send(transport, staged)
    assert transport.puts == 1


def test_a_second_drop_fails_the_upload_without_the_url(staged: StagedFile) -> None:
    transport = FakeTransport(
        requests.ConnectionError(SIGNED_URL), requests.ConnectionError(f"again: {SIGNED_URL}")
    )

    with pytest.raises(ConnectionDropped) as raised:
        send(transport, staged)
    assert "Signature" not in str(raised.value)
    assert raised.value.__cause__ is None


def test_the_report_lists_each_rows_retry_reasons_across_its_runs() -> None:
    uploads = UploadResults()
    reason = "PUT answered 500 (InternalError: Dir.Rename error)"
    for reasons in ((reason,), (), (reason, "PUT lost its connection (ConnectionError)")):
        uploads.add(WAN, "20000x100KiB/200", Sample(CEILING, 1.0, 10, 1000, 0.1, 0.1, retry_reasons=reasons))
    uploads.add(LOOPBACK, "20000x100KiB/200", Sample(CEILING, 1.0, 10, 1000, 0.1, 0.1))
    report = Report(quick_options(), datetime.now(UTC), "machine", uploads=uploads)

    rendered = report.render("make bench")

    assert (
        f"- {WAN} 20000x100KiB/200 {CEILING}: 2 x {reason}; 1 x PUT lost its connection (ConnectionError)"
        in rendered
    )
    assert f"- {LOOPBACK} 20000x100KiB/200" not in rendered
    assert [row[-2] for row in report.upload_rows()] == ["3", "0"]


def test_the_report_has_no_retry_list_when_nothing_was_retried() -> None:
    uploads = UploadResults()
    uploads.add(WAN, "2000x512KiB/20", Sample(CEILING, 1.0, 10, 1000, 0.1, 0.1))
    report = Report(quick_options(), datetime.now(UTC), "machine", uploads=uploads)

    assert "re-sent" not in report.render("make bench")
