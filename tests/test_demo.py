"""The sample staging generator, the demo's outcome check, and ``make demo`` end to end.

The end-to-end test runs ``scripts/demo.py`` as ``make demo`` does (in a temporary demo folder)
and checks its verdict against what the sandbox itself recorded in its audit log.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from dicom_ingest.sites import load_sites
from dicom_ingest.sites.runtime import SiteRuntime
from dicom_ingest.staging import Reason, build_plan
from dicom_ingest_sandbox.samples import (
    BUNDLED_FILES,
    MetadataSource,
    Outcome,
    SampleManifest,
    build_sample_staging,
)
from scripts import demo

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_SCRIPT = REPO_ROOT / "scripts" / "demo.py"
SITES_FILE = REPO_ROOT / "include" / "sites.yaml"
SAMPLE_DAY = "2025-03-04"
FAKE_PATIENT_MARKERS = ("DEMO^PATIENT", "DEMO-0001", "19700101")
"""Tag values of the generated fake patients: none may appear in output, logs or reports."""
DEMO_TIMEOUT_SECONDS = 480


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> SampleManifest:
    """Build the default sample once for the fast tests of this module."""
    return build_sample_staging(tmp_path_factory.mktemp("sample") / "staging", day=SAMPLE_DAY)


# --- the sample generator ---------------------------------------------------------------------


def test_sample_is_what_the_demo_site_plans(sample: SampleManifest, tmp_path: Path) -> None:
    """Planning the sample with the demo site's own options gives exactly the manifest's outcome."""
    demo_site = next(site for site in load_sites(SITES_FILE).sites if site.id == "demo")
    options = SiteRuntime(demo_site).staging_options()

    plan = build_plan(str(sample.root), str(tmp_path / "work"), options)

    planned = {study.study_uid: study for batch in plan.batch_ids for study in plan.iter_batch(batch)}
    assert {uid: {i.sop_uid for i in study.instances} for uid, study in planned.items()} == {
        study.study_uid: set(study.sop_uids) for study in sample.delivered_studies
    }
    for study in planned.values():
        assert set(options.metadata.required_fields) <= set(study.metadata)
    invalid = {record.relative_path: record for record in plan.iter_invalid()}
    for bad in sample.bad_files:
        assert invalid.pop(bad.relative_path).reason == Reason(bad.reason)
    held_files = {
        path: record.reason
        for path, record in invalid.items()
        if record.study_uid in {study.study_uid for study in sample.held_studies}
    }
    held_instances = sum(study.instances for study in sample.held_studies)
    assert set(held_files.values()) == {Reason.METADATA_MISSING}
    assert len(held_files) == len(invalid) == held_instances


def test_sample_covers_every_metadata_source_and_bad_file_kind(sample: SampleManifest) -> None:
    """The default sample has tag, sidecar and missing metadata, bundled files and four bad files."""
    sources = {study.metadata_source for study in sample.studies}
    assert sources == {MetadataSource.TAGS, MetadataSource.SIDECAR, MetadataSource.NONE}
    assert [study.outcome for study in sample.studies if study.metadata_source is MetadataSource.NONE] == [
        Outcome.HELD
    ]
    bundled = {Path(study.folder).parent.name for study in sample.studies}
    assert "bundled" in bundled
    assert len([s for s in sample.studies if s.folder.startswith("bundled/")]) == len(BUNDLED_FILES)
    assert sorted(bad.reason for bad in sample.bad_files) == [
        "dicomdir",
        "not_dicom",
        "unreadable",
        "zero_byte",
    ]
    assert sample.staged_files == sum(1 for path in sample.root.rglob("*") if path.is_file()) - sum(
        1 for path in sample.root.rglob("metadata.json")
    )


def test_generated_study_shape_follows_the_arguments(tmp_path: Path) -> None:
    """Study, series and instance counts follow the arguments; bundled and bad files can be left out."""
    manifest = build_sample_staging(
        tmp_path / "staging",
        studies=5,
        series_per_study=3,
        instances_per_series=2,
        include_bundled=False,
        include_bad=False,
        day=SAMPLE_DAY,
    )

    assert [study.instances for study in manifest.studies] == [6] * 5
    assert manifest.bad_files == ()
    assert len(list((tmp_path / "staging" / "study-01").glob("series-*"))) == 3
    assert [study.metadata_source for study in manifest.studies] == [MetadataSource.TAGS] * 3 + [
        MetadataSource.SIDECAR,
        MetadataSource.NONE,
    ]


def test_same_day_gives_the_same_uids(tmp_path: Path, sample: SampleManifest) -> None:
    """UIDs derive from the day: the same day repeats them, another day changes the generated ones."""
    again = build_sample_staging(tmp_path / "again", day=SAMPLE_DAY)
    other_day = build_sample_staging(tmp_path / "other", day="2025-03-05", include_bundled=False)

    assert [study.study_uid for study in again.studies] == [study.study_uid for study in sample.studies]
    assert not {study.study_uid for study in other_day.studies} & {s.study_uid for s in sample.studies}


def test_refuses_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    """Writing into a folder with files in it is refused (nothing would tell old and new apart)."""
    (tmp_path / "leftover.dcm").write_bytes(b"x")

    with pytest.raises(ValueError, match="not empty"):
        build_sample_staging(tmp_path)


def test_manifest_round_trips_through_json(tmp_path: Path, sample: SampleManifest) -> None:
    """A written manifest loads back equal, and holds no tag value of the fake patients."""
    path = tmp_path / "manifest.json"
    sample.write(path)

    assert SampleManifest.load(path) == sample
    assert not any(marker in path.read_text() for marker in FAKE_PATIENT_MARKERS)


# --- the outcome check ------------------------------------------------------------------------


def vendor_state(manifest: SampleManifest) -> dict[str, Any]:
    """Return the sandbox state a correct run of ``manifest`` leaves (orders and objects)."""
    orders, objects = [], []
    for number, study in enumerate(manifest.delivered_studies):
        order_id = f"order-{number}"
        instances = [{"sop_instance_uid": uid, "key": f"uploads/{uid}.dcm"} for uid in study.sop_uids]
        orders.append(
            {
                "order_id": order_id,
                "study_uid": study.study_uid,
                "status": "DELIVERED",
                "reason": None,
                "metadata_complete": True,
                "instances": instances,
            }
        )
        objects += [{"key": item["key"], "accepted": True, "order_id": order_id} for item in instances]
    return {"orders": orders, "objects": objects}


def fail_first_order(state: dict[str, Any], manifest: SampleManifest) -> None:
    state["orders"][0].update(status="FAILED", reason="metadata_timeout")


def lose_an_instance(state: dict[str, Any], manifest: SampleManifest) -> None:
    state["orders"][0]["instances"].pop()


def open_a_second_order(state: dict[str, Any], manifest: SampleManifest) -> None:
    state["orders"].append({**state["orders"][0], "order_id": "order-late"})


def order_the_held_study(state: dict[str, Any], manifest: SampleManifest) -> None:
    state["orders"].append({**state["orders"][0], "study_uid": manifest.held_studies[0].study_uid})


def order_an_unknown_study(state: dict[str, Any], manifest: SampleManifest) -> None:
    state["orders"].append({**state["orders"][0], "study_uid": "1.2.3.4"})


def upload_a_bad_file(state: dict[str, Any], manifest: SampleManifest) -> None:
    state["objects"].append({"key": "uploads/x.dcm", "accepted": False, "reason": "not_dicom"})


def leave_metadata_incomplete(state: dict[str, Any], manifest: SampleManifest) -> None:
    state["orders"][-1]["metadata_complete"] = False


def deliver_nothing(state: dict[str, Any], manifest: SampleManifest) -> None:
    state["orders"].clear()


def test_a_correct_vendor_state_has_no_problem(sample: SampleManifest) -> None:
    """The state a correct run leaves passes the check."""
    assert sample.delivery_problems(vendor_state(sample)) == []


@pytest.mark.parametrize(
    ("spoil", "expected"),
    [
        (fail_first_order, "is FAILED"),
        (lose_an_instance, "holds 5 of 6 instances"),
        (open_a_second_order, "exactly one order, the vendor has 2"),
        (order_the_held_study, "held back, yet the vendor has an order"),
        (order_an_unknown_study, "1.2.3.4 is not in the sample"),
        (upload_a_bad_file, "rejected 1 uploaded object(s) (not_dicom)"),
        (leave_metadata_incomplete, "metadata is incomplete"),
        (deliver_nothing, "exactly one order, the vendor has 0"),
    ],
)
def test_each_wrong_outcome_is_a_problem(
    sample: SampleManifest,
    spoil: Callable[[dict[str, Any], SampleManifest], None],
    expected: str,
) -> None:
    """Every way a run can go wrong at the vendor is reported."""
    state = copy.deepcopy(vendor_state(sample))
    spoil(state, sample)

    problems = sample.delivery_problems(state)

    assert any(expected in problem for problem in problems), problems


def run_report(manifest: SampleManifest) -> dict[str, Any]:
    """Return the parts of the JSON run report the demo reads, as a correct run writes them."""
    return {
        "status": "succeeded",
        "problems": [],
        "delivered": {"studies": len(manifest.delivered_studies), "instances": manifest.instances_to_deliver},
        "held": {
            "studies": [
                {"study_uid": study.study_uid, "reason": study.reason} for study in manifest.held_studies
            ]
        },
        "not_uploaded": {
            "files": [{"path": bad.relative_path, "reason": bad.reason} for bad in manifest.bad_files]
        },
    }


def test_the_demo_accepts_a_correct_report(sample: SampleManifest) -> None:
    """A correct vendor state and report pass the demo's check."""
    assert demo.check_outcome(sample, vendor_state(sample), run_report(sample)) == []


