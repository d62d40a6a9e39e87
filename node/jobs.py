"""The persisted job queue: enqueue idempotently, claim under a lease, retry
with backoff, dead-letter after the last attempt.

Claiming is `SELECT ... FOR UPDATE SKIP LOCKED` followed by a compare-and-set
UPDATE. PostgreSQL uses both; SQLite ignores the locking clause and relies on
the CAS plus its single writer (BEGIN IMMEDIATE in node/db.py), so the same
code is correct on both.

Every time that schedules a job (lease expiry, next attempt, give-up) is
`server_now`: the database server's clock on PostgreSQL, so nodes on hosts
with skewed clocks agree; the local clock on SQLite.
"""
from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, case, exists, not_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from node.db import Database, Job, JobError, server_now
from node.states import DELIVERY_STAGES, JobState, Stage

_DeliveryRow = Any  # a Job, or a row selecting its stage, destination, study_version and state

STAGES = tuple(Stage)
# Claim order: a study's later stage before another study's earlier one, so a
# burst of studies flows through one by one (the first SR reaches the PACS
# after one study's work, not after every study's inference). Within a stage,
# oldest first. Work cannot starve: later stages exist only for studies
# already started.
_STAGE_FIRST = case({Stage.DELIVER: 0, Stage.DELIVER_SC: 0, Stage.ENCODE: 1, Stage.CAPTURE: 1}, value=Job.stage, else_=2)

# A deliver-sc job is queued with the report's deliveries (so every view shows
# a destination's delivery as unfinished until the SCs reached it too) but
# waits for its version's capture: runnable once that job is done.
_capture = aliased(Job)
_WAITS_FOR_CAPTURE = and_(Job.stage == Stage.DELIVER_SC, exists().where(
    _capture.study_id == Job.study_id, _capture.study_version == Job.study_version,
    _capture.stage == Stage.CAPTURE, _capture.state != JobState.DONE))


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

    def __reduce__(self):  # raised in a stage process (node/pipeline/processes.py): keep the detail
        return type(self), (self.code, self.detail)


class RetryableError(StageError):
    """Try again later (peer down, transient I/O)."""


class PermanentError(StageError):
    """Retrying cannot help (undecodable input, refused by peer): dead-letter now."""


@dataclass(frozen=True)
class Backoff:
    base: float
    cap: float
    # Deliveries give up by time, not attempts: a PACS that is down for a
    # weekend must not dead-letter every study. None: `max_attempts` decides.
    give_up_after: float | None = None

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
    t = server_now(session)
    try:
        with session.begin_nested():
            session.add(Job(study_id=study_id, stage=stage, destination=destination, study_version=version,
                            run_after=t, created_at=t))
    except IntegrityError:
        pass  # a concurrent enqueue won; same job


def claim(db: Database, owner: str, lease_seconds: float, stages: tuple[Stage, ...] = STAGES) -> Job | None:
    """Take the next runnable job (pending, or running with an expired lease;
    a deliver-sc only after its capture): the latest stage first, then the oldest."""
    with db.session() as s:
        t = server_now(s)
        runnable = and_(or_(
            and_(Job.state == JobState.PENDING, Job.run_after <= t),
            and_(Job.state == JobState.RUNNING, Job.lease_until < t),  # its worker died
        ), not_(_WAITS_FOR_CAPTURE))
        candidate = s.scalars(
            select(Job)
            .where(runnable, Job.stage.in_(stages))
            .order_by(_STAGE_FIRST, Job.run_after, Job.id)
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
        update(Job).where(_owned(job)).values(state=JobState.DONE, finished_at=server_now(session), lease_until=0.0,
                                              last_error="", retry_since=None)
        .execution_options(synchronize_session=False)
    ).rowcount
    if settled != 1:
        raise LeaseLost(f"job {job.id} ({job.stage}) was taken over; its results are discarded")


def succeed(db: Database, job: Job) -> bool:
    """Mark the job done; also True when the stage already did (`settle_in`)."""
    with db.session() as s:
        if s.execute(
            update(Job).where(_owned(job)).values(state=JobState.DONE, finished_at=server_now(s), lease_until=0.0,
                                                  last_error="", retry_since=None)
        ).rowcount == 1:
            return True
        row = s.get(Job, job.id)
        return row is not None and row.state == JobState.DONE and row.lease_owner == job.lease_owner


