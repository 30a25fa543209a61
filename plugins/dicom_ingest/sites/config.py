"""The shape of ``sites.yaml``: one validated :class:`SiteConfig` per hospital site.

Every section forbids unknown keys, so a misspelt option is an error rather than a silently
ignored setting. Only ``id``, ``schedule``, ``staging`` and ``conn_id`` are required; every other
key has a default suited to a nightly ingestion of one staging folder.

Locations (``staging``, ``quarantine.location``, ``metadata.manifest``, ``work_location``,
``reports_location``, ``ledger.path``) are kept as written: Jinja such as ``{{ ds }}`` is
rendered by Airflow and ``${NAME}`` / ``${NAME:-default}`` is expanded when a task runs (see
:mod:`dicom_ingest.sites.locations`). A relative local path is relative to ``$AIRFLOW_HOME``.

This module imports nothing beyond pydantic and the standard library at import time, so a DAG
file can use it while being parsed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import date, datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dicom_ingest.sites.locations import ENV_REFERENCE, uri_scheme

DAG_ID_PREFIX = "dicom_ingest__"
DEFAULT_POOL = "dicom_ingest_vendor"
DEFAULT_OWNER = "dicom_ingest"
DEFAULT_START_DATE = date(2025, 1, 1)
VENDOR_MAX_PARALLEL_UPLOADS = 20
"""The vendor asks for no more than 20 parallel uploads per client (S3 rate limits)."""
SINGLE_PUT_MAX_BYTES = 5 * 2**30
"""S3 refuses a single PUT larger than 5 GiB."""

DEFAULT_TAG_MAPPING: dict[str, str] = {
    "patient_age": "PatientAge",
    "patient_sex": "PatientSex",
    "accession_number": "AccessionNumber",
}
"""Order metadata fields and the DICOM keywords they are read from unless a site says otherwise."""
DEFAULT_REQUIRED_METADATA = ("patient_age", "patient_sex")
"""The fields the vendor needs before it processes an order."""
DEFAULT_SIDECAR = "metadata.json"

AIRFLOW_CRON_PRESETS: dict[str, str] = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@quarterly": "0 0 1 */3 *",
    "@yearly": "0 0 1 1 *",
}
"""Airflow's cron presets (``airflow.utils.dates.cron_presets``), copied to keep parsing cheap."""

SUPPORTED_SCHEMES = frozenset({"file", "s3"})
_CRON_FIELD_COUNT = 5
_CRON_PROBE_START = datetime(2000, 1, 1)


def _check_schedule(value: str) -> str:
    """Accept one of Airflow's cron presets or a five-field cron expression that fires at all."""
    if value.startswith("@") and value not in AIRFLOW_CRON_PRESETS:
        raise ValueError(f"unknown preset {value!r}; use one of {', '.join(AIRFLOW_CRON_PRESETS)}")
    expression = AIRFLOW_CRON_PRESETS.get(value, value)
    if len(expression.split()) != _CRON_FIELD_COUNT:
        raise ValueError(
            f"{value!r} is not a cron expression with five fields "
            "(minute hour day-of-month month day-of-week) nor a preset such as @daily"
        )
    # croniter is what Airflow schedules with; imported here so that importing this module stays cheap.
    from croniter import CroniterBadCronError, CroniterBadDateError, croniter

    try:
        croniter(expression, _CRON_PROBE_START).get_next(datetime)
    except CroniterBadDateError as exc:
        raise ValueError(f"cron expression {value!r} never fires") from exc
    except CroniterBadCronError as exc:
        raise ValueError(f"invalid cron expression {value!r}: {exc}") from exc
    return value


def _check_timezone(value: str) -> str:
    """Accept an IANA time zone name known to the system's (or the tzdata package's) database."""
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown IANA time zone {value!r} (e.g. UTC, Europe/Paris)") from exc
    return value


