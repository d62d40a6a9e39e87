"""The persisted job queue: enqueue idempotently, claim under a lease, retry
with backoff, dead-letter after the last attempt.

Claiming is `SELECT ... FOR UPDATE SKIP LOCKED` followed by a compare-and-set
UPDATE. PostgreSQL uses both; SQLite ignores the locking clause and relies on
the CAS plus its single writer (BEGIN IMMEDIATE in node/db.py), so the same
code is correct on both.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from node.db import Database, Job, JobError, now
from node.states import JobState, Stage

STAGES = tuple(Stage)


class StageError(Exception):
    """A stage failed. `code` is what `Job.last_error`, the log and the API show:
    PHI-free by construction (a destination name, a status code, an exception
    class). `detail` is the full text, which may quote a peer (an EHR's
    OperationOutcome echoing a patient's name); it goes only to the job's
    error rows (`job_errors`), which admins read."""

    def __init__(self, code: str, detail: str = ""):
        super().__init__(code)
        self.code = code
        self.detail = detail or code


class RetryableError(StageError):
    """Try again later (peer down, transient I/O)."""


class PermanentError(StageError):
    """Retrying cannot help (undecodable input, refused by peer): dead-letter now."""


@dataclass(frozen=True)
class Backoff:
    base: float
    cap: float

    def delay(self, attempt: int) -> float:
        # "Equal jitter": at least half the exponential step, so retries still
        # spread out, but never a near-zero retry storm against a down PACS.
        step = min(self.cap, self.base * 2 ** max(0, attempt - 1))
        return step / 2 + random.uniform(0, step / 2)


def enqueue(session: Session, study_id: int, stage: Stage, version: int, destination: str = "") -> None:
    """Add a job unless the same (study, stage, destination, version) exists."""
    exists = session.scalar(
        select(Job.id).where(
            Job.study_id == study_id,
            Job.stage == stage,
            Job.destination == destination,
            Job.study_version == version,
        )
    )
    if exists is not None:
        return
    try:
        with session.begin_nested():
            session.add(Job(study_id=study_id, stage=stage, destination=destination, study_version=version))
    except IntegrityError:
        pass  # a concurrent enqueue won; same job


def claim(db: Database, owner: str, lease_seconds: float, stages: tuple[Stage, ...] = STAGES) -> Job | None:
    """Take the next runnable job (pending, or running with an expired lease)."""
    t = now()
    runnable = or_(
        and_(Job.state == JobState.PENDING, Job.run_after <= t),
        and_(Job.state == JobState.RUNNING, Job.lease_until < t),  # its worker died
    )
    with db.session() as s:
        candidate = s.scalars(
            select(Job)
            .where(runnable, Job.stage.in_(stages))
            .order_by(Job.run_after, Job.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        ).first()
        if candidate is None:
            return None
        won = s.execute(
            update(Job)
            .where(Job.id == candidate.id, runnable)
            .values(
                state=JobState.RUNNING,
                lease_owner=owner,
                lease_until=t + lease_seconds,
                attempts=Job.attempts + 1,
            )
            .execution_options(synchronize_session=False)
        ).rowcount
        if won != 1:
            return None
        s.refresh(candidate)
        return candidate


def _owned(job: Job):
    # Only the lease holder may settle a job; a worker whose lease expired and
    # was re-claimed must not overwrite the new owner's outcome.
    return and_(Job.id == job.id, Job.lease_owner == job.lease_owner, Job.state == JobState.RUNNING)


class LeaseLost(Exception):
    """This worker's lease expired and the job was claimed again; its work must not commit."""


def settle_in(session: Session, job: Job) -> None:
    """Mark the job done inside the caller's transaction, the one that commits
    the stage's results: the results and "done" commit together or not at all,
    so a crash between them cannot make the stage run (and write) twice.
    Raises LeaseLost (rolling the caller's transaction back) when the lease
    is no longer ours."""
    settled = session.execute(
        update(Job).where(_owned(job)).values(state=JobState.DONE, finished_at=now(), lease_until=0.0, last_error="")
        .execution_options(synchronize_session=False)
    ).rowcount
    if settled != 1:
        raise LeaseLost(f"job {job.id} ({job.stage}) was taken over; its results are discarded")


def succeed(db: Database, job: Job) -> bool:
    """Mark the job done; also True when the stage already did (`settle_in`)."""
    with db.session() as s:
        if s.execute(
            update(Job).where(_owned(job)).values(state=JobState.DONE, finished_at=now(), lease_until=0.0, last_error="")
        ).rowcount == 1:
            return True
        row = s.get(Job, job.id)
        return row is not None and row.state == JobState.DONE and row.lease_owner == job.lease_owner


def fail(db: Database, job: Job, error: str, *, retryable: bool, max_attempts: int, backoff: Backoff,
         detail: str = "") -> JobState:
    """Record a failure; returns the new state (PENDING or DEAD). `error` must be
    PHI-free (it is shown everywhere); `detail` (admins only) may be anything."""
    dead = not retryable or job.attempts >= max_attempts
    values = {"last_error": error[:4000], "lease_until": 0.0}
    if dead:
        values.update(state=JobState.DEAD, finished_at=now())
    else:
        values.update(state=JobState.PENDING, run_after=now() + backoff.delay(job.attempts))
    with db.session() as s:
        if s.execute(update(Job).where(_owned(job)).values(**values)).rowcount == 1:
            s.add(JobError(job_id=job.id, attempt=job.attempts, summary=error[:4000], detail=(detail or error)[:20000]))
    return values["state"]


def renew(db: Database, job: Job, lease_seconds: float) -> bool:
    with db.session() as s:
        return s.execute(update(Job).where(_owned(job)).values(lease_until=now() + lease_seconds)).rowcount == 1


def requeue_dead(db: Database, job_ids: list[int] | None = None) -> int:
    """Operator action: give dead-letter jobs a fresh set of attempts."""
    with db.session() as s:
        stmt = update(Job).where(Job.state == JobState.DEAD)
        if job_ids:
            stmt = stmt.where(Job.id.in_(job_ids))
        return s.execute(
            stmt.values(state=JobState.PENDING, attempts=0, run_after=now(), lease_owner="", finished_at=None)
        ).rowcount
