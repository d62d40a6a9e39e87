"""Database schema and engine.

Times that drive scheduling (`*_at` floats) are Unix epoch seconds: portable
between SQLite and PostgreSQL and cheap to compare. SQLite-specific tuning
lives in `_tune_sqlite` and nowhere else.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker, Session

from node.states import InstanceState, JobState, Priority, StudyState


def now() -> float:
    return time.time()


def server_now(session: Session) -> float:
    """The time that schedules work: leases, retries, study completion.

    On PostgreSQL it is the database server's clock, so several hosts whose
    clocks disagree still agree on when a lease expires or a study is quiet;
    SQLite is one host, so it keeps the local clock (`now`, looked up at call
    time so a test can skew it)."""
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        return float(session.execute(text("SELECT extract(epoch FROM clock_timestamp())")).scalar_one())
    return now()


class Base(DeclarativeBase):
    pass


class Study(Base):
    """One study as sent by one caller: keyed by (calling AE, StudyInstanceUID)
    so that two routes carrying the same UID never merge."""

    __tablename__ = "studies"
    __table_args__ = (UniqueConstraint("calling_ae", "study_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    # For the reading app's worklist (search, date filter), read once from the
    # first instance's header; "" when absent or unreadable. PHI: never log them.
    patient_name: Mapped[str] = mapped_column(String(255), default="", server_default="")
    study_date: Mapped[str] = mapped_column(String(8), default="", server_default="")  # YYYYMMDD
    state: Mapped[str] = mapped_column(String(16), default=StudyState.RECEIVED, index=True)  # node.states
    reason: Mapped[str] = mapped_column(Text, default="")
    first_received_at: Mapped[float] = mapped_column(Float, default=now)
    last_received_at: Mapped[float] = mapped_column(Float, default=now, index=True)
    completed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # When the sender last released an association that carried this study.
    released_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Bumped each time the study is (re)processed; outputs and jobs carry it.
    version: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[float] = mapped_column(Float, default=now, onupdate=now)


class Instance(Base):
    __tablename__ = "instances"
    __table_args__ = (UniqueConstraint("study_id", "sop_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_uid: Mapped[str] = mapped_column(String(64), default="")
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64), default="")
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)  # instances can exceed 2 GiB
    received_at: Mapped[float] = mapped_column(Float, default=now)
    state: Mapped[str] = mapped_column(String(16), default=InstanceState.STORED)  # node.states
    reason: Mapped[str] = mapped_column(Text, default="")
    # SHA-256 of the current file ("" for rows written before hashing existed)
    # and which content this is: 1 for the first, +1 for each changed re-send
    # (see InstanceRevision). Server defaults let `add_missing_columns` add them.
    sha256: Mapped[str] = mapped_column(String(64), default="", server_default="")
    revision: Mapped[int] = mapped_column(Integer, default=1, server_default="1")


class InstanceRevision(Base):
    """Every distinct content received under one SOP Instance UID of a study.

    A re-send with different bytes is kept beside the earlier file (never
    over it); the Instance row points at the newest, this table remembers all,
    so retention can remove every file and an admin can see what changed."""

    __tablename__ = "instance_revisions"
    __table_args__ = (UniqueConstraint("instance_id", "revision"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    received_at: Mapped[float] = mapped_column(Float, default=now)


class NodeEvent(Base):
    """Something an administrator should be able to see after the fact:
    changed content, a mixed-patient study, an orphan file re-registered or
    quarantined, a retention purge, a restore. UIDs and reasons only, never
    patient names or ids."""

    __tablename__ = "node_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[float] = mapped_column(Float, default=now, index=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    study_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)  # no FK: outlives purges
    study_uid: Mapped[str] = mapped_column(String(64), default="")
    sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    detail: Mapped[str] = mapped_column(Text, default="")


class NodeMeta(Base):
    """Small node-wide values that must survive restarts (e.g. the output UID
    salt a restore sets, so a restored node never reissues a UID)."""

    __tablename__ = "node_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text, default="")


class PurgeFile(Base):
    """A file or directory retention has unlinked from the database and is
    about to delete (node/retention.py). The rows go and this entry comes in
    one transaction; the deletion follows and then the entry goes. A crash in
    between leaves the entry, and the next purge or start-up finishes it, so
    the start-up sweep never mistakes a purged file for an orphan."""

    __tablename__ = "purge_files"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    queued_at: Mapped[float] = mapped_column(Float, default=now)


UID_SALT = "uid_salt"  # NodeMeta key: see ScoredStudy.uid_salt


def get_meta(session: Session, key: str) -> str:
    row = session.get(NodeMeta, key)
    return "" if row is None else row.value


def set_meta(session: Session, key: str, value: str) -> None:
    row = session.get(NodeMeta, key)
    if row is None:
        session.add(NodeMeta(key=key, value=value))
    else:
        row.value = value


class Job(Base):
    """One unit of pipeline work, claimed under a lease.

    The unique key makes enqueueing idempotent: a re-run after a crash finds
    the row it already wrote instead of adding a second one."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("study_id", "stage", "destination", "study_version"),
        Index("ix_jobs_claim", "state", "run_after"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    stage: Mapped[str] = mapped_column(String(16))  # node.states.Stage
    destination: Mapped[str] = mapped_column(String(64), default="")
    study_version: Mapped[int] = mapped_column(Integer)
    # pending -> running -> done | dead (pending again after a retryable failure)
    state: Mapped[str] = mapped_column(String(16), default=JobState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    run_after: Mapped[float] = mapped_column(Float, default=now)
    lease_owner: Mapped[str] = mapped_column(String(64), default="")
    lease_until: Mapped[float] = mapped_column(Float, default=0.0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float, default=now)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Start of the current run of failures: deliveries give up by time
    # (`delivery.give_up_after_seconds`), not by attempt count. Cleared on
    # success and when an operator re-queues the job.
    retry_since: Mapped[float | None] = mapped_column(Float, nullable=True)


class Result(Base):
    """One study version's `ScoredStudy` (node/scored_study.py), as its codec's JSON.
    The model columns are copies for listing without decoding."""

    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("study_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    demo: Mapped[bool] = mapped_column(Boolean)
    scored_study: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class Output(Base):
    """An encoded DICOM object waiting for, or already past, delivery."""

    __tablename__ = "outputs"
    __table_args__ = (UniqueConstraint("study_id", "sop_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))  # node.states.OutputKind
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class FhirResource(Base):
    """Every version of every FHIR resource Carina serves (read, vread, _history).

    Search columns are denormalised from the JSON at write time so searches are
    plain indexed SQL on both SQLite and PostgreSQL."""

    __tablename__ = "fhir_resources"
    __table_args__ = (
        UniqueConstraint("resource_type", "resource_id", "version_id"),
        Index("ix_fhir_current", "resource_type", "is_current"),
        Index("ix_fhir_current_effective", "resource_type", "is_current", "effective_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    resource_type: Mapped[str] = mapped_column(String(32))
    resource_id: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[int] = mapped_column(Integer)
    is_current: Mapped[bool] = mapped_column(Boolean, default=True)
    last_updated: Mapped[float] = mapped_column(Float, default=now)
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), nullable=True, index=True)
    patient_system: Mapped[str] = mapped_column(String(128), default="", index=True)
    patient_value: Mapped[str] = mapped_column(String(64), default="", index=True)
    identifier_system: Mapped[str] = mapped_column(String(128), default="")
    identifier_value: Mapped[str] = mapped_column(String(128), default="", index=True)
    status: Mapped[str] = mapped_column(String(32), default="")
    effective_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # clinical date
    # End (exclusive) of the effective instant at its stated precision: a
    # date-only value covers the whole day, which FHIR date search needs.
    effective_end: Mapped[float | None] = mapped_column(Float, nullable=True)
    body: Mapped[str] = mapped_column(Text)


class FhirSearchIndex(Base):
    """Search values of one FHIR resource version, one row per value.

    Token and reference parameters fill system/value; date parameters fill
    low/high, the half-open range [low, high) the value covers at its
    precision. A resource with many identifiers or codings gets one row per
    value, so every FHIR search parameter is a plain indexed EXISTS."""

    __tablename__ = "fhir_search_index"
    __table_args__ = (
        Index("ix_fhir_search_value", "param", "value"),
        Index("ix_fhir_search_range", "param", "low"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    resource_row_id: Mapped[int] = mapped_column(ForeignKey("fhir_resources.id"), index=True)
    param: Mapped[str] = mapped_column(String(40))
    system: Mapped[str] = mapped_column(String(255), default="")
    value: Mapped[str] = mapped_column(String(255), default="")
    low: Mapped[float | None] = mapped_column(Float, nullable=True)
    high: Mapped[float | None] = mapped_column(Float, nullable=True)


class StudyTriage(Base):
    """A study's AI triage priority (a separate table, not a Study column, since
    before migrations a new table was the only change old databases took). The
    priority only ever moves up (node/triage.py)."""

    __tablename__ = "study_triage"

    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), primary_key=True)
    priority: Mapped[str] = mapped_column(String(16), default=Priority.ROUTINE)  # node.states.Priority
    reason: Mapped[str] = mapped_column(Text, default="")
    version: Mapped[int] = mapped_column(Integer, default=0)  # study version that set it
    updated_at: Mapped[float] = mapped_column(Float, default=now)


class InboundOrder(Base):
    """An order (HL7 v2 ORM^O01) received before its images, keyed by accession."""

    __tablename__ = "inbound_orders"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    accession_number: Mapped[str] = mapped_column(String(64), unique=True)
    placer_order_number: Mapped[str] = mapped_column(String(64), default="")
    filler_order_number: Mapped[str] = mapped_column(String(64), default="")
    order_control: Mapped[str] = mapped_column(String(4), default="")  # ORC-1 (NW, XO, CA ...)
    patient_id: Mapped[str] = mapped_column(String(64), default="", index=True)
    procedure_code: Mapped[str] = mapped_column(String(64), default="")
    procedure_text: Mapped[str] = mapped_column(String(255), default="")
    procedure_system: Mapped[str] = mapped_column(String(32), default="")
    priority: Mapped[str] = mapped_column(String(8), default="")  # as ordered (TQ1-9 / OBR-27.6)
    message_control_id: Mapped[str] = mapped_column(String(64), default="")
    received_at: Mapped[float] = mapped_column(Float, default=now)
    updated_at: Mapped[float] = mapped_column(Float, default=now)


class InboundPatient(Base):
    """Demographics from HL7 v2 ADT/ORM PID segments (PHI: never log these)."""

    __tablename__ = "inbound_patients"

    patient_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), default="")  # DICOM PN form Family^Given^Middle^Prefix^Suffix
    birth_date: Mapped[str] = mapped_column(String(8), default="")  # YYYYMMDD
    sex: Mapped[str] = mapped_column(String(1), default="")
    patient_class: Mapped[str] = mapped_column(String(1), default="")  # PV1-2
    message_control_id: Mapped[str] = mapped_column(String(64), default="")
    updated_at: Mapped[float] = mapped_column(Float, default=now)


class ApiToken(Base):
    """Bearer tokens; only the SHA-256 of the secret is ever stored.

    A token without `expires_at` (made before tokens expired) is refused:
    re-issue it with `carina token create --expires-days`."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(32))  # node.api.policy.Role
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Updated at most once a minute (node/api/auth.py), so reads stay reads.
    last_used_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class User(Base):
    """A person who logs in to the web UI. Only an argon2id hash of the password is stored."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(32))  # node.api.policy.Role
    password_hash: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    password_changed_at: Mapped[float] = mapped_column(Float, default=now)
    disabled_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class WebSession(Base):
    """A browser login. The cookie carries a random secret; only its SHA-256 is stored."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    address: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[float] = mapped_column(Float, default=now)
    last_seen_at: Mapped[float] = mapped_column(Float, default=now)
    expires_at: Mapped[float] = mapped_column(Float)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class JobError(Base):
    """The full text of one failed job attempt. It may quote a peer (an EHR's
    OperationOutcome echoing a patient name), so it is kept out of `Job.last_error`,
    the log and every non-admin API field; admins read it at /api/v1/jobs/{id}."""

    __tablename__ = "job_errors"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[float] = mapped_column(Float, default=now)
    summary: Mapped[str] = mapped_column(Text)  # = Job.last_error at the time: class and code, no PHI
    detail: Mapped[str] = mapped_column(Text, default="")


class AuditRecord(Base):
    """One DICOM audit message (PS3.15 A.5), append-only, in a hash chain.

    `hash` is SHA-256 over `prev_hash` and every other column (node/audit/trail.py),
    so an edited or deleted record breaks the chain at that record; the listing
    columns are copies of values in `xml` and are covered by the hash too."""

    __tablename__ = "audit_records"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    recorded_at: Mapped[float] = mapped_column(Float, index=True)
    event_id: Mapped[str] = mapped_column(String(16))  # DCM code, e.g. 110110 Patient Record
    event_type: Mapped[str] = mapped_column(String(16), default="")  # DCM code, e.g. 110122 Login
    action: Mapped[str] = mapped_column(String(1), default="")  # C R U D E
    outcome: Mapped[int] = mapped_column(Integer)  # 0 4 8 12
    user_id: Mapped[str] = mapped_column(String(128), default="")  # the requesting participant
    role: Mapped[str] = mapped_column(String(32), default="")
    address: Mapped[str] = mapped_column(String(64), default="")
    xml: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditPatient(Base):
    """Index: which patients one audit record names (its patient participant objects).
    `carina audit verify` re-derives it from the record's XML, so editing it is detected."""

    __tablename__ = "audit_patients"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    record_seq: Mapped[int] = mapped_column(ForeignKey("audit_records.seq"), index=True)
    patient_id: Mapped[str] = mapped_column(String(64), index=True)


class AuditHead(Base):
    """The chain's last (seq, hash), one row. Appenders lock it, which serialises
    appends across threads and processes; verify compares it with the last record,
    so a truncated tail is detected too."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, default=0)
    hash: Mapped[str] = mapped_column(String(64))


class AuditForwarding(Base):
    """How far each syslog target has received the chain (at-least-once, in order)."""

    __tablename__ = "audit_forwarding"

    target: Mapped[str] = mapped_column(String(255), primary_key=True)
    last_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[float] = mapped_column(Float, default=now)


class ShadowResult(Base):
    """The shadow model's answer for one image of one study version, beside the
    active model's (node/shadow.py). Never read by encode or deliver: nothing
    here is ever published."""

    __tablename__ = "shadow_results"
    __table_args__ = (UniqueConstraint("study_id", "study_version", "sop_instance_uid", "shadow_model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    study_version: Mapped[int] = mapped_column(Integer)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    active_model: Mapped[str] = mapped_column(String(140))  # name@version
    shadow_model: Mapped[str] = mapped_column(String(140), index=True)
    # JSON lists of 14 floats in CHESTXRAY14 order.
    active_probabilities: Mapped[str] = mapped_column(Text)
    active_thresholds: Mapped[str] = mapped_column(Text)
    shadow_probabilities: Mapped[str] = mapped_column(Text)
    shadow_thresholds: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class Feedback(Base):
    """A radiologist's verdict on one AI finding of one image (node/feedback.py).

    The model's verdict it judged is kept with it (`model_positive`), so what
    "agree" meant does not change when the study is scored again. One row per
    author and finding per study version; only its author edits it."""

    __tablename__ = "feedback"
    __table_args__ = (UniqueConstraint("study_id", "study_version", "sop_instance_uid", "label", "user"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    study_version: Mapped[int] = mapped_column(Integer)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(32))  # a CHESTXRAY14 label
    verdict: Mapped[str] = mapped_column(String(16))  # node.states.FeedbackVerdict
    comment: Mapped[str] = mapped_column(Text, default="")
    user: Mapped[str] = mapped_column(String(64))
    model_ref: Mapped[str] = mapped_column(String(140))
    model_positive: Mapped[bool] = mapped_column(Boolean)
    model_probability: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    updated_at: Mapped[float] = mapped_column(Float, default=now)


def _tune_sqlite(engine: Engine) -> None:
    # WAL lets readers proceed beside the writer; synchronous=FULL makes a
    # commit durable before C-STORE success goes out; busy_timeout queues
    # writers across threads instead of failing them.
    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn, _record):
        # Take the write lock at BEGIN: a deferred transaction that reads and
        # then writes can hit SQLITE_BUSY_SNAPSHOT, which busy_timeout does
        # not retry. With IMMEDIATE, SQLite behaves like row locks would.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def add_missing_columns(connection: Connection, exclude: frozenset[str] = frozenset()) -> list[str]:
    """Add columns that the models have and a pre-Alembic database lacks.

    Before migrations existed, start-up ran create_all (which makes missing
    tables but never alters existing ones) and then this. node/schema.py now
    runs it once, when it stamps such a legacy database at the baseline, on
    the migration's connection and under its lock. Only nullable columns or
    ones with a server default are added; every later change is a revision
    in node/migrations/versions/, and the columns later revisions add
    ("table.column") are passed in `exclude` and left to them."""
    added = []
    inspector = inspect(connection)
    for table in Base.metadata.sorted_tables:
        if not inspector.has_table(table.name):
            continue
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present or not (column.nullable or column.server_default is not None):
                continue
            if f"{table.name}.{column.name}" in exclude:
                continue
            ddl = f'ALTER TABLE {table.name} ADD COLUMN {column.name} {column.type.compile(connection.dialect)}'
            if column.server_default is not None:
                ddl += f" DEFAULT {_literal(column.server_default.arg)}"
                ddl += "" if column.nullable else " NOT NULL"
            connection.exec_driver_sql(ddl)
            added.append(f"{table.name}.{column.name}")
    return added


def _literal(value) -> str:
    text_value = str(getattr(value, "text", value))
    return text_value if text_value.lstrip("-").isdigit() else "'" + text_value.replace("'", "''") + "'"


class Database:
    def __init__(self, url: str):
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite:
            if parsed.database:
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            # hide_parameters: an error message must never carry a PatientID or name into a log.
            self.engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                                        hide_parameters=True)
            _tune_sqlite(self.engine)
        else:
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, hide_parameters=True)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_schema(self) -> None:
        """Migrate to this Carina's newest schema revision (node/schema.py), whatever the
        database's state: empty, made before migrations, or behind. Raises
        node.schema.SchemaError for a schema a newer Carina made."""
        from node.schema import upgrade

        upgrade(self)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: commits on success, rolls back on any exception."""
        with self._sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def ping(self) -> bool:
        from sqlalchemy import text

        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    def dispose(self) -> None:
        self.engine.dispose()