def _check_location(value: str) -> str:
    """Accept a local path, ``file://`` or ``s3://`` location with well-formed placeholders.

    The value itself is never repeated in the error, since a location may be long or private.
    """
    if value != value.strip():
        raise ValueError("must not start or end with blanks")
    if value.count("{{") != value.count("}}") or value.count("{%") != value.count("%}"):
        raise ValueError("has unbalanced Jinja delimiters ({{ ... }} or {% ... %})")
    if "${" in ENV_REFERENCE.sub("", value):
        raise ValueError("has a malformed environment reference; write ${NAME} or ${NAME:-default}")
    scheme = uri_scheme(value)
    if scheme is None:
        return value
    if scheme not in SUPPORTED_SCHEMES:
        raise ValueError(f"URI scheme {scheme!r} is not supported; use a local path, file:// or s3://")
    authority = value.split("://", 1)[1].split("/", 1)[0]
    if scheme == "s3" and not authority.rpartition("@")[2]:
        raise ValueError("an s3:// location needs a bucket: s3://[conn_id@]bucket/prefix")
    if ":" in authority.rpartition("@")[0]:
        raise ValueError(
            "must not carry credentials; keep them in an Airflow connection and write "
            "s3://<conn_id>@bucket/prefix"
        )
    return value


def _check_file_name(value: str) -> str:
    """Accept a plain file name: no folder, not ``.`` or ``..``."""
    if "/" in value or "\\" in value or value in {".", ".."}:
        raise ValueError("must be a plain file name, without folders")
    return value


def _reject_repeats(values: tuple[str, ...]) -> tuple[str, ...]:
    """Reject a list that names the same item twice."""
    repeated = repeated_ids(values)
    if repeated:
        raise ValueError(f"listed more than once: {', '.join(sorted(repeated))}")
    return values


SiteId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]+$", max_length=64)]
ConnId = Annotated[str, StringConstraints(pattern=r"^[\w.-]+$", max_length=250)]
MetadataField = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]
DicomKeyword = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9]*$", max_length=64)]
FileName = Annotated[str, StringConstraints(min_length=1, max_length=255), AfterValidator(_check_file_name)]
CronSchedule = Annotated[str, StringConstraints(min_length=1), AfterValidator(_check_schedule)]
TimezoneName = Annotated[str, StringConstraints(min_length=1), AfterValidator(_check_timezone)]
Location = Annotated[str, StringConstraints(min_length=1), AfterValidator(_check_location)]
DagTag = Annotated[str, StringConstraints(min_length=1, max_length=100)]
PositiveByteSize = Annotated[ByteSize, Field(gt=0)]
Seconds = Annotated[float, Field(gt=0)]


