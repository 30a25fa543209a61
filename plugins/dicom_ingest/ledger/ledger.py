"""The ledger: durable per-instance and per-study state shared by every worker of a site.

Every public operation is one database transaction, safe to repeat, and safe while other
processes write the same rows: studies are locked with ``SELECT ... FOR UPDATE`` on PostgreSQL,
and SQLite write transactions start with ``BEGIN IMMEDIATE`` so they run one at a time. Lock
waits and deadlocks are retried (the whole transaction) for a bounded time.

Lock order, to keep PostgreSQL free of deadlocks: a study's row before its instances' rows, and
rows of one kind in UID order.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import URL, Engine, func, inspect, make_url, select, update
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_delay, wait_random_exponential

from dicom_ingest.ledger import queries
from dicom_ingest.ledger.engine import (
    WRITE_OPTION,
    create_ledger_engine,
    dialect_insert,
    is_transient,
    url_for_location,
    url_from_airflow_connection,
)
from dicom_ingest.ledger.errors import (
    ClaimLostError,
    LedgerConfigError,
    LedgerError,
    LedgerStateError,
    UnknownStudyError,
)
from dicom_ingest.ledger.instances import record_instance_outcomes
from dicom_ingest.ledger.models import (
    INSTANCE_SENT_STATES,
    QUARANTINED_PATH_WHERE,
    Event,
    EventReason,
    Instance,
    InstanceState,
    LedgerBase,
    Study,
    StudyState,
)
from dicom_ingest.ledger.planning import PLAN_CHUNK_INSTANCES, PlanScope, plan_chunks, record_plan_chunk
from dicom_ingest.ledger.records import (
    BatchStudy,
    ClaimAction,
    EventRecord,
    InstanceUpload,
    PlannedStudy,
    PlanResult,
    ReasonCount,
    RunSummary,
    SiteSummary,
    StudyClaim,
    StudyDetail,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")

DEFAULT_LEASE = timedelta(minutes=2)
"""How long a claim stays live after its last sign of life (claim, instance recorded, renewal)."""

DEFAULT_BUSY_TIMEOUT = 30.0
"""Seconds one SQLite attempt waits for the write lock."""

DEFAULT_RETRY_TIMEOUT = 120.0
"""Seconds a transaction keeps being retried after lock timeouts, deadlocks or dropped connections."""

_SCHEMA_LOCK_KEY = 0x44494E47
"""PostgreSQL advisory lock serialising concurrent ``create_all`` calls."""

_SKIP_STATES = frozenset({StudyState.VERIFIED, StudyState.METADATA_SENT, StudyState.HELD})
_RESUMABLE_STATES = frozenset({StudyState.UPLOADING, StudyState.UPLOADED, StudyState.FAILED})
_PAST_UPLOAD_STATES = frozenset({StudyState.UPLOADED, StudyState.METADATA_SENT, StudyState.VERIFIED})


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _upload_changes(uploads: Iterable[InstanceUpload]) -> dict[str, dict[str, Any]]:
    """Return the instance columns an upload sets, by SOP UID (a later upload of a UID wins).

    :param uploads: the uploaded instances.
    """
    return {
        upload.sop_uid: {
            "key": upload.key,
            "md5": upload.md5,
            "etag": upload.etag,
            "reason": None,
            "message": None,
        }
        for upload in uploads
    }


def default_claim_owner() -> str:
    """Name this process as a claim owner: ``<host>:<pid>``."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Ledger:
    """Durable per-instance and per-study state of the ingestion, shared by every worker of a site.

    The tables are created on first use. Several processes may open the same ledger at once; a
    ``Ledger`` object must not cross a ``fork`` (open one per process).

    :param url: SQLAlchemy URL: ``sqlite:///<path>`` (the default kind) or ``postgresql+psycopg2://...``.
    :param lease: how long a study claim stays live without a sign of life from its owner; an older
        claim may be taken over by another worker.
    :param clock: returns the current time as an aware datetime (tests pass a controllable one).
    :param busy_timeout: seconds one SQLite attempt waits for the write lock.
    :param retry_timeout: seconds a transaction is retried after lock timeouts and deadlocks.
    """

    def __init__(
        self,
        url: str | URL,
        *,
        lease: timedelta = DEFAULT_LEASE,
        clock: Callable[[], datetime] | None = None,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
    ) -> None:
        if lease <= timedelta(0):
            raise LedgerConfigError("the claim lease must be positive")
        if busy_timeout <= 0:
            raise LedgerConfigError("the ledger's busy timeout must be positive")
        if retry_timeout < 0:
            raise LedgerConfigError("the ledger's retry timeout must not be negative")
        try:
            self.url = make_url(url)
        except ArgumentError as exc:
            raise LedgerConfigError("the ledger URL is not a SQLAlchemy database URL") from exc
        self.engine: Engine = create_ledger_engine(self.url, busy_timeout=busy_timeout)
        self._write_engine = self.engine.execution_options(**{WRITE_OPTION: True})
        self._lease = lease
        self._clock = clock or _utc_now
        self._retry_timeout = retry_timeout
        self._schema_ready = False
        self._schema_lock = threading.Lock()

    @classmethod
    def from_airflow_connection(cls, conn_id: str, **options: Any) -> Ledger:
        """Open the ledger in the PostgreSQL database of an Airflow ``postgres`` connection.

        :param conn_id: id of the Airflow connection.
        :param options: keyword arguments of :class:`Ledger`.
        """
        return cls(url_from_airflow_connection(conn_id), **options)

    @classmethod
    def for_location(cls, location: str | os.PathLike[str], **options: Any) -> Ledger:
        """Open the ledger at a work location: a directory, a SQLite file path or a database URL.

        :param location: a directory (holding ``ledger.sqlite3``), a file path, a ``file://`` URI,
            or a ``sqlite://`` / ``postgresql://`` URL.
        :param options: keyword arguments of :class:`Ledger`.
        """
        return cls(url_for_location(location), **options)

    def __repr__(self) -> str:
        return f"Ledger({self.url.render_as_string(hide_password=True)!r})"

    def close(self) -> None:
        """Close the ledger's database connections."""
        self.engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *_exc_info: object) -> None:
        self.close()

    # -- transactions ---------------------------------------------------------------------------

    def _transaction(self, work: Callable[[Session], _T], *, write: bool, purpose: str) -> _T:
        """Run ``work`` in one transaction, again from the start after a transient failure.

        :param work: does the reads and writes; may run more than once.
        :param write: whether the transaction writes (takes SQLite's write lock at ``BEGIN``).
        :param purpose: what the transaction does, for the error message.
        """
        self._ensure_schema()
        return self._run(work, write=write, purpose=purpose)

    def _run(self, work: Callable[[Session], _T], *, write: bool, purpose: str) -> _T:
        """Run ``work`` in a transaction, retried while it fails transiently; wrap database errors."""
        engine = self._write_engine if write else self.engine
        retrying = Retrying(
            retry=retry_if_exception(is_transient),
            stop=stop_after_delay(self._retry_timeout),
            wait=wait_random_exponential(multiplier=0.05, max=2.0),
            before_sleep=self._log_retry,
            reraise=True,
        )

        def attempt() -> _T:
            with Session(engine, expire_on_commit=False) as session, session.begin():
                return work(session)

        try:
            return retrying(attempt)
        except SQLAlchemyError as exc:
            raise LedgerError(f"the ledger could not {purpose}: {type(exc).__name__}") from exc

    @staticmethod
    def _log_retry(retry_state: RetryCallState) -> None:
        """Log which transient error is being retried (the error class only, never its text)."""
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        log.info(
            "Ledger transaction hit %s; retrying [Try %d]",
            type(error).__name__,
            retry_state.attempt_number,
        )

    def _ensure_schema(self) -> None:
        """Create the tables on first use; a read-only check first spares the write lock."""
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            if not self._run(self._tables_exist, write=False, purpose="look for its tables"):
                self._run(self._create_tables, write=True, purpose="create its tables")
            self._schema_ready = True

    @staticmethod
    def _tables_exist(session: Session) -> bool:
        """Tell whether every ledger table exists."""
        inspector = inspect(session.connection())
        return all(inspector.has_table(table.name) for table in LedgerBase.metadata.sorted_tables)

    @staticmethod
    def _create_tables(session: Session) -> None:
        """Create the missing ledger tables, one creator at a time."""
        connection = session.connection()
        if connection.dialect.name == "postgresql":
            connection.execute(select(func.pg_advisory_xact_lock(_SCHEMA_LOCK_KEY)))
        LedgerBase.metadata.create_all(connection)

    # -- row access -----------------------------------------------------------------------------

    @staticmethod
    def _locked_study(session: Session, site_id: str, study_uid: str) -> Study:
        """Return the study row locked for update, or raise :class:`UnknownStudyError`."""
        study = session.scalars(
            select(Study).where(Study.site_id == site_id, Study.study_uid == study_uid).with_for_update()
        ).one_or_none()
        if study is None:
            raise UnknownStudyError(f"study {study_uid} was never planned for site {site_id!r}")
        return study

    @staticmethod
    def _add_event(
        session: Session,
        study: Study,
        *,
        from_state: str | None,
        to_state: str,
        reason: str | None,
        at: datetime,
        sop_uid: str | None = None,
    ) -> None:
        """Append a history row for the study (or one of its instances) in the study's run."""
        session.add(
            Event(
                site_id=study.site_id,
                run_id=study.run_id,
                study_uid=study.study_uid,
                sop_uid=sop_uid,
                from_state=from_state,
                to_state=to_state,
                reason=reason,
                at=at,
            )
        )

    def _transition(self, session: Session, study: Study, to_state: str, reason: str | None) -> None:
        """Move a study to ``to_state``, release its claim and record the event."""
        now = self._clock()
        self._add_event(session, study, from_state=study.state, to_state=to_state, reason=reason, at=now)
        study.state = to_state
        study.updated_at = now
        study.claim_token = None
        study.claim_owner = None
        study.claimed_at = None
        study.heartbeat_at = None

    @staticmethod
    def _check_token(study: Study, token: str | None) -> None:
        """Raise :class:`ClaimLostError` when a token is given and no longer holds the claim."""
        if token is not None and study.claim_token != token:
            raise ClaimLostError(
                f"the claim on study {study.study_uid} of site {study.site_id!r} is no longer the caller's"
            )

    def _claim_is_live(self, study: Study, now: datetime) -> bool:
        """Tell whether the study's claim showed a sign of life within the lease."""
        if study.claim_token is None:
            return False
        signs_of_life = [moment for moment in (study.claimed_at, study.heartbeat_at) if moment is not None]
        return bool(signs_of_life) and now - max(signs_of_life) < self._lease

    @staticmethod
    def _set_instances(session: Session, study: Study, where: Any, **values: Any) -> None:
        """Update the study's instances (never its quarantined files) that match ``where``."""
        session.execute(
            update(Instance)
            .where(
                Instance.site_id == study.site_id,
                Instance.study_uid == study.study_uid,
                Instance.sop_uid.is_not(None),
                where,
            )
            .values(**values)
            .execution_options(synchronize_session=False)
        )

    # -- planning -------------------------------------------------------------------------------

    def record_plan(
        self, site_id: str, run_id: str, batch_id: str, studies: Iterable[PlannedStudy]
    ) -> PlanResult:
        """Record the studies and instances a batch of a run plans to send.

        New studies and instances are inserted as ``planned``. A study the vendor already confirmed
        (``verified``) is left exactly as it is and counted as already done. Other known studies move
        to this run and batch; ``held`` and ``failed`` ones become ``planned`` again, the rest keep
        their state (:meth:`claim_study` decides what to do with them). A known instance takes the
        planned path and size; one whose size changed is planned again. Rows are written with a
        few multi-row statements per 5,000 instances, never one statement per instance.

        :param site_id: the site.
        :param run_id: the Airflow run planning the studies.
        :param batch_id: the batch of the run the studies belong to.
        :param studies: the planned studies with their instances (one batch; read into memory once).
        """
        planned = list(studies)
        scope = PlanScope(site_id, run_id, batch_id)
        return self._transaction(
            lambda session: sum(
                (
                    record_plan_chunk(session, scope, chunk, self._clock())
                    for chunk in plan_chunks(planned, PLAN_CHUNK_INSTANCES)
                ),
                PlanResult(),
            ),
            write=True,
            purpose="record the plan",
        )

    def done_studies(self, site_id: str, study_uids: Iterable[str]) -> set[str]:
        """Return which of ``study_uids`` the vendor already confirmed (state ``verified``).

        :param site_id: the site.
        :param study_uids: candidate studies of a plan.
        """
        uids = sorted(set(study_uids))
        return self._transaction(
            lambda session: queries.verified_study_uids(session, site_id, uids),
            write=False,
            purpose="look up done studies",
        )

    def is_study_done(self, site_id: str, study_uid: str) -> bool:
        """Tell whether the vendor already confirmed the study (state ``verified``).

        :param site_id: the site.
        :param study_uid: the study.
        """
        return bool(self.done_studies(site_id, [study_uid]))

    # -- claims ---------------------------------------------------------------------------------

    def claim_study(
        self,
        site_id: str,
        study_uid: str,
        run_id: str,
        batch_id: str,
        *,
        owner: str | None = None,
        resume_window: timedelta | None = None,
    ) -> StudyClaim:
        """Claim a planned study for upload and tell the caller what to do with it.

        ``skip``: the study is verified, its metadata is with the vendor (``metadata_sent``: its
        order is confirmed, the sensor follows it) or it is held back; it is never re-sent.
        ``busy``: another owner's claim is live. ``resume_metadata``: every instance is uploaded
        but the metadata is not confirmed; the caller attaches it (``resume_window`` turns uploads
        too old for that into re-sends). ``upload_all``: upload every instance; when bytes went out
        before (an interrupted or failed earlier attempt, or a failed study planned again) this is
        a deliberate re-send of the whole study: ``resend_count`` grows, an event records it, and
        every instance is ``planned`` again.

        A claim whose owner showed no sign of life for the lease is taken over (recorded as such).
        An owner re-claiming its own study takes it back at once, so passing a stable owner (the
        identity of the mapped task group instance, say) lets a retried task resume without
        waiting for the lease. Marking the study uploaded, sent, verified, failed or held ends the
        claim; :meth:`release_claim` ends it without a transition.

        :param site_id: the site.
        :param study_uid: the study.
        :param run_id: the run doing the work.
        :param batch_id: the batch of the run doing the work.
        :param owner: who claims; defaults to ``<host>:<pid>``.
        :param resume_window: resume metadata only if the last instance went up within this time
            (the vendor fails an order left without metadata); older uploads are re-sent whole.
        """
        claimant = owner or default_claim_owner()
        return self._transaction(
            lambda session: self._claim(
                session, site_id, study_uid, run_id, batch_id, claimant, resume_window
            ),
            write=True,
            purpose="claim a study",
        )

    def _claim(
        self,
        session: Session,
        site_id: str,
        study_uid: str,
        run_id: str,
        batch_id: str,
        owner: str,
        resume_window: timedelta | None,
    ) -> StudyClaim:
        """Decide and record the claim inside the transaction (see :meth:`claim_study`)."""
        now = self._clock()
        study = self._locked_study(session, site_id, study_uid)
        if study.state in _SKIP_STATES:
            return self._claim_answer(study, ClaimAction.SKIP)
        if study.claim_owner != owner and self._claim_is_live(study, now):
            log.info("Study %s of site %s is claimed by %s", study_uid, site_id, study.claim_owner)
            return self._claim_answer(study, ClaimAction.BUSY)
        previous_state = study.state
        took_over = study.claim_token is not None
        study.run_id, study.batch_id = run_id, batch_id
        if took_over:
            log.warning(
                "Taking over the claim of %s on study %s of site %s", study.claim_owner, study_uid, site_id
            )
            self._add_event(
                session,
                study,
                from_state=previous_state,
                to_state=previous_state,
                reason=EventReason.CLAIM_TAKEN_OVER,
                at=now,
            )
        counts = self._instance_state_counts(session, study)
        last_upload = self._resumable_upload_time(session, study, counts, resume_window, now)
        resent = False
        if last_upload is not None:
            action, new_state, reason = (
                ClaimAction.RESUME_METADATA,
                StudyState.UPLOADED,
                EventReason.RESUME_METADATA,
            )
            study.uploaded_at = last_upload
        else:
            action, new_state = ClaimAction.UPLOAD_ALL, StudyState.UPLOADING
            resent = self._restart_upload(session, study, counts, now)
            reason = EventReason.RESEND if resent else EventReason.CLAIMED
        study.reason = None
        self._add_event(session, study, from_state=previous_state, to_state=new_state, reason=reason, at=now)
        study.state = new_state
        study.claim_token = uuid.uuid4().hex
        study.claim_owner = owner
        study.claimed_at = study.heartbeat_at = study.updated_at = now
        return self._claim_answer(study, action, resent=resent, took_over=took_over)

    @staticmethod
    def _instance_state_counts(session: Session, study: Study) -> dict[str, int]:
        """Count the study's instances per state."""
        return dict(
            session.execute(
                select(Instance.state, func.count())
                .where(
                    Instance.site_id == study.site_id,
                    Instance.study_uid == study.study_uid,
                    Instance.sop_uid.is_not(None),
                )
                .group_by(Instance.state)
            ).all()
        )

    @staticmethod
    def _resumable_upload_time(
        session: Session,
        study: Study,
        counts: dict[str, int],
        resume_window: timedelta | None,
        now: datetime,
    ) -> datetime | None:
        """Return when the study finished uploading if its metadata can still follow, else ``None``."""
        all_uploaded = bool(counts) and set(counts) == {InstanceState.UPLOADED}
        if not all_uploaded or study.state not in _RESUMABLE_STATES:
            return None
        uploaded_at = study.uploaded_at or session.scalar(
            select(func.max(Instance.updated_at)).where(
                Instance.site_id == study.site_id,
                Instance.study_uid == study.study_uid,
                Instance.sop_uid.is_not(None),
            )
        )
        if uploaded_at is None or (resume_window is not None and now - uploaded_at > resume_window):
            return None
        return uploaded_at

    def _restart_upload(self, session: Session, study: Study, counts: dict[str, int], now: datetime) -> bool:
        """Plan every instance of the study again; return whether this re-sends bytes sent before."""
        resent = study.state == StudyState.UPLOADING or any(
            counts.get(state) for state in INSTANCE_SENT_STATES
        )
        if resent:
            study.resend_count += 1
            log.warning(
                "Re-sending study %s of site %s whole (re-send %d)",
                study.study_uid,
                study.site_id,
                study.resend_count,
            )
        self._set_instances(
            session,
            study,
            Instance.state != InstanceState.PLANNED,
            state=InstanceState.PLANNED,
            key=None,
            md5=None,
            etag=None,
            order_id=None,
            reason=None,
            message=None,
            run_id=study.run_id,
            batch_id=study.batch_id,
            updated_at=now,
        )
        study.attempts += 1
        study.uploaded_at = None
        return resent

    @staticmethod
    def _claim_answer(
        study: Study, action: ClaimAction, *, resent: bool = False, took_over: bool = False
    ) -> StudyClaim:
        """Describe the claim to the caller; only the new owner gets the token."""
        holds_claim = action in (ClaimAction.UPLOAD_ALL, ClaimAction.RESUME_METADATA)
        return StudyClaim(
            action=action,
            site_id=study.site_id,
            study_uid=study.study_uid,
            state=str(study.state),
            token=study.claim_token if holds_claim else None,
            owner=study.claim_owner,
            claimed_at=study.claimed_at,
            reason=study.reason,
            order_id=study.order_id,
            resend_count=study.resend_count,
            resent=resent,
            took_over=took_over,
            uploaded_at=study.uploaded_at,
        )

    def renew_claim(self, site_id: str, study_uid: str, token: str) -> None:
        """Show that the claim's owner is alive (during a long upload), extending its lease.

        :param site_id: the site.
        :param study_uid: the study.
        :param token: the token of the caller's claim.
        :raises ClaimLostError: the claim was taken over or released.
        """

        def work(session: Session) -> None:
            study = self._locked_study(session, site_id, study_uid)
            self._check_token(study, token)
            study.heartbeat_at = self._clock()

        self._transaction(work, write=True, purpose="renew a claim")

    def release_claim(self, site_id: str, study_uid: str, token: str) -> bool:
        """Give up a claim without changing the study's state, so another worker may claim it now.

        :param site_id: the site.
        :param study_uid: the study.
        :param token: the token of the caller's claim.
        :returns: ``False`` when the claim was no longer the caller's (nothing changes).
        """

        def work(session: Session) -> bool:
            study = self._locked_study(session, site_id, study_uid)
            if study.claim_token != token:
                return False
            study.claim_token = study.claim_owner = None
            study.claimed_at = study.heartbeat_at = None
            study.updated_at = self._clock()
            return True

        return self._transaction(work, write=True, purpose="release a claim")

    # -- instance transitions -------------------------------------------------------------------

    def mark_instances_uploaded(self, site_id: str, uploads: Iterable[InstanceUpload]) -> set[str]:
        """Record that instances reached the vendor's store, in one transaction of a few statements.

        Each instance follows the rules of :meth:`mark_instance_uploaded`: recording the same upload
        again (same key, MD5 and ETag) or an instance past upload changes nothing, and the claims of
        the studies being uploaded are renewed. An instance given twice is recorded with its last
        values. One unknown instance refuses the whole call.

        :param site_id: the site.
        :param uploads: the uploaded instances, in the order their history is written.
        :returns: the SOP UIDs whose record changed.
        :raises UnknownStudyError: an instance was never planned for the site (nothing is recorded).
        """
        return self._record_instances(
            site_id,
            InstanceState.UPLOADED,
            _upload_changes(uploads),
            repeat_is_no_op=True,
            purpose="record uploaded instances",
        )

    def mark_instance_uploaded(
        self, site_id: str, sop_uid: str, key: str, md5: str, etag: str | None
    ) -> bool:
        """Record that an instance reached the vendor's store; it also renews the study's claim.

        :param site_id: the site.
        :param sop_uid: the instance.
        :param key: the object key the vendor gave for it.
        :param md5: hex MD5 of the bytes sent.
        :param etag: the ETag the store answered with.
        :returns: whether anything changed (``False`` when repeated, or past this stage already).
        """
        changed = self._record_instances(
            site_id,
            InstanceState.UPLOADED,
            _upload_changes([InstanceUpload(sop_uid, key, md5, etag)]),
            repeat_is_no_op=True,
            purpose="record an uploaded instance",
        )
        return sop_uid in changed

    def mark_instance_failed(
        self, site_id: str, sop_uid: str, reason: str, message: str | None = None
    ) -> bool:
        """Record a failed upload attempt of an instance; every call counts one more attempt.

        :param site_id: the site.
        :param sop_uid: the instance.
        :param reason: a reason code (no tag values).
        :param message: a human message naming the file, without tag values.
        :returns: ``False`` when the instance is already past upload (nothing changes).
        """
        changes = {sop_uid: {"reason": reason, "message": message}}
        return sop_uid in self._record_instances(
            site_id, InstanceState.FAILED, changes, repeat_is_no_op=False, purpose="record a failed instance"
        )

    def _record_instances(
        self,
        site_id: str,
        to_state: InstanceState,
        changes: dict[str, dict[str, Any]],
        *,
        repeat_is_no_op: bool,
        purpose: str,
    ) -> set[str]:
        """Move instances to ``to_state`` in one transaction (see :func:`record_instance_outcomes`).

        :param site_id: the site.
        :param to_state: the instances' new state.
        :param changes: SOP UID → new column values.
        :param repeat_is_no_op: whether the same values recorded again change nothing.
        :param purpose: what the transaction does, for the error message.
        :returns: the SOP UIDs whose record changed.
        """
        if not changes:
            return set()
        return self._transaction(
            lambda session: record_instance_outcomes(
                session, site_id, to_state, changes, self._clock(), repeat_is_no_op=repeat_is_no_op
            ),
            write=True,
            purpose=purpose,
        )

    def mark_quarantined(
        self,
        site_id: str,
        run_id: str,
        path: str,
        reason: str,
        message: str,
        *,
        study_uid: str | None = None,
        size: int = 0,
    ) -> None:
        """Record a staged file that was not sent, keyed by its path (it may have no SOP UID).

        Recording the same path again updates the row; ``attempts`` counts how often it was seen.

        :param site_id: the site.
        :param run_id: the run that found the file.
        :param path: where the file is staged.
        :param reason: the reason code (``not_dicom``, ``zero_byte``, ...).
        :param message: a human message naming the file, without tag values.
        :param study_uid: the study the file claims to belong to, if readable.
        :param size: the file's size in bytes, if known.
        """

        def work(session: Session) -> None:
            now = self._clock()
            instances = Instance.__table__
            upsert = dialect_insert(session)(instances).values(
                site_id=site_id,
                study_uid=study_uid,
                sop_uid=None,
                path=path,
                size=size,
                state=InstanceState.QUARANTINED,
                reason=reason,
                message=message,
                attempts=1,
                run_id=run_id,
                created_at=now,
                updated_at=now,
            )
            upsert = upsert.on_conflict_do_update(
                index_elements=["site_id", "path"],
                index_where=QUARANTINED_PATH_WHERE,
                set_={
                    "study_uid": func.coalesce(upsert.excluded.study_uid, instances.c.study_uid),
                    "size": upsert.excluded.size,
                    "reason": upsert.excluded.reason,
                    "message": upsert.excluded.message,
                    "run_id": upsert.excluded.run_id,
                    "attempts": instances.c.attempts + 1,
                    "updated_at": upsert.excluded.updated_at,
                },
            )
            session.execute(upsert)
            session.add(
                Event(
                    site_id=site_id,
                    run_id=run_id,
                    study_uid=study_uid,
                    sop_uid=None,
                    from_state=None,
                    to_state=InstanceState.QUARANTINED,
                    reason=reason,
                    at=now,
                )
            )

        self._transaction(work, write=True, purpose="record a quarantined file")

    # -- study transitions ----------------------------------------------------------------------

    def mark_study_uploaded(self, site_id: str, study_uid: str, *, token: str | None = None) -> bool:
        """Record that every instance of a study is uploaded, and release the claim.

        :param site_id: the site.
        :param study_uid: the study.
        :param token: the caller's claim token; when given, a lost claim raises :class:`ClaimLostError`.
        :returns: ``False`` when the study is already uploaded or further along.
        :raises LedgerStateError: the study is not being uploaded, or instances are missing.
        """

        def work(session: Session) -> bool:
            study = self._locked_study(session, site_id, study_uid)
            if study.state in _PAST_UPLOAD_STATES:
                return False
            self._check_token(study, token)
            if study.state != StudyState.UPLOADING:
                raise LedgerStateError(
                    f"study {study_uid} of site {site_id!r} is {study.state}, not uploading"
                )
            pending = session.scalar(
                select(func.count()).where(
                    Instance.site_id == site_id,
                    Instance.study_uid == study_uid,
                    Instance.sop_uid.is_not(None),
                    Instance.state != InstanceState.UPLOADED,
                )
            )
            if pending:
                raise LedgerStateError(
                    f"study {study_uid} of site {site_id!r} has {pending} instances not uploaded"
                )
            self._transition(session, study, StudyState.UPLOADED, EventReason.STUDY_UPLOADED)
            study.uploaded_at = study.updated_at
            return True

        return self._transaction(work, write=True, purpose="record an uploaded study")

    def mark_metadata_sent(
        self, site_id: str, study_uid: str, order_id: str, *, token: str | None = None
    ) -> bool:
        """Record that the vendor accepted the study's metadata for an order.

        :param site_id: the site.
        :param study_uid: the study.
        :param order_id: the vendor's order id.
        :param token: the caller's claim token, if it holds one.
        :returns: ``False`` when already recorded for this order, or the study is verified.
        :raises LedgerStateError: the study is not uploaded yet.
        """

        def work(session: Session) -> bool:
            study = self._locked_study(session, site_id, study_uid)
            if study.state == StudyState.VERIFIED or (
                study.state == StudyState.METADATA_SENT and study.order_id == order_id
            ):
                return False
            self._check_token(study, token)
            if study.state not in (StudyState.UPLOADED, StudyState.METADATA_SENT):
                raise LedgerStateError(
                    f"study {study_uid} of site {site_id!r} is {study.state}, not uploaded"
                )
            self._transition(session, study, StudyState.METADATA_SENT, EventReason.METADATA_SENT)
            study.order_id = order_id
            study.reason = None
            self._set_instances(
                session,
                study,
                Instance.state.in_((InstanceState.UPLOADED, InstanceState.METADATA_SENT)),
                state=InstanceState.METADATA_SENT,
                order_id=order_id,
                updated_at=study.updated_at,
            )
            return True

        return self._transaction(work, write=True, purpose="record sent metadata")

    def mark_verified(self, site_id: str, study_uid: str, order_id: str, status: str) -> bool:
        """Record that the vendor confirmed the study's order; the study is never sent again.

        :param site_id: the site.
        :param study_uid: the study.
        :param order_id: the confirmed order.
        :param status: the vendor's status word (``DELIVERED``, ...).
        :returns: ``False`` when already recorded.
        """

        def work(session: Session) -> bool:
            study = self._locked_study(session, site_id, study_uid)
            already = (StudyState.VERIFIED, order_id, status)
            if (study.state, study.order_id, study.order_status) == already:
                return False
            self._transition(session, study, StudyState.VERIFIED, EventReason.VERIFIED)
            study.order_id, study.order_status = order_id, status
            study.reason = None
            study.verified_at = study.updated_at
            self._set_instances(
                session,
                study,
                Instance.state != InstanceState.QUARANTINED,
                state=InstanceState.VERIFIED,
                order_id=order_id,
                updated_at=study.updated_at,
            )
            return True

        return self._transaction(work, write=True, purpose="record a verified study")

    def mark_study_failed(
        self,
        site_id: str,
        study_uid: str,
        reason: str,
        order_id: str | None = None,
        *,
        token: str | None = None,
    ) -> bool:
        """Record that a study failed (upload, metadata or the vendor's order) and release the claim.

        A failed study is planned again by the next run and re-sent whole when claimed.

        :param site_id: the site.
        :param study_uid: the study.
        :param reason: a reason code (no tag values).
        :param order_id: the vendor's order, if one exists.
        :param token: the caller's claim token; when given, a lost claim raises :class:`ClaimLostError`.
        :returns: ``False`` when the study is verified (never undone) or already failed alike.
        """

        def work(session: Session) -> bool:
            study = self._locked_study(session, site_id, study_uid)
            if study.state == StudyState.VERIFIED:
                log.info("Study %s of site %s is verified; not marking it failed", study_uid, site_id)
                return False
            self._check_token(study, token)
            same_order = order_id in (None, study.order_id)
            if study.state == StudyState.FAILED and study.reason == reason and same_order:
                return False
            self._transition(session, study, StudyState.FAILED, reason)
            study.reason = reason
            if order_id is not None:
                study.order_id = order_id
            return True

        return self._transaction(work, write=True, purpose="record a failed study")

    def record_abandoned_order(self, site_id: str, study_uid: str, order_id: str) -> bool:
        """Record an order left behind by a re-send (it will fail at the vendor without metadata).

        :param site_id: the site.
        :param study_uid: the study.
        :param order_id: the abandoned order.
        :returns: ``False`` when the order was already recorded.
        """

        def work(session: Session) -> bool:
            study = self._locked_study(session, site_id, study_uid)
            if order_id in study.abandoned_order_ids:
                return False
            study.abandoned_order_ids = [*study.abandoned_order_ids, order_id]
            if study.order_id == order_id:
                study.order_id = study.order_status = None
            study.updated_at = self._clock()
            self._add_event(
                session,
                study,
                from_state=study.state,
                to_state=study.state,
                reason=EventReason.ORDER_ABANDONED,
                at=study.updated_at,
            )
            return True

        return self._transaction(work, write=True, purpose="record an abandoned order")

    def hold_study(self, site_id: str, study_uid: str, run_id: str, reason: str) -> bool:
        """Hold a study back from upload (``metadata_missing``, ``conflict``, ...).

        The study need not be planned. The next plan that includes it makes it ``planned`` again.

        :param site_id: the site.
        :param study_uid: the study.
        :param run_id: the run holding it back.
        :param reason: the reason code.
        :returns: ``False`` when already held alike, or when its metadata is already with the vendor.
        :raises LedgerStateError: another worker is uploading the study right now.
        """

        def work(session: Session) -> bool:
            now = self._clock()
            session.execute(
                dialect_insert(session)(Study.__table__)
                .values(
                    site_id=site_id,
                    study_uid=study_uid,
                    state=StudyState.PLANNED,
                    attempts=0,
                    resend_count=0,
                    abandoned_order_ids=[],
                    run_id=run_id,
                    instance_count=0,
                    byte_count=0,
                    created_at=now,
                    updated_at=now,
                )
                .on_conflict_do_nothing(index_elements=["site_id", "study_uid"])
            )
            study = self._locked_study(session, site_id, study_uid)
            if study.state in (StudyState.VERIFIED, StudyState.METADATA_SENT):
                return False
            if study.state == StudyState.HELD and (study.reason, study.run_id) == (reason, run_id):
                return False
            if self._claim_is_live(study, now):
                raise LedgerStateError(f"study {study_uid} of site {site_id!r} is being uploaded")
            study.run_id = run_id
            self._transition(session, study, StudyState.HELD, reason)
            study.reason = reason
            return True

        return self._transaction(work, write=True, purpose="hold a study")

    # -- queries --------------------------------------------------------------------------------

    def run_summary(self, site_id: str, run_id: str) -> RunSummary:
        """Count a run's studies and instances per state and reason, with bytes planned and sent.

        :param site_id: the site.
        :param run_id: the run.
        """
        return self._transaction(
            lambda session: queries.run_summary(session, site_id, run_id),
            write=False,
            purpose="summarise a run",
        )

    def site_summary(self, site_id: str) -> SiteSummary:
        """Count a site's studies and instances over every run.

        :param site_id: the site.
        """
        return self._transaction(
            lambda session: queries.site_summary(session, site_id),
            write=False,
            purpose="summarise a site",
        )

    def reasons(self, site_id: str, run_id: str | None = None) -> list[ReasonCount]:
        """Count held, failed and quarantined studies and instances per reason, most frequent first.

        :param site_id: the site.
        :param run_id: only this run (all runs if ``None``).
        """
        return self._transaction(
            lambda session: queries.reason_counts(session, site_id, run_id),
            write=False,
            purpose="count reasons",
        )

    def study_detail(self, site_id: str, study_uid: str) -> StudyDetail | None:
        """Return a study with its instances and its history, or ``None`` if it is unknown.

        :param site_id: the site.
        :param study_uid: the study.
        """
        return self._transaction(
            lambda session: queries.study_detail(session, site_id, study_uid),
            write=False,
            purpose="read a study",
        )

    def studies_in_batch(self, site_id: str, run_id: str, batch_id: str) -> list[BatchStudy]:
        """List the studies of one batch of a run with their orders, in UID order.

        :param site_id: the site.
        :param run_id: the run.
        :param batch_id: the batch.
        """
        return self._transaction(
            lambda session: queries.studies_in_batch(session, site_id, run_id, batch_id),
            write=False,
            purpose="list a batch",
        )

    def run_events(self, site_id: str, run_id: str, *, limit: int | None = None) -> list[EventRecord]:
        """Return a run's history, oldest first.

        :param site_id: the site.
        :param run_id: the run.
        :param limit: at most this many events.
        """
        return self._transaction(
            lambda session: queries.run_events(session, site_id, run_id, limit),
            write=False,
            purpose="read a run's history",
        )