def fail(db: Database, job: Job, error: str, *, retryable: bool, max_attempts: int, backoff: Backoff,
         detail: str = "") -> JobState:
    """Record a failure; returns the new state (PENDING or DEAD). `error` must be
    PHI-free (it is shown everywhere); `detail` (admins only) may be anything.

    With `backoff.give_up_after` the job dies once it has been failing for
    that long (since `retry_since`), whatever the attempt count; otherwise
    after `max_attempts`."""
    with db.session() as s:
        t = server_now(s)
        since = s.scalar(select(Job.retry_since).where(Job.id == job.id))
        since = t if since is None else since
        if backoff.give_up_after is not None:
            exhausted = t - since >= backoff.give_up_after
        else:
            exhausted = job.attempts >= max_attempts
        dead = not retryable or exhausted
        values = {"last_error": error[:4000], "lease_until": 0.0, "retry_since": since}
        if dead:
            values.update(state=JobState.DEAD, finished_at=t)
        else:
            values.update(state=JobState.PENDING, run_after=t + backoff.delay(job.attempts))
        if s.execute(update(Job).where(_owned(job)).values(**values)).rowcount != 1:
            return JobState.RUNNING  # the lease was lost: the new owner decides
        s.add(JobError(job_id=job.id, attempt=job.attempts, summary=error[:4000], detail=(detail or error)[:20000]))
    return values["state"]


def fail_waiting_deliveries(session: Session, job: Job, error: str) -> None:
    """A capture job went dead-letter: the SC deliveries waiting for it go with
    it (`carina jobs retry` re-queues them together)."""
    session.execute(
        update(Job).where(Job.study_id == job.study_id, Job.study_version == job.study_version,
                          Job.stage == Stage.DELIVER_SC, Job.state == JobState.PENDING)
        .values(state=JobState.DEAD, finished_at=server_now(session), last_error=f"capture failed: {error}"[:4000])
        .execution_options(synchronize_session=False))


def release(db: Database, job: Job) -> bool:
    """Give a running job back at once (graceful shutdown, lost heartbeat):
    pending, runnable now, and the attempt it was charged is returned, so
    another worker takes it without waiting for the lease to expire."""
    with db.session() as s:
        return s.execute(
            update(Job).where(_owned(job)).values(
                state=JobState.PENDING, run_after=server_now(s), lease_owner="", lease_until=0.0,
                attempts=Job.attempts - 1,
            ).execution_options(synchronize_session=False)
        ).rowcount == 1


def renew(db: Database, job: Job, lease_seconds: float) -> bool:
    """Extend our lease; False when it is no longer ours (taken over or released)."""
    with db.session() as s:
        return s.execute(
            update(Job).where(_owned(job)).values(lease_until=server_now(s) + lease_seconds)
            .execution_options(synchronize_session=False)
        ).rowcount == 1


def requeue_dead(db: Database, job_ids: list[int] | None = None, *, destination: str | None = None) -> int:
    """Operator action: give dead-letter jobs a fresh set of attempts (and,
    for deliveries, a fresh give-up window): all of them, the given ids, or
    those of one destination (after a long outage). A re-queued SC delivery
    takes its dead capture along (it has no destination): alone, it would
    wait for that capture for ever."""
    with db.session() as s:
        chosen = [Job.state == JobState.DEAD]
        if job_ids:
            chosen.append(Job.id.in_(job_ids))
        if destination is not None:
            chosen.append(Job.destination == destination)
        waiting = set(s.execute(select(Job.study_id, Job.study_version).where(*chosen, Job.stage == Stage.DELIVER_SC)))
        fresh = dict(state=JobState.PENDING, attempts=0, run_after=server_now(s), lease_owner="", finished_at=None,
                     retry_since=None)
        count = s.execute(update(Job).where(*chosen).values(**fresh)
                          .execution_options(synchronize_session=False)).rowcount
        for study_id, version in waiting:
            count += s.execute(
                update(Job).where(Job.state == JobState.DEAD, Job.stage == Stage.CAPTURE, Job.study_id == study_id,
                                  Job.study_version == version).values(**fresh)
                .execution_options(synchronize_session=False)).rowcount
        return count


# A destination's delivery is as far as its least advanced job.
_LEAST_ADVANCED_FIRST = {JobState.DEAD: 0, JobState.RUNNING: 1, JobState.PENDING: 2, JobState.DONE: 3}


def delivery_per_destination(jobs: Iterable[_DeliveryRow]) -> dict[str, _DeliveryRow]:
    """Each destination's delivery of a study, for every view that shows deliveries.

    `jobs` are one study's jobs (Job rows or selected rows with `stage`,
    `destination`, `study_version` and `state`). Per destination, of the newest
    version it has jobs for, the least advanced of its `deliver` and
    `deliver-sc` jobs stands for both: a dead one first, then running,
    pending, done; so "done" means every object of that version reached it."""
    newest: dict[str, list] = {}
    for job in jobs:
        if job.stage not in DELIVERY_STAGES:
            continue
        held = newest.get(job.destination)
        if held is None or job.study_version > held[0].study_version:
            newest[job.destination] = [job]
        elif job.study_version == held[0].study_version:
            held.append(job)
    return {destination: min(held, key=lambda j: _LEAST_ADVANCED_FIRST[JobState(j.state)])
            for destination, held in sorted(newest.items())}