class _Section(BaseModel):
    """Base of every section: unknown keys are errors and values are read-only."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MetadataSources(_Section):
    """Where a study's order metadata comes from.

    :param tags: order field → DICOM keyword it is read from. Setting it replaces the default
        mapping (``patient_age`` ← PatientAge, ``patient_sex`` ← PatientSex, ``accession_number``
        ← AccessionNumber) as a whole.
    :param sidecar: name of a JSON file in a study's folder with extra fields, or ``None``.
    :param manifest: location of a CSV manifest with one row per study, or ``None``.
    :param manifest_key: the manifest column that identifies a study.
    """

    tags: dict[MetadataField, DicomKeyword] = Field(default_factory=lambda: dict(DEFAULT_TAG_MAPPING))
    sidecar: FileName | None = DEFAULT_SIDECAR
    manifest: Location | None = None
    manifest_key: Literal["StudyInstanceUID", "AccessionNumber"] = "StudyInstanceUID"

    def can_provide(self, field: str) -> bool:
        """Tell whether some configured source may supply ``field``.

        :param field: an order metadata field name.
        """
        return field in self.tags or self.sidecar is not None or self.manifest is not None


class QuarantineConfig(_Section):
    """What happens to a file that is not a valid, uploadable DICOM instance.

    :param policy: ``record`` (only the ledger and the report know; right for read-only
        archives), ``copy`` or ``move`` the file into ``location`` with a reason file.
    :param location: where ``copy`` and ``move`` put files.
    """

    policy: Literal["record", "copy", "move"] = "record"
    location: Location | None = None

    @model_validator(mode="after")
    def _location_for_copy_and_move(self) -> QuarantineConfig:
        """Require a location when files are copied or moved."""
        if self.policy != "record" and self.location is None:
            raise ValueError(f"policy {self.policy!r} needs a location")
        return self


class InvalidThreshold(_Section):
    """How many invalid files a run tolerates before it uploads nothing and fails.

    :param max_fraction: largest share of scanned files that may be invalid (``None``: no limit).
    :param max_count: largest number of invalid files (``None``: no limit).
    """

    max_fraction: Annotated[float, Field(ge=0, le=1)] | None = 0.1
    max_count: Annotated[int, Field(ge=0)] | None = None


class BatchLimits(_Section):
    """Bounds of one batch (one mapped upload task) of whole studies.

    A study is never split: a study above the limits gets a batch of its own.

    :param max_instances: most instances in a batch.
    :param max_bytes: most bytes in a batch (``"20GiB"``, ``"500MB"`` or a number of bytes).
    """

    max_instances: Annotated[int, Field(ge=1)] = 5000
    max_bytes: PositiveByteSize = ByteSize(20 * 2**30)


class LedgerConfig(_Section):
    """Where the per-instance state of a site is kept; at most one of the two keys.

    With neither, the ledger is the PostgreSQL connection named by
    ``$DICOM_INGEST_LEDGER_CONN_ID`` if set, else a SQLite file in the site's data folder.

    :param path: a SQLite file.
    :param conn_id: an Airflow connection to a PostgreSQL database.
    """

    path: Location | None = None
    conn_id: ConnId | None = None

    @model_validator(mode="after")
    def _at_most_one_target(self) -> LedgerConfig:
        """Refuse a ledger that names both a file and a connection."""
        if self.path is not None and self.conn_id is not None:
            raise ValueError("give either path (SQLite) or conn_id (PostgreSQL), not both")
        return self


class SensorConfig(_Section):
    """How the order sensor waits for the vendor to finish a batch's orders.

    :param poke_interval: seconds between two status checks.
    :param timeout: seconds after which still unfinished orders fail the task.
    """

    poke_interval: Seconds = 60.0
    timeout: Seconds = 6 * 3600.0


class SiteConfig(_Section):
    """One hospital site: where its files are staged, when and how they are sent to the vendor.

    :param id: short name, ``[a-z0-9_]+``; the site's DAG is ``dicom_ingest__<id>``.
    :param enabled: whether the site gets a DAG.
    :param schedule: a five-field cron expression or a preset such as ``@daily``.
    :param timezone: IANA time zone the schedule is read in.
    :param start_date: first day the schedule covers.
    :param catchup: whether Airflow runs the intervals missed since ``start_date``.
    :param staging: the staging location, e.g. ``s3://conn@bucket/site/{{ ds }}``.
    :param conn_id: the Airflow connection to the vendor's API.
    :param metadata: where order metadata comes from.
    :param required_metadata: fields a study must have before its first byte is sent; a study
        lacking one is held back.
    :param upload_concurrency: parallel uploads within one batch (the vendor allows 20).
    :param quarantine: what happens to invalid files.
    :param invalid_threshold: how many invalid files fail a run before any upload.
    :param batch: limits of one batch.
    :param max_active_batches: batches of one run uploading at the same time.
    :param pool: the Airflow pool shared by every task that calls the vendor.
    :param retries: task retries.
    :param retry_delay_seconds: seconds between task retries.
    :param owner: the DAG's owner.
    :param tags: extra DAG tags.
    :param max_file_size: larger files are quarantined as ``too_large``.
    :param scan_processes: processes that parse the headers of a local staging area (Linux);
        ``None`` (the default) uses the task's CPUs, at most 8; 1 parses in the task's process.
    :param scan_threads: threads that read the headers of an object-store staging area at once;
        ``None`` (the default) uses 16; 1 reads one file at a time.
    :param work_location: where a run's plan is written (default ``dicom_ingest/<id>/work``).
    :param reports_location: where run reports go (default ``dicom_ingest/<id>/reports``).
    :param ledger: where the site's ledger lives.
    :param sensor: how the order sensor polls.
    """

    id: SiteId
    enabled: bool = True
    schedule: CronSchedule
    timezone: TimezoneName = "UTC"
    start_date: date = DEFAULT_START_DATE
    catchup: bool = False
    staging: Location
    conn_id: ConnId
    metadata: MetadataSources = Field(default_factory=MetadataSources)
    required_metadata: tuple[MetadataField, ...] = DEFAULT_REQUIRED_METADATA
    upload_concurrency: Annotated[int, Field(ge=1, le=VENDOR_MAX_PARALLEL_UPLOADS)] = 8
    quarantine: QuarantineConfig = Field(default_factory=QuarantineConfig)
    invalid_threshold: InvalidThreshold = Field(default_factory=InvalidThreshold)
    batch: BatchLimits = Field(default_factory=BatchLimits)
    max_active_batches: Annotated[int, Field(ge=1)] = 2
    pool: Annotated[str, StringConstraints(min_length=1, max_length=256)] = DEFAULT_POOL
    retries: Annotated[int, Field(ge=0)] = 2
    retry_delay_seconds: Annotated[float, Field(ge=0)] = 60.0
    owner: Annotated[str, StringConstraints(min_length=1)] = DEFAULT_OWNER
    tags: tuple[DagTag, ...] = ()
    max_file_size: Annotated[ByteSize, Field(gt=0, le=SINGLE_PUT_MAX_BYTES)] = ByteSize(SINGLE_PUT_MAX_BYTES)
    scan_processes: Annotated[int, Field(ge=1)] | None = None
    scan_threads: Annotated[int, Field(ge=1)] | None = None
    work_location: Location
    reports_location: Location
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)
    sensor: SensorConfig = Field(default_factory=SensorConfig)

    @model_validator(mode="before")
    @classmethod
    def _default_data_locations(cls, data: Any) -> Any:
        """Place the work and reports folders in the site's data folder unless given.

        Filled in even when ``id`` is missing or invalid, so that only ``id`` is reported then.
        """
        if not isinstance(data, dict):
            return data
        folder = site_data_folder(str(data.get("id")))
        defaults = {"work_location": f"{folder}/work", "reports_location": f"{folder}/reports"}
        return {**data, **{key: value for key, value in defaults.items() if data.get(key) is None}}

    @field_validator("required_metadata", "tags")
    @classmethod
    def _no_repeats(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        """Reject a list that names the same item twice."""
        return _reject_repeats(values)

    @field_validator("required_metadata")
    @classmethod
    def _required_fields_have_a_source(cls, fields: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        """Reject a required field that no configured metadata source can supply."""
        sources = info.data.get("metadata")
        if sources is None:  # metadata itself is invalid and already reported
            return fields
        unsourced = [field for field in fields if not sources.can_provide(field)]
        if unsourced:
            raise ValueError(
                f"no metadata source provides {', '.join(unsourced)}: map it in metadata.tags, "
                "or configure metadata.sidecar or metadata.manifest"
            )
        return fields

    @property
    def dag_id(self) -> str:
        """Return the id of the site's DAG."""
        return f"{DAG_ID_PREFIX}{self.id}"

    @property
    def default_ledger_path(self) -> str:
        """Return the SQLite ledger used when neither the site nor the environment names one."""
        return f"{site_data_folder(self.id)}/ledger.sqlite"


