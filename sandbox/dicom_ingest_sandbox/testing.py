"""A harness for tests, the demo and benchmarks: run a sandbox process, drive it, make DICOM files.

::

    with running_sandbox(tmp_path, quiet_period=1, processing_time=0.5) as sandbox:
        token = sandbox.token()
        key = sandbox.put_object(build_instance(study_uid=new_uid()), token)
        sandbox.wait_for(lambda state: state["orders"])

Everything here talks to the sandbox over HTTP, as any client would; only the DICOM builder
uses pydicom.
"""

from __future__ import annotations

import collections
import io
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import requests
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicom_ingest_sandbox.config import ADMIN_TOKEN_ENV, CLIENT_SECRET_ENV, READY_PREFIX, UPLOAD_CONTENT_TYPE

_OUTPUT_LINES_KEPT = 2000
_STOP_TIMEOUT_SECONDS = 15.0
_REQUEST_TIMEOUT_SECONDS = 30.0

T = TypeVar("T")


class SandboxError(RuntimeError):
    """The sandbox process did not start, or an admin call failed."""


@dataclass
class Sandbox:
    """A running sandbox process and the credentials to use it.

    Admin calls raise :class:`SandboxError` on any non-2xx answer.
    """

    base_url: str
    client_id: str
    client_secret: str = field(repr=False)
    admin_token: str = field(repr=False)
    data_dir: Path
    process: subprocess.Popen[str] = field(repr=False)
    _output: collections.deque[str] = field(repr=False)
    _reader: threading.Thread = field(repr=False)
    _session: requests.Session = field(default_factory=requests.Session, repr=False)

    @property
    def pid(self) -> int:
        """Return the sandbox process's id."""
        return self.process.pid

    @property
    def audit_path(self) -> Path:
        """Return the audit log's path."""
        return self.data_dir / "audit.jsonl"

    def output(self) -> str:
        """Return what the process printed so far (stdout and stderr, the last lines)."""
        return "\n".join(self._output)

    def _admin(self, method: str, path: str, payload: Any = None) -> Any:
        """Call an admin endpoint and return its JSON answer."""
        response = self._session.request(
            method,
            f"{self.base_url}{path}",
            json=payload,
            headers={"X-Admin-Token": self.admin_token},
            timeout=_REQUEST_TIMEOUT_SECONDS,
        )
        if not response.ok:
            raise SandboxError(f"{method} {path} answered {response.status_code}: {response.text[:500]}")
        return response.json()

    def state(self) -> dict[str, Any]:
        """Return ``GET /_sandbox/state``: orders, objects, audit events, call counts and faults."""
        return self._admin("GET", "/_sandbox/state")

    def summary(self) -> dict[str, Any]:
        """Return ``GET /_sandbox/summary``: counts of objects, orders and calls, and the process ids.

        Cheap even with many objects, unlike :meth:`state`.
        """
        return self._admin("GET", "/_sandbox/summary")

    def faults(self, *specs: dict[str, Any]) -> dict[str, Any]:
        """Post fault specs (see the README) and return the faults now in force.

        :param specs: one or more fault objects.
        """
        return self._admin("POST", "/_sandbox/faults", list(specs))

    def clear_faults(self) -> None:
        """Remove every fault."""
        self._admin("DELETE", "/_sandbox/faults")

    def clock_settings(self) -> dict[str, Any]:
        """Return the clocks and required metadata in force."""
        return self._admin("GET", "/_sandbox/config")

    def configure(self, **clocks: Any) -> None:
        """Change clocks at run time, e.g. ``configure(quiet_period=0.5, required_metadata=[])``.

        :param clocks: any of token_ttl, url_ttl, metadata_deadline, overwrite_window,
            quiet_period, processing_time, required_metadata.
        """
        self._admin("POST", "/_sandbox/config", clocks)

    @contextmanager
    def clocks(self, **clocks: Any) -> Iterator[None]:
        """Change clocks for the duration of a ``with`` block, then restore the previous values.

        :param clocks: as for :meth:`configure`.
        """
        previous = self.clock_settings()
        self.configure(**clocks)
        try:
            yield
        finally:
            self.configure(**{name: previous[name] for name in clocks})

    def reset(self) -> None:
        """Forget faults, call counts, orders, objects and audit events, and empty the store."""
        self._admin("POST", "/_sandbox/reset")

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], T], timeout: float = 30, interval: float = 0.2
    ) -> T:
        """Poll :meth:`state` until ``predicate(state)`` is truthy, and return that value.

        :param predicate: a function of the state document.
        :param timeout: seconds before giving up.
        :param interval: seconds between polls.
        :raises TimeoutError: when the predicate stays falsy.
        """
        deadline = time.monotonic() + timeout
        while True:
            result = predicate(self.state())
            if result:
                return result
            if time.monotonic() >= deadline:
                raise TimeoutError(f"sandbox state did not satisfy the condition within {timeout} s")
            time.sleep(interval)

    def token(self, scope: str | None = None) -> str:
        """Get an access token the way the vendor documents it (GET, HTTP Basic credentials).

        :param scope: a space-separated scope list; all scopes when None.
        """
        params = {"grant_type": "client_credentials"}
        if scope is not None:
            params["scope"] = scope
        response = self._session.get(
            f"{self.base_url}/oauth2/token",
            params=params,
            auth=(self.client_id, self.client_secret),
            timeout=_REQUEST_TIMEOUT_SECONDS,
        )
        response.raise_for_status()
        return response.json()["access_token"]

    def put_object(self, body: bytes, token: str) -> str:
        """Ask for a presigned URL and PUT ``body`` to it; return the object key.

        :param body: the object's bytes.
        :param token: an access token with the ``upload`` scope.
        :raises requests.HTTPError: when the API or the store refuses.
        """
        presigned = self._session.get(
            f"{self.base_url}/upload",
            headers={"Authorization": f"Bearer {token}"},
            timeout=_REQUEST_TIMEOUT_SECONDS,
        )
        presigned.raise_for_status()
        answer = presigned.json()
        stored = requests.put(
            answer["url"],
            data=body,
            headers={"Content-Type": UPLOAD_CONTENT_TYPE},
            timeout=_REQUEST_TIMEOUT_SECONDS,
        )
        stored.raise_for_status()
        return answer["key"]

    def stop(self) -> None:
        """Stop the process with SIGTERM (SIGKILL if it hangs) and wait for it."""
        self._session.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=_STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=_STOP_TIMEOUT_SECONDS)


