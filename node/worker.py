"""Pipeline workers: claim a job, run its stage, settle it.

For every stage the worker does the same three steps (node/pipeline/__init__.py):
load the stage's typed work in one transaction, run it outside any
transaction, and settle its outcome in the transaction that marks the job
done. Whether the job is still for the study's current version is checked
here, in `current_study`, and nowhere else. Every outcome is written back to
the job row, so a crash at any point leaves either a finished job or one whose
lease will expire and be taken again.

While a stage runs, a heartbeat (node/lease.py) renews its lease every
lease/3; a stage whose lease is lost stops before acting and cannot settle.
An idle worker waits for `wake()` (called in-process when work is queued:
a study completed, a job finished). One idle worker at a time, the pool's
poller, also looks every `pipeline.poll_seconds` (work queued by another
process, a retry whose time has come); a worker that claims a job wakes the
next idle one, which claims the next job or becomes the poller. With every
idle worker polling, six idle workers ran twelve claim transactions a second,
each taking SQLite's write lock and the GIL from the receiver (bench/ingest.py).
On shutdown the pool stops claiming, lets running stages finish within the
grace period, and releases the leases of those still running, so another
worker takes them at once instead of after the lease.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
import uuid

from sqlalchemy.orm import Session

from node.context import NodeContext
from node.db import Job, Study
from node.jobs import STAGES as ALL_STAGES
from node.jobs import Backoff, LeaseLost, PermanentError, RetryableError, claim, fail, fail_waiting_deliveries, release, settle_in, succeed
from node.lease import Heartbeat, stop_renewing
from node.logs import bind_context, log_context
from node.pipeline import capture, conclude, deliver, encode, infer
from node.pipeline.processes import OFFLOADED
from node.states import DELIVERY_STAGES, JobState, Stage, StudyState

log = logging.getLogger(__name__)

STAGES = {Stage.INFER: infer, Stage.ENCODE: encode, Stage.CAPTURE: capture,
          Stage.DELIVER: deliver, Stage.DELIVER_SC: deliver}


def current_study(session: Session, job: Job) -> Study | None:
    """The job's study, or None when a newer version of it superseded the job."""
    study = session.get(Study, job.study_id)
    return study if study is not None and study.version == job.study_version else None


def run_stage(ctx: NodeContext, job: Job) -> None:
    stage = STAGES[Stage(job.stage)]
    with ctx.db.session() as s:
        study = current_study(s, job)
        if study is not None:
            bind_context(study_uid=study.study_uid)
        work = None if study is None else stage.load(ctx, s, study, job)
    if study is None:
        log.info("%s job %d superseded by a newer study version", job.stage, job.id)
        return
    outcome = _run(ctx, Stage(job.stage), stage, work)
    stop_renewing()  # settle_in checks the lease itself; a renewal racing its commit would cry wolf
    with ctx.db.session() as s:
        settle_in(s, job)  # the outcome and "job done" commit together or not at all
        study = current_study(s, job)
        if study is not None:
            stage.settle(ctx, s, study, outcome)


def _run(ctx: NodeContext, name: Stage, stage, work):
    """The stage's `run`, in a stage process when there are some (node/pipeline/processes.py).
    Such a process reads the renditions from disk, so they are settled there first."""
    if ctx.stage_processes is None or name not in OFFLOADED:
        return stage.run(ctx, work)
    ctx.renditions.settle(list(work.files.displays.values()))
    return ctx.stage_processes.run(name, work)


def backoff_for(ctx: NodeContext, job: Job) -> Backoff:
    """Deliveries retry on the (per-destination) delivery policy, by time;
    infer, encode and capture on the pipeline's, by attempts."""
    if job.stage in DELIVERY_STAGES:
        policy = ctx.settings.retry_policy(job.destination)
        return Backoff(policy.base_seconds, policy.max_seconds, give_up_after=policy.give_up_after_seconds)
    p = ctx.settings.pipeline
    return Backoff(p.backoff_base_seconds, p.backoff_max_seconds)


def run_one(ctx: NodeContext, owner: str, running: dict | None = None,
            stages: tuple[Stage, ...] = ALL_STAGES) -> bool:
    """Claim and run one job of `stages`; False when there was nothing to do.
    `running` (owner -> job) lets the pool see what each worker holds at shutdown."""
    p = ctx.settings.pipeline
    job = claim(ctx.db, owner, p.lease_seconds, stages)
    if job is None:
        return False
    if running is not None:
        running[owner] = job
    try:
        with log_context(job_id=job.id, stage=job.stage, destination=job.destination):
            _run_claimed(ctx, job)
    finally:
        if running is not None:
            running.pop(owner, None)
    return True