def site_data_folder(site_id: str) -> str:
    """Return the folder, relative to ``$AIRFLOW_HOME``, holding a site's default data locations.

    :param site_id: the site's id.
    """
    return f"dicom_ingest/{site_id}"


class SitesFile(BaseModel):
    """A whole sites file: a top-level ``sites:`` list with unique ids.

    Other top-level keys must start with ``x-``; they hold YAML anchors shared by entries
    (``x-defaults: &defaults`` then ``<<: *defaults`` in an entry). Validating this model
    accepts a file only if every entry is valid; :func:`dicom_ingest.sites.loader.load_sites`
    validates entries one by one instead, so one bad site does not hide the others.

    :param sites: the sites, in file order.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    sites: tuple[SiteConfig, ...]

    @model_validator(mode="after")
    def _check_file(self) -> SitesFile:
        """Reject unknown top-level keys and repeated site ids."""
        unknown = unknown_top_level_keys(self.model_extra or {})
        if unknown:
            raise ValueError(f"unknown top-level keys {', '.join(unknown)}: only sites and x-* are allowed")
        repeated = repeated_ids(site.id for site in self.sites)
        if repeated:
            raise ValueError(f"site ids must be unique: {', '.join(sorted(repeated))} appear more than once")
        return self

    @property
    def enabled_sites(self) -> tuple[SiteConfig, ...]:
        """Return the sites that get a DAG."""
        return tuple(site for site in self.sites if site.enabled)


def unknown_top_level_keys(keys: Iterable[Any]) -> list[str]:
    """Return the top-level keys of a sites file that are neither ``sites`` nor ``x-*``.

    :param keys: the file's top-level keys.
    """
    return sorted(str(key) for key in keys if key != "sites" and not str(key).startswith("x-"))


def repeated_ids(ids: Iterable[str]) -> set[str]:
    """Return the values that occur more than once.

    :param ids: site ids (or other names) in file order.
    """
    return {value for value, count in Counter(ids).items() if count > 1}
