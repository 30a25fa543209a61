"""Run the demo site's DAG end to end against a local vendor sandbox (what ``make demo`` runs).

Steps, all on this machine and offline:

1. recreate the demo folder (``.demo/`` by default) and write a sample staging area into
   ``<demo>/staging/<day>/`` (:mod:`dicom_ingest_sandbox.samples`), with its manifest beside it;
2. start the sandbox on a free loopback port with short clocks (quiet period 5 s, processing 2 s);
3. point Airflow at ``<demo>/airflow-home`` (SQLite, no example DAGs, this repository's ``dags/``
   and ``plugins/``) and the connection ``dicom_ingest_default`` at the sandbox, through
   environment variables of the Airflow processes only;
4. ``airflow db migrate``, then ``airflow dags test dicom_ingest__demo <day>``;
5. print the run report from the site's reports folder and check the outcome against the
   manifest, through the sandbox's own state and the report, and check that neither Airflow's
   output nor the report contains the client secret;
6. stop the sandbox. Exit status 0 only when the run matched the manifest.

The client secret reaches Airflow through the environment, never the command line, and is
never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TextIO

from dicom_ingest.sites import load_sites, resolve_location
from dicom_ingest_sandbox.samples import SampleManifest, build_sample_staging
from dicom_ingest_sandbox.testing import Sandbox, SandboxError, running_sandbox

REPO_ROOT = Path(__file__).resolve().parent.parent
DAGS_FOLDER = REPO_ROOT / "dags"
PLUGINS_FOLDER = REPO_ROOT / "plugins"
DAG_FILE = DAGS_FOLDER / "dicom_ingest_sites.py"
SITES_FILE = REPO_ROOT / "include" / "sites.yaml"

SITE_ID = "demo"
DAG_ID = f"dicom_ingest__{SITE_ID}"
CONNECTION_ENV = "AIRFLOW_CONN_DICOM_INGEST_DEFAULT"
DEMO_ROOT_ENV = "DICOM_INGEST_DEMO_ROOT"
SITES_FILE_ENV = "DICOM_INGEST_SITES_FILE"
INHERITED_PREFIXES_DROPPED = ("AIRFLOW_", "DICOM_INGEST_")
"""Variables of the caller's environment that would point Airflow or the project elsewhere."""

SANDBOX_CLOCKS = {"quiet_period": 5, "processing_time": 2}
"""Short vendor clocks, so the run takes well under two minutes."""
DEFAULT_TIMEOUT_SECONDS = 600.0
STOP_TIMEOUT_SECONDS = 15.0
MARKER_FILE = ".dicom-ingest-demo"
"""Written into the demo folder, so that only a folder this script made is ever deleted."""

SUCCEEDED = "succeeded"
"""The status of a report of a run in which nothing failed."""

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_SETUP = 2
EXIT_INTERRUPTED = 130


class DemoSetupError(RuntimeError):
    """The demo cannot run here (missing DAG file, foreign folder, ...)."""


@dataclass(frozen=True)
class DemoLayout:
    """The folders and files of one demo folder.

    :param root: the demo folder.
    :param day: the logical date of the run, ``YYYY-MM-DD``.
    """

    root: Path
    day: str

    @property
    def airflow_home(self) -> Path:
        """Return ``AIRFLOW_HOME`` of the demo."""
        return self.root / "airflow-home"

    @property
    def sandbox_dir(self) -> Path:
        """Return the sandbox's data folder (store objects, audit log)."""
        return self.root / "sandbox"

    @property
    def staging(self) -> Path:
        """Return the staging area of the run's day, as the demo site's ``staging`` resolves it."""
        return self.root / "staging" / self.day

    @property
    def manifest(self) -> Path:
        """Return where the sample's manifest is written (outside the staging area)."""
        return self.root / "sample-manifest.json"

    @property
    def airflow_log(self) -> Path:
        """Return the file that keeps the Airflow commands' output."""
        return self.root / "airflow.log"

    def recreate(self) -> None:
        """Delete a previous demo folder and create an empty one.

        :raises DemoSetupError: the folder exists, is not empty and was not made by this script.
        """
        if self.root.exists():
            if any(self.root.iterdir()) and not (self.root / MARKER_FILE).exists():
                raise DemoSetupError(f"{self.root} exists and is not a demo folder; choose another --root")
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        (self.root / MARKER_FILE).write_text("Made by scripts/demo.py; deleted by the next demo run.\n")