def _run_claimed(ctx: NodeContext, job: Job) -> None:
    backoff = backoff_for(ctx, job)
    started = time.perf_counter()
    outcome = "done"
    try:
        with Heartbeat(ctx.db, job, ctx.settings.pipeline.lease_seconds):
            run_stage(ctx, job)
    except LeaseLost as exc:
        outcome = "lease_lost"
        log.warning("%s; outcome left to the new owner", exc)
    except PermanentError as exc:
        outcome = _settle_failure(ctx, job, exc.code, exc.detail, retryable=False, backoff=backoff)
    except RetryableError as exc:
        outcome = _settle_failure(ctx, job, exc.code, exc.detail, retryable=True, backoff=backoff)
    except Exception as exc:  # unknown: retry, the backoff and max attempts bound it
        # The log gets the class and the frames, never the message: an exception's
        # text may quote patient data. The full text is kept for admins (job_errors).
        log.error("job %d (%s) crashed: %s\n%s", job.id, job.stage, type(exc).__name__,
                  "".join(traceback.format_tb(exc.__traceback__)))
        outcome = _settle_failure(ctx, job, f"{job.stage} crashed: {type(exc).__name__}", traceback.format_exc(),
                                  retryable=True, backoff=backoff)
    else:
        if not succeed(ctx.db, job):
            outcome = "lease_lost"
            log.warning("job %d finished after its lease was taken over; outcome left to the new owner", job.id)
    ctx.metrics.stage_seconds.labels(job.stage, outcome).observe(time.perf_counter() - started)
    if job.stage in DELIVERY_STAGES and outcome != "lease_lost":
        ctx.metrics.deliveries.labels(job.destination, job.stage, "delivered" if outcome == "done" else outcome).inc()


def _settle_failure(ctx: NodeContext, job: Job, error: str, detail: str, *, retryable: bool, backoff: Backoff) -> str:
    state = fail(ctx.db, job, error, retryable=retryable, max_attempts=ctx.settings.pipeline.max_attempts,
                 backoff=backoff, detail=detail)
    if state == JobState.RUNNING:
        log.warning("job %d (%s) failed after its lease was lost; outcome left to the new owner: %s",
                    job.id, job.stage, error)
        return "lease_lost"
    log.warning("job %d (%s%s) attempt %d failed -> %s: %s", job.id, job.stage,
                f" to {job.destination}" if job.destination else "", job.attempts, state, error)
    if state == JobState.DEAD and job.stage in (Stage.INFER, Stage.ENCODE, Stage.CAPTURE):
        with ctx.db.session() as s:
            if job.stage == Stage.CAPTURE:
                fail_waiting_deliveries(s, job, error)
            study = current_study(s, job)
            if study is not None:
                conclude(study, StudyState.FAILED, f"{job.stage}: {error}")
    return "dead" if state == JobState.DEAD else "retry"


class WorkerPool:
    def __init__(self, ctx: NodeContext, count: int):
        self.ctx = ctx
        self.count = count
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.owner_prefix = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.running: dict[str, Job] = {}  # worker owner -> the job it runs now
        # wake(): bumps the generation and notifies; a worker about to idle
        # waits only if nothing was queued since it last looked.
        self._queued = threading.Condition()
        self._generation = 0
        self._poller: str | None = None  # the idle worker that polls; the others wait for wake()

    def start(self) -> None:
        for n in range(self.count):
            t = threading.Thread(target=self._loop, args=(f"{self.owner_prefix}:{n}",), name=f"worker-{n}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, grace: float = 10.0) -> int:
        """Stop claiming; give running stages until `grace` to finish, then
        release the leases of those still running (pending again, runnable
        now, the attempt not charged). Returns how many were released."""
        self._stop.set()
        with self._queued:
            self._queued.notify_all()
        deadline = time.monotonic() + grace
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return self.release_running()

    def release_running(self) -> int:
        released = 0
        for owner, job in list(self.running.items()):
            try:
                if release(self.ctx.db, job):
                    released += 1
                    log.info("job %d (%s) released at shutdown; another worker takes it at once", job.id, job.stage)
            except Exception:
                log.exception("could not release job %d; its lease will expire", job.id)
        return released

    def wake(self) -> None:
        """Work was queued in this process: an idle worker claims it now rather
        than at the next poll. One is woken; if it claims a job it wakes the
        next (`_loop`), so a batch of work reaches as many workers as it needs
        and no more claims run than there are jobs, plus one that finds none."""
        with self._queued:
            self._generation += 1
            self._queued.notify()

    def _loop(self, owner: str) -> None:
        while not self._stop.is_set():
            with self._queued:
                seen = self._generation
            try:
                busy = run_one(self.ctx, owner, self.running)
            except Exception:  # e.g. the database is briefly unreachable
                log.exception("worker %s: claim failed", owner)
                busy = False
            if busy:
                self.wake()  # more may be waiting, or its stage queued the next (deliveries to several destinations)
                continue
            with self._queued:
                if self._generation == seen and not self._stop.is_set():
                    self._idle(owner)

    def _idle(self, owner: str) -> None:
        """Wait for wake(); the poller (the first idle worker while there is
        none) waits at most poll_seconds. Called with `_queued` held."""
        polls = self._poller is None
        if polls:
            self._poller = owner
        try:
            self._queued.wait(self.ctx.settings.pipeline.poll_seconds if polls else None)
        finally:
            if polls:
                self._poller = None
