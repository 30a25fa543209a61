"""Loading sites.yaml: per-entry errors that name file, line, site and field; file-level errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from dicom_ingest.sites import SitesFileError, load_sites, sites_file_path
from dicom_ingest.sites.loader import SITES_FILE_ENV, default_sites_path
from tests.conftest import REPO_ROOT

WriteSites = Callable[..., Path]

GOOD_A = """\
  - id: good_a
    schedule: "@daily"
    staging: /data/a
    conn_id: dicom_ingest_default
"""
GOOD_B = """\
  - id: good_b
    schedule: "0 3 * * *"
    staging: s3://bucket/b/{{ ds }}
    conn_id: dicom_ingest_default
"""
BAD_ENTRY_LINE = 2 + GOOD_A.count("\n")
"""Line of ``- id: bad``: after ``sites:`` and the first good entry."""
BAD_ENTRY_BASE = {"schedule": '"@hourly"', "staging": "/data/bad", "conn_id": "dicom_ingest_default"}


def sites_text_with_bad_entry(snippet: str) -> str:
    """Return a sites file of a good entry, an entry ``bad`` starting with ``snippet``, another good one.

    The required keys the snippet does not set are appended to the bad entry after it, so that
    line ``k`` of the snippet is line ``BAD_ENTRY_LINE + 1 + k`` of the file.
    """
    snippet_lines = snippet.splitlines()
    set_keys = {line.split(":")[0] for line in snippet_lines if not line.startswith(" ")}
    bad_lines = ["  - id: bad"]
    bad_lines += [f"    {line}" for line in snippet_lines]
    bad_lines += [f"    {key}: {value}" for key, value in BAD_ENTRY_BASE.items() if key not in set_keys]
    return "sites:\n" + GOOD_A + "\n".join(bad_lines) + "\n" + GOOD_B


@pytest.mark.parametrize(
    ("snippet", "field", "message", "line_in_snippet"),
    [
        ('schedule: "every day"', "schedule", "five fields", 0),
        ('schedule: "0 0 30 2 *"', "schedule", "never fires", 0),
        ("schedule: '@fortnightly'", "schedule", "unknown preset", 0),
        ("timezone: Europe/Lyon", "timezone", "unknown IANA time zone", 0),
        ("start_date: 2025-02-30", "start_date", "valid date", 0),
        ("catchup: sometimes", "catchup", "valid boolean", 0),
        ("staging: ftp://files/bad", "staging", "not supported", 0),
        ("conn_id: vendor api", "conn_id", "should match pattern", 0),
        ("required_metadata: [PatientAge]", "required_metadata[0]", "should match pattern", 0),
        ("metadata:\n  manifest_key: PatientID", "metadata.manifest_key", "'StudyInstanceUID'", 1),
        ("metadata:\n  tags:\n    patient_age: Patient Age", "metadata.tags.patient_age", "pattern", 2),
        ("upload_concurrency: 50", "upload_concurrency", "less than or equal to 20", 0),
        ("quarantine:\n  policy: move", "quarantine", "needs a location", 0),
        ("quarantine:\n  policy: shred", "quarantine.policy", "'record', 'copy' or 'move'", 1),
        (
            "invalid_threshold:\n  max_fraction: 2",
            "invalid_threshold.max_fraction",
            "less than or equal to 1",
            1,
        ),
        ("batch:\n  max_bytes: lots", "batch.max_bytes", "could not parse", 1),
        ("max_active_batches: 0", "max_active_batches", "greater than or equal to 1", 0),
        ("retries: many", "retries", "valid integer", 0),
        ("max_file_size: 10GiB", "max_file_size", "less than or equal to", 0),
        ("ledger:\n  path: /x.sqlite\n  conn_id: ledger_pg", "ledger", "not both", 0),
        ("sensor:\n  timeout: 0", "sensor.timeout", "greater than 0", 1),
        ("upload_concurency: 4", "upload_concurency", "unknown key; did you mean 'upload_concurrency'?", 0),
        (
            "quarantine:\n  colour: blue",
            "quarantine.colour",
            "unknown key; known keys here: policy, location",
            1,
        ),
    ],
)
def test_bad_field_is_reported_with_file_line_site_and_field_while_other_sites_load(
    write_sites: WriteSites, snippet: str, field: str, message: str, line_in_snippet: int
) -> None:
    path = write_sites(sites_text_with_bad_entry(snippet))
    expected_line = BAD_ENTRY_LINE + 1 + line_in_snippet

    result = load_sites(path)

    assert [site.id for site in result.sites] == ["good_a", "good_b"]
    assert len(result.errors) == 1
    error = result.errors[0]
    assert (error.site_id, error.index, error.line) == ("bad", 1, BAD_ENTRY_LINE)
    assert [(issue.field, issue.line) for issue in error.issues] == [(field, expected_line)]
    assert message in error.issues[0].message
    assert str(error).startswith(f"{path}:{expected_line}: site 'bad' (sites[1]): {field}: ")


def test_every_problem_of_an_entry_is_reported_in_line_order(write_sites: WriteSites) -> None:
    path = write_sites(
        sites_text_with_bad_entry("timezone: Nowhere/City\nupload_concurrency: 0\nstaging: ftp://x/y")
    )

    (error,) = load_sites(path).errors

    assert [(issue.field, issue.line) for issue in error.issues] == [
        ("timezone", BAD_ENTRY_LINE + 1),
        ("upload_concurrency", BAD_ENTRY_LINE + 2),
        ("staging", BAD_ENTRY_LINE + 3),
    ]
    assert len(str(error).splitlines()) == 3


def test_invalid_site_id_names_the_id_as_written(write_sites: WriteSites) -> None:
    path = write_sites("sites:\n" + GOOD_A + GOOD_A.replace("good_a", "Paris-Nord"))

    result = load_sites(path)

    assert [site.id for site in result.sites] == ["good_a"]
    (error,) = result.errors
    assert error.site_id == "Paris-Nord"
    assert (
        str(error) == f"{path}:{BAD_ENTRY_LINE}: site 'Paris-Nord' (sites[1]): id: {error.issues[0].message}"
    )
    assert "should match pattern" in error.issues[0].message


@pytest.mark.parametrize("id_line", ["", "    id: 42\n", "    id: ''\n"], ids=["missing", "number", "empty"])
def test_entry_without_usable_id_is_named_by_position(write_sites: WriteSites, id_line: str) -> None:
    nameless = '  - schedule: "@daily"\n' + id_line + "    staging: /data/x\n    conn_id: c\n"
    path = write_sites("sites:\n" + GOOD_A + nameless + GOOD_B)

    result = load_sites(path)

    assert [site.id for site in result.sites] == ["good_a", "good_b"]
    (error,) = result.errors
    assert error.site_id is None
    assert error.label == "sites[1]"
    assert [issue.field for issue in error.issues] == ["id"]
    assert str(error).startswith(f"{path}:")
    assert ": sites[1]: id: " in str(error)


def test_entry_that_is_not_a_mapping_is_rejected_alone(write_sites: WriteSites) -> None:
    path = write_sites("sites:\n" + GOOD_A + "  - just_a_name\n" + GOOD_B)

    result = load_sites(path)

    assert [site.id for site in result.sites] == ["good_a", "good_b"]
    (error,) = result.errors
    assert str(error) == f"{path}:{BAD_ENTRY_LINE}: sites[1]: entry: an entry must be a mapping of settings"


def test_repeated_id_rejects_every_entry_that_uses_it(write_sites: WriteSites) -> None:
    path = write_sites("sites:\n" + GOOD_A + GOOD_B + GOOD_A.replace("/data/a", "/data/other"))

    result = load_sites(path)

    assert [site.id for site in result.sites] == ["good_b"]
    assert [(error.site_id, error.index) for error in result.errors] == [("good_a", 0), ("good_a", 2)]
    first, second = (error.issues for error in result.errors)
    assert [issue.field for issue in first + second] == ["id", "id"]
    assert "also used by sites[2] (line 10)" in first[0].message
    assert "also used by sites[0] (line 2)" in second[0].message


def test_key_repeated_inside_an_entry_rejects_only_that_entry(write_sites: WriteSites) -> None:
    path = write_sites(sites_text_with_bad_entry('schedule: "@daily"\nschedule: "@hourly"'))

    result = load_sites(path)

    assert [site.id for site in result.sites] == ["good_a", "good_b"]
    (error,) = result.errors
    assert [(issue.field, issue.line) for issue in error.issues] == [("schedule", BAD_ENTRY_LINE + 2)]
    assert "appears twice" in error.issues[0].message


def test_nested_repeated_key_is_named_by_its_full_path(write_sites: WriteSites) -> None:
    path = write_sites(sites_text_with_bad_entry("metadata:\n  sidecar: a.json\n  sidecar: b.json"))

    (error,) = load_sites(path).errors

    assert [(issue.field, issue.line) for issue in error.issues] == [("metadata.sidecar", BAD_ENTRY_LINE + 3)]


def test_key_repeated_at_top_level_is_a_file_error(write_sites: WriteSites) -> None:
    path = write_sites("sites:\n" + GOOD_A + "sites:\n" + GOOD_B)

    with pytest.raises(SitesFileError) as caught:
        load_sites(path)

    assert str(caught.value) == f"{path}:{BAD_ENTRY_LINE}: key 'sites' appears twice in the same mapping"


def test_anchors_in_x_keys_share_settings_and_entries_override_them(write_sites: WriteSites) -> None:
    path = write_sites(
        textwrap.dedent(
            """\
            x-defaults: &defaults
              conn_id: vendor_eu
              timezone: Europe/Paris
              schedule: "@daily"
            sites:
              - id: lyon
                <<: *defaults
                staging: /data/lyon
              - id: oslo
                <<: *defaults
                timezone: Europe/Oslo
                staging: /data/oslo
            """
        )
    )

    result = load_sites(path)

    assert result.errors == ()
    assert [(site.id, site.conn_id, site.timezone) for site in result.sites] == [
        ("lyon", "vendor_eu", "Europe/Paris"),
        ("oslo", "vendor_eu", "Europe/Oslo"),
    ]


def test_missing_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "sites.yaml"

    with pytest.raises(SitesFileError) as caught:
        load_sites(path)

    assert str(caught.value) == f"{path}: sites file not found (set {SITES_FILE_ENV} to use another)"


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        ('sites:\n  - id: a\n    schedule: "@daily"\n   staging: /x\n', "4:4", "expected <block end>"),
        ('sites:\n  - id: a\n    schedule: "@daily\n', "4:1", "while scanning a quoted scalar (line 3)"),
        (
            "sites:\n  - id: a\n    tags: [a, b\n    staging: /x\n",
            "4:12",
            "while parsing a flow sequence (line 3)",
        ),
        ("sites:\n  - id: a\n\tstaging: /x\n", "3:1", "found character '\\t'"),
        ("sites: []\n---\nsites: []\n", "2:1", "expected a single document"),
    ],
    ids=["indentation", "unclosed-quote", "unclosed-list", "tab", "two-documents"],
)
def test_yaml_syntax_error_names_file_and_line(
    write_sites: WriteSites, text: str, where: str, problem: str
) -> None:
    path = write_sites(text)

    with pytest.raises(SitesFileError) as caught:
        load_sites(path)

    message = str(caught.value)
    assert message.startswith(f"{path}:{where}: invalid YAML: ")
    assert problem in message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "1: expected a mapping with a top-level 'sites:' list"),
        ("- id: a\n", "1: expected a mapping with a top-level 'sites:' list"),
        ("x-defaults: {}\n", "1: no top-level 'sites:' list"),
        ("x-defaults: {}\nsite:\n  - id: a\n", "2: unknown top-level key 'site'; only 'sites' and keys"),
        ("sites:\n  id: a\n", "2: 'sites' must be a list of site entries"),
    ],
    ids=["empty", "list", "no-sites", "unknown-key", "sites-not-a-list"],
)
def test_file_of_the_wrong_shape_is_one_error_with_its_line(
    write_sites: WriteSites, text: str, message: str
) -> None:
    path = write_sites(text)

    with pytest.raises(SitesFileError) as caught:
        load_sites(path)

    assert str(caught.value).startswith(f"{path}:{message}")


@pytest.mark.parametrize("text", ["sites: []\n", "sites:\n", "sites:\n  # every site commented out\n"])
def test_file_without_sites_loads_nothing_without_error(write_sites: WriteSites, text: str) -> None:
    result = load_sites(write_sites(text))
    assert (result.sites, result.errors) == ((), ())


def test_shipped_sites_file_is_valid() -> None:
    result = load_sites(REPO_ROOT / "include" / "sites.yaml")

    assert result.error_report() == ""
    assert [site.id for site in result.sites] == ["demo", "example_s3"]
    assert [site.id for site in result.enabled_sites] == ["demo"]
    demo = result.sites[0]
    assert (demo.schedule, demo.timezone, demo.catchup, demo.conn_id) == (
        "@daily",
        "UTC",
        False,
        "dicom_ingest_default",
    )
    assert demo.required_metadata == ("patient_age", "patient_sex")
    assert demo.staging == "${DICOM_INGEST_DEMO_ROOT:-demo}/staging/{{ ds }}"


def test_shipped_example_site_sets_every_key() -> None:
    raw = yaml.safe_load((REPO_ROOT / "include" / "sites.yaml").read_text(encoding="utf-8"))
    example = next(entry for entry in raw["sites"] if entry["id"] == "example_s3")
    site = next(
        site for site in load_sites(REPO_ROOT / "include" / "sites.yaml").sites if site.id == "example_s3"
    )

    assert set(example) == set(type(site).model_fields)
    assert site.staging.startswith("s3://")


def test_a_hundred_generated_sites_load_with_their_own_settings(write_sites: WriteSites) -> None:
    timezones = ["UTC", "Europe/Paris", "America/New_York", "Asia/Tokyo"]
    entries = [
        {
            "id": f"site_{number:03d}",
            "enabled": number % 3 != 0,
            "schedule": f"{number % 60} {number % 24} * * *",
            "timezone": timezones[number % len(timezones)],
            "staging": f"s3://aws_{number}@staging-{number}/{{{{ ds }}}}/",
            "conn_id": f"vendor_{number % 5}",
            "upload_concurrency": number % 20 + 1,
            "batch": {"max_instances": 100 + number},
        }
        for number in range(100)
    ]
    path = write_sites(yaml.safe_dump({"sites": entries}, sort_keys=False))

    result = load_sites(path)

    assert result.errors == ()
    assert [site.id for site in result.sites] == [entry["id"] for entry in entries]
    for site, entry in zip(result.sites, entries, strict=True):
        top_level = {key: value for key, value in entry.items() if key != "batch"}
        assert site.model_dump(include=set(top_level)) == top_level
        assert site.batch.max_instances == entry["batch"]["max_instances"]
    assert len(result.enabled_sites) == sum(1 for entry in entries if entry["enabled"])


def test_path_comes_from_the_environment_first(tmp_path: Path) -> None:
    environ = {SITES_FILE_ENV: str(tmp_path / "custom.yaml"), "AIRFLOW_HOME": "/opt/airflow"}
    assert sites_file_path(default=tmp_path / "default.yaml", environ=environ) == tmp_path / "custom.yaml"


def test_path_falls_back_to_the_callers_default(tmp_path: Path) -> None:
    assert sites_file_path(default=tmp_path / "default.yaml", environ={}) == tmp_path / "default.yaml"


def test_default_path_is_include_beside_the_dags_folder() -> None:
    environ = {"AIRFLOW__CORE__DAGS_FOLDER": "/srv/project/dags", "AIRFLOW_HOME": "/opt/airflow"}
    assert default_sites_path(environ) == Path("/srv/project/include/sites.yaml")
    assert sites_file_path(environ=environ) == Path("/srv/project/include/sites.yaml")


def test_default_path_without_dags_folder_is_under_airflow_home() -> None:
    assert default_sites_path({"AIRFLOW_HOME": "/opt/airflow"}) == Path("/opt/airflow/include/sites.yaml")


def test_load_without_a_path_reads_the_file_named_by_the_environment(
    write_sites: WriteSites, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_sites("sites:\n" + GOOD_B, name="elsewhere.yaml")
    monkeypatch.setenv(SITES_FILE_ENV, str(path))

    result = load_sites()

    assert result.path == path
    assert [site.id for site in result.sites] == ["good_b"]


def test_load_without_a_path_or_environment_reads_the_projects_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SITES_FILE_ENV, raising=False)
    monkeypatch.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(REPO_ROOT / "dags"))

    assert load_sites().path == REPO_ROOT / "include" / "sites.yaml"


def test_loading_is_pure_and_imports_no_airflow(write_sites: WriteSites) -> None:
    """Run in a fresh interpreter: no network or database call, and no heavy module imported."""
    path = write_sites("sites:\n" + GOOD_A + GOOD_B)
    probe = textwrap.dedent(
        """
        import sys

        def refuse_io(event, args):
            if event in ("socket.connect", "socket.getaddrinfo", "sqlite3.connect", "subprocess.Popen"):
                raise RuntimeError("parse-time side effect: " + event)

        sys.addaudithook(refuse_io)
        from dicom_ingest.sites import describe_site, load_sites

        result = load_sites(sys.argv[1])
        for site in result.sites:
            describe_site(site)
        heavy = {"airflow", "pydicom", "sqlalchemy", "requests", "boto3", "jinja2"}
        print(len(result.sites), sorted(name for name in sys.modules if name.split(".")[0] in heavy))
        """
    )

    completed = subprocess.run(
        [sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=60, check=False
    )

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "2 []"