def sandbox_command(data_dir: Path, **flags: Any) -> list[str]:
    """Return the command that starts a sandbox with the given flags.

    :param data_dir: the ``--data-dir``.
    :param flags: other flags by their Python names (``quiet_period=1`` → ``--quiet-period 1``);
        lists become comma-separated.
    """
    command = [sys.executable, "-m", "dicom_ingest_sandbox.cli", "--data-dir", str(data_dir)]
    for name, value in flags.items():
        text = ",".join(value) if isinstance(value, list | tuple) else str(value)
        command += [f"--{name.replace('_', '-')}", text]
    return command


def _read_output(process: subprocess.Popen[str], output: collections.deque[str], ready: list[str]) -> None:
    """Collect the process's output lines; note the ready line's URL when it appears."""
    assert process.stdout is not None
    for line in process.stdout:
        text = line.rstrip("\n")
        output.append(text)
        if not ready and text.startswith(READY_PREFIX):
            ready.append(text[len(READY_PREFIX) :].strip())


def start_sandbox(
    data_dir: Path, startup_timeout: float = 30.0, cwd: Path | None = None, **flags: Any
) -> Sandbox:
    """Start a sandbox process and wait for its ready line; the caller must :meth:`Sandbox.stop` it.

    Unless given, the port is a free one and the client secret and admin token are random.

    :param data_dir: the sandbox's data folder.
    :param startup_timeout: seconds to wait for the ready line.
    :param cwd: the working folder of the process.
    :param flags: command-line flags, see :func:`sandbox_command`.
    :raises SandboxError: when the process exits or is not ready in time.
    """
    client_secret = flags.pop("client_secret", None) or secrets.token_urlsafe(24)
    admin_token = flags.pop("admin_token", None) or secrets.token_urlsafe(24)
    settings = {"host": "127.0.0.1", "port": 0, "client_id": "test-client", "log_level": "WARNING", **flags}
    # The secrets go through the environment, so they never show in a process listing.
    environment = {**os.environ, CLIENT_SECRET_ENV: client_secret, ADMIN_TOKEN_ENV: admin_token}
    process = subprocess.Popen(
        sandbox_command(data_dir, **settings),
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=cwd,
    )
    output: collections.deque[str] = collections.deque(maxlen=_OUTPUT_LINES_KEPT)
    ready: list[str] = []
    reader = threading.Thread(target=_read_output, args=(process, output, ready), daemon=True)
    reader.start()
    sandbox = Sandbox(
        base_url="",
        client_id=settings["client_id"],
        client_secret=client_secret,
        admin_token=admin_token,
        data_dir=Path(data_dir),
        process=process,
        _output=output,
        _reader=reader,
    )
    deadline = time.monotonic() + startup_timeout
    while not ready:
        if process.poll() is not None or time.monotonic() >= deadline:
            sandbox.stop()
            raise SandboxError(f"the sandbox did not become ready:\n{sandbox.output()}")
        time.sleep(0.02)
    sandbox.base_url = ready[0]
    return sandbox