def say(message: str = "") -> None:
    """Print one line of the demo's own output at once.

    :param message: the line.
    """
    print(message, flush=True)


def heading(title: str) -> None:
    """Print a section heading.

    :param title: the section's title.
    """
    say()
    say(f"== {title} ==")


def connection_json(sandbox: Sandbox) -> str:
    """Return the ``dicom_ingest_default`` connection to the sandbox, in Airflow's JSON form.

    :param sandbox: the running sandbox.
    """
    return json.dumps(
        {
            "conn_type": "dicom_ingest",
            "host": sandbox.base_url,
            "login": sandbox.client_id,
            "password": sandbox.client_secret,
        }
    )


def airflow_environment(layout: DemoLayout, connection: str) -> dict[str, str]:
    """Return the environment of the Airflow commands: the caller's, pointed at the demo folder.

    :param layout: the demo folder.
    :param connection: the vendor connection, as from :func:`connection_json`.
    """
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith(INHERITED_PREFIXES_DROPPED)
    }
    environment.update(
        {
            "AIRFLOW_HOME": str(layout.airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{layout.airflow_home / 'airflow.db'}",
            DEMO_ROOT_ENV: str(layout.root),
            SITES_FILE_ENV: str(SITES_FILE),
            CONNECTION_ENV: connection,
        }
    )
    return environment


def run_airflow(
    arguments: Sequence[str],
    environment: Mapping[str, str],
    log: TextIO,
    *,
    echo: bool,
    timeout: float,
) -> int:
    """Run one ``airflow`` command, copying its output to ``log`` (and the console when ``echo``).

    :param arguments: the arguments after ``airflow``.
    :param environment: the command's environment.
    :param log: where every output line is kept.
    :param echo: also print the output.
    :param timeout: seconds before the command is stopped.
    :return: the command's exit status (negative when it was stopped by a signal).
    """
    log.write(f"$ airflow {' '.join(arguments)}\n")
    log.flush()
    process = subprocess.Popen(
        [sys.executable, "-m", "airflow", *arguments],
        env=dict(environment),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO_ROOT,
    )
    timed_out = threading.Event()

    def stop_late() -> None:
        timed_out.set()
        process.terminate()

    watchdog = threading.Timer(timeout, stop_late)
    watchdog.start()
    try:
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
        status = process.wait()
    finally:
        watchdog.cancel()
        _stop(process)
    if timed_out.is_set():
        say(f"airflow {arguments[0]} was stopped after {timeout:.0f} s")
    return status


def _stop(process: subprocess.Popen[str]) -> None:
    """Stop a child process that is still running (SIGTERM, then SIGKILL) and close its pipe."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


def reports_folder(environment: Mapping[str, str]) -> Path:
    """Return the demo site's reports folder, resolved as the site's tasks resolve it.

    :param environment: the Airflow commands' environment (``AIRFLOW_HOME`` and the demo root).
    :raises DemoSetupError: the sites file has no valid ``demo`` site or its reports location
        is not a local folder.
    """
    loaded = load_sites(SITES_FILE)
    site = next((candidate for candidate in loaded.sites if candidate.id == SITE_ID), None)
    if site is None:
        raise DemoSetupError(f"{SITES_FILE} has no valid site {SITE_ID!r}:\n{loaded.error_report()}")
    location = resolve_location(site.reports_location, environment)
    if "://" in location or "{{" in location:
        raise DemoSetupError(f"the demo site's reports location must be a local folder: {location}")
    return Path(location)


def latest_report(folder: Path) -> tuple[Path, Path] | None:
    """Return the newest report of the folder as ``(json, txt)``, or ``None`` when there is none.

    :param folder: the site's reports folder.
    """
    reports = sorted(folder.glob("*.json"), key=lambda path: path.stat().st_mtime) if folder.is_dir() else []
    if not reports:
        return None
    newest = reports[-1]
    return newest, newest.with_suffix(".txt")


def report_listings(report: Mapping[str, Any]) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """Return the ``(path, reason)`` files not uploaded and ``(study UID, reason)`` held studies of a report.

    :param report: the decoded JSON run report.
    """
    files = {(item["path"], item["reason"]) for item in report["not_uploaded"]["files"]}
    held = {(study["study_uid"], study["reason"]) for study in report["held"]["studies"]}
    return files, held


def report_totals_problems(manifest: SampleManifest, report: Mapping[str, Any] | None) -> list[str]:
    """Return what is wrong with a report's status and delivered totals.

    :param manifest: what the sample must produce.
    :param report: the decoded JSON run report, or ``None`` when none was written.
    """
    if report is None:
        return ["no run report was written"]
    problems = [f"the report says: {problem}" for problem in report["problems"]]
    if report["status"] != SUCCEEDED:
        problems.append(f"the report's status is {report['status']}, not {SUCCEEDED}")
    delivered = report["delivered"]
    expected = (len(manifest.delivered_studies), manifest.instances_to_deliver)
    if (delivered["studies"], delivered["instances"]) != expected:
        problems.append(
            f"the report counts {delivered['studies']} studies ({delivered['instances']} instances) "
            f"delivered, expected {expected[0]} ({expected[1]})"
        )
    return problems


def check_outcome(
    manifest: SampleManifest, state: Mapping[str, Any], report: Mapping[str, Any] | None
) -> list[str]:
    """Print one line per expectation of the manifest and return the problems found.

    :param manifest: what the sample must produce.
    :param state: the sandbox's state after the run.
    :param report: the decoded JSON run report, or ``None`` when none was written.
    """
    problems = manifest.delivery_problems(state)
    orders = {order["study_uid"]: order for order in state.get("orders", [])}
    for study in manifest.delivered_studies:
        order = orders.get(study.study_uid)
        received = len(order.get("instances", [])) if order else 0
        failed = any(problem.startswith(f"{study.label} (") for problem in problems)
        say(
            f"  {'FAIL' if failed else 'ok  '} {study.label} ({study.study_uid}): "
            f"{order['status'] if order else 'no order'}, {received} of {study.instances} instances, "
            f"metadata from {study.metadata_source.value}"
        )
    listed_files, listed_held = report_listings(report) if report is not None else (set(), set())
    for study in manifest.held_studies:
        in_report = (study.study_uid, study.reason) in listed_held
        has_order = study.study_uid in orders
        if not in_report:
            problems.append(f"{study.label} ({study.study_uid}): not in the report as held ({study.reason})")
        say(
            f"  {'FAIL' if has_order or not in_report else 'ok  '} {study.label} ({study.study_uid}): "
            f"held back ({study.reason}), {'HAS AN ORDER' if has_order else 'no order'} at the vendor"
        )
    for bad in manifest.bad_files:
        listed = (bad.relative_path, bad.reason) in listed_files
        if not listed:
            problems.append(f"{bad.relative_path}: not in the report as {bad.reason}")
        say(f"  {'ok  ' if listed else 'FAIL'} {bad.relative_path}: {bad.reason} ({bad.description})")
    return problems + report_totals_problems(manifest, report)


def describe_sample(manifest: SampleManifest) -> str:
    """Return a one-line description of a sample.

    :param manifest: the sample's manifest.
    """
    return (
        f"{len(manifest.studies)} studies ({len(manifest.delivered_studies)} to deliver, "
        f"{manifest.instances_to_deliver} instances; {len(manifest.held_studies)} to hold back), "
        f"{len(manifest.bad_files)} bad files"
    )


def run_demo(layout: DemoLayout, *, echo: bool, timeout: float) -> int:
    """Run the whole demo in ``layout``; return the exit status.

    :param layout: the demo folder and day.
    :param echo: print Airflow's output as it comes (it is always kept in the log file).
    :param timeout: seconds allowed to each Airflow command.
    """
    if not DAG_FILE.exists():
        raise DemoSetupError(f"{DAG_FILE.relative_to(REPO_ROOT)} does not exist: there is no site DAG to run")
    layout.recreate()
    heading("Sample staging area")
    manifest = build_sample_staging(layout.staging, day=layout.day)
    manifest.write(layout.manifest)
    say(f"{layout.staging}: {describe_sample(manifest)}")
    say(f"What a correct run produces: {layout.manifest}")
    heading("Vendor sandbox")
    with running_sandbox(layout.sandbox_dir, **SANDBOX_CLOCKS) as sandbox:
        say(f"{sandbox.base_url} (data and audit log in {layout.sandbox_dir}), clocks {SANDBOX_CLOCKS}")
        environment = airflow_environment(layout, connection_json(sandbox))
        with layout.airflow_log.open("w") as log:
            heading("Airflow")
            say(f"AIRFLOW_HOME={layout.airflow_home}; output kept in {layout.airflow_log}")
            say("airflow db migrate")
            migrated = run_airflow(["db", "migrate"], environment, log, echo=False, timeout=timeout)
            if migrated != 0:
                say(f"airflow db migrate failed (exit status {migrated}); see {layout.airflow_log}")
                return EXIT_SETUP
            say(f"airflow dags test {DAG_ID} {layout.day}")
            started = time.monotonic()
            status = run_airflow(
                ["dags", "test", DAG_ID, layout.day], environment, log, echo=echo, timeout=timeout
            )
            say(f"airflow dags test finished in {time.monotonic() - started:.0f} s with exit status {status}")
        state = sandbox.state()
        client_secret = sandbox.client_secret
    return report_and_check(layout, manifest, environment, state, status, client_secret)


def report_and_check(
    layout: DemoLayout,
    manifest: SampleManifest,
    environment: Mapping[str, str],
    state: Mapping[str, Any],
    dag_status: int,
    client_secret: str,
) -> int:
    """Print the run report and the check against the manifest; return the exit status.

    :param layout: the demo folder.
    :param manifest: what the sample must produce.
    :param environment: the Airflow commands' environment, to find the reports folder.
    :param state: the sandbox's state after the run.
    :param dag_status: the exit status of ``airflow dags test``.
    :param client_secret: the connection's secret, which no output or report may contain.
    """
    folder = reports_folder(environment)
    found = latest_report(folder)
    report = None
    heading("Run report")
    if found is None:
        say(f"no report in {folder}")
    else:
        json_path, text_path = found
        say(f"{json_path}")
        say(text_path.read_text().rstrip() if text_path.exists() else f"({text_path.name} is missing)")
        report = json.loads(json_path.read_text())
    heading("Check against the sample")
    problems = check_outcome(manifest, state, report)
    if dag_status != 0:
        problems.append(f"airflow dags test exited with status {dag_status}")
    written = [layout.airflow_log, *(found or ())]
    problems += [
        f"{path} contains the client secret"
        for path in written
        if path.exists() and client_secret in path.read_text(errors="replace")
    ]
    say()
    if problems:
        say(f"Demo FAILED: {len(problems)} problem(s):")
        for problem in problems:
            say(f"  - {problem}")
        return EXIT_MISMATCH
    say(
        f"Demo passed: {len(manifest.delivered_studies)} studies delivered "
        f"({manifest.instances_to_deliver} instances), {len(manifest.held_studies)} held back, "
        f"{len(manifest.bad_files)} bad files reported. The sandbox has stopped."
    )
    return EXIT_OK


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line.

    :param argv: the arguments; ``sys.argv[1:]`` when ``None``.
    """
    parser = argparse.ArgumentParser(
        description="Run the demo site's DAG end to end against a local vendor sandbox.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--root", type=Path, default=REPO_ROOT / ".demo", help="demo folder (recreated)")
    parser.add_argument(
        "--day",
        default=datetime.now(UTC).date().isoformat(),
        help="logical date of the run and day of the staging folder, YYYY-MM-DD",
    )
    parser.add_argument("--quiet", action="store_true", help="keep Airflow's output in the log file only")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_SECONDS,
        help="seconds allowed to each Airflow command",
    )
    arguments = parser.parse_args(argv)
    try:
        date.fromisoformat(arguments.day)
    except ValueError:
        parser.error(f"--day must be a date such as 2025-01-02, not {arguments.day!r}")
    return arguments


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; return the exit status (0 passed, 1 wrong outcome, 2 cannot run, 130 interrupted).

    :param argv: the arguments; ``sys.argv[1:]`` when ``None``.
    """
    arguments = parse_arguments(argv)
    layout = DemoLayout(root=arguments.root.absolute(), day=arguments.day)
    try:
        return run_demo(layout, echo=not arguments.quiet, timeout=arguments.timeout)
    except (DemoSetupError, SandboxError) as error:
        say(f"Demo could not run: {error}")
        return EXIT_SETUP
    except KeyboardInterrupt:
        say("Interrupted; the sandbox and Airflow have been stopped.")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
