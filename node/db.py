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
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker, Session

from node.states import InstanceState, JobState, Priority, StudyState


def now() -> float:
    return time.time()


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
    """A study's AI triage priority. A separate table (not a Study column) so
    existing databases gain it through create_all without a migration. The
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
    """Bearer tokens; only the SHA-256 of the secret is ever stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(32))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


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


class Database:
    def __init__(self, url: str):
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite:
            if parsed.database:
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            _tune_sqlite(self.engine)
        else:
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_schema(self) -> None:
        Base.metadata.create_all(self.engine)

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