@contextmanager
def running_sandbox(data_dir: Path, **flags: Any) -> Iterator[Sandbox]:
    """Run a sandbox process for the duration of a ``with`` block.

    :param data_dir: the sandbox's data folder.
    :param flags: as for :func:`start_sandbox`.
    """
    sandbox = start_sandbox(data_dir, **flags)
    try:
        yield sandbox
    finally:
        sandbox.stop()


def new_uid() -> str:
    """Return a fresh DICOM UID."""
    return generate_uid()


def build_instance(
    study_uid: str,
    sop_instance_uid: str | None = None,
    *,
    series_uid: str | None = None,
    patient_age: str | None = "045Y",
    patient_sex: str | None = "F",
    accession_number: str | None = None,
    patient_name: str = "Testpatient^Alex",
    patient_id: str = "SANDBOX-0001",
    patient_birth_date: str = "19800101",
    size: int = 16,
) -> bytes:
    """Return a small DICOM Part 10 CT instance with fake patient data.

    Pass None for ``patient_age``, ``patient_sex`` or ``accession_number`` to leave the tag out.

    :param study_uid: the StudyInstanceUID.
    :param sop_instance_uid: the SOPInstanceUID; a fresh one when None.
    :param series_uid: the SeriesInstanceUID; a fresh one when None.
    :param patient_age: PatientAge as a DICOM Age String, e.g. ``"045Y"``.
    :param patient_sex: PatientSex, e.g. ``"F"``.
    :param accession_number: AccessionNumber.
    :param patient_name: PatientName (fake).
    :param patient_id: PatientID (fake).
    :param patient_birth_date: PatientBirthDate (fake).
    :param size: rows and columns of the blank 16-bit image.
    """
    sop_instance_uid = sop_instance_uid or new_uid()
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = CTImageStorage
    file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = file_meta
    dataset.SOPClassUID = CTImageStorage
    dataset.SOPInstanceUID = sop_instance_uid
    dataset.StudyInstanceUID = study_uid
    dataset.SeriesInstanceUID = series_uid or new_uid()
    dataset.Modality = "CT"
    dataset.PatientName = patient_name
    dataset.PatientID = patient_id
    dataset.PatientBirthDate = patient_birth_date
    optional_tags = {
        "PatientAge": patient_age,
        "PatientSex": patient_sex,
        "AccessionNumber": accession_number,
    }
    for keyword, value in optional_tags.items():
        if value is not None:
            setattr(dataset, keyword, value)
    dataset.Rows = dataset.Columns = size
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = dataset.BitsStored = 16
    dataset.HighBit = 15
    dataset.PixelRepresentation = 0
    dataset.PixelData = bytes(size * size * 2)
    buffer = io.BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()