def test_the_demo_notices_a_report_that_misses_a_bad_file_or_the_held_study(sample: SampleManifest) -> None:
    """A bad file or a held study the report does not list, or a failed run, is a problem."""
    report = run_report(sample)
    report["not_uploaded"]["files"].pop(0)
    report["held"]["studies"].clear()
    report.update(status="failed", problems=["1 studies failed (order_failed=1)"])

    problems = demo.check_outcome(sample, vendor_state(sample), report)

    assert any(sample.bad_files[0].relative_path in problem for problem in problems)
    assert any("not in the report as held" in problem for problem in problems)
    assert any("status is failed" in problem for problem in problems)
    assert "no run report was written" in demo.check_outcome(sample, vendor_state(sample), None)


def test_demo_folder_is_recreated_but_a_foreign_folder_is_kept(tmp_path: Path) -> None:
    """Each demo run starts from an empty folder; a folder the demo did not make is never deleted."""
    layout = demo.DemoLayout(root=tmp_path / "demo", day=SAMPLE_DAY)
    layout.recreate()
    (layout.root / "old-run.txt").write_text("from an earlier run")

    layout.recreate()

    assert [path.name for path in layout.root.iterdir()] == [demo.MARKER_FILE]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not the demo's")
    with pytest.raises(demo.DemoSetupError):
        demo.DemoLayout(root=foreign, day=SAMPLE_DAY).recreate()
    assert (foreign / "keep.txt").exists()


# --- make demo, end to end --------------------------------------------------------------------


def audit_events(path: Path) -> list[dict[str, Any]]:
    """Return the sandbox's audit log events."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def processes_mentioning(text: str) -> list[str]:
    """Return the command lines of running processes that mention ``text``."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if text in command:
            found.append(command)
    return found


@pytest.mark.slow
@pytest.mark.sandbox
def test_make_demo_delivers_the_sample_end_to_end(tmp_path: Path) -> None:
    """The demo passes, and the sandbox's audit log agrees: every valid study is delivered once,
    the held study and the bad files never reach the vendor, the report lists the bad files with
    their reasons, nothing of the demo is left running, and no fake patient data leaks."""
    root = tmp_path / "demo"

    finished = subprocess.run(
        [sys.executable, str(DEMO_SCRIPT), "--root", str(root), "--day", SAMPLE_DAY, "--quiet"],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_SECONDS,
        cwd=REPO_ROOT,
    )
    output = finished.stdout + finished.stderr

    assert finished.returncode == 0, output
    manifest = SampleManifest.load(root / "sample-manifest.json")
    for study in manifest.delivered_studies:
        count = study.instances
        assert f"ok   {study.label} ({study.study_uid}): DELIVERED, {count} of {count} instances" in output
    for study in manifest.held_studies:
        assert f"ok   {study.label} ({study.study_uid}): held back (metadata_missing), no order" in output
    for bad in manifest.bad_files:
        assert f"ok   {bad.relative_path}: {bad.reason}" in output

    events = audit_events(root / "sandbox" / "audit.jsonl")
    opened = [event["study_uid"] for event in events if event["event"] == "order_opened"]
    assert sorted(opened) == sorted(study.study_uid for study in manifest.delivered_studies)
    delivered_orders = {
        event["order_id"]
        for event in events
        if event["event"] == "status_changed" and event["status"] == "DELIVERED"
    }
    assert len(delivered_orders) == len(opened)
    received = {event["sop_instance_uid"] for event in events if event["event"] == "object_received"}
    assert received == {uid for study in manifest.delivered_studies for uid in study.sop_uids}
    assert not [event for event in events if event["event"] == "object_rejected"]

    reports = list((root / "airflow-home" / "dicom_ingest" / "demo" / "reports").glob("*.json"))
    assert len(reports) == 1
    report = json.loads(reports[0].read_text())
    assert report["status"] == "succeeded"
    assert {(item["path"], item["reason"]) for item in report["not_uploaded"]["files"]} == {
        (bad.relative_path, bad.reason) for bad in manifest.bad_files
    }
    assert {(study["study_uid"], study["reason"]) for study in report["held"]["studies"]} == {
        (study.study_uid, study.reason) for study in manifest.held_studies
    }

    assert processes_mentioning(str(root)) == []
    texts = [output, reports[0].read_text(), reports[0].with_suffix(".txt").read_text()]
    texts.append((root / "airflow.log").read_text())
    for text in texts:
        assert not any(marker in text for marker in FAKE_PATIENT_MARKERS)
