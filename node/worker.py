"""Pipeline workers: claim a job, run its stage, settle it.

For every stage the worker does the same three steps (node/pipeline/__init__.py):
load the stage's typed work in one transaction, run it outside any
transaction, and settle its outcome in the transaction that marks the job
done. Whether the job is still for the study's current version is checked
here, in `_current`, and nowhere else. Every outcome is written back to the
job row, so a crash at any point leaves either a finished job or one whose
lease will expire and be taken again.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import traceback
import uuid

from sqlalchemy.orm import Session

from node.context import NodeContext
from node.db import Job, Study
from node.jobs import Backoff, LeaseLost, PermanentError, RetryableError, claim, fail, settle_in, succeed
from node.pipeline import conclude, deliver, encode, infer
from node.states import JobState, Stage, StudyState

log = logging.getLogger(__name__)

STAGES = {Stage.INFER: infer, Stage.ENCODE: encode, Stage.DELIVER: deliver}


def current_study(session: Session, job: Job) -> Study | None:
    """The job's study, or None when a newer version of it superseded the job."""
    study = session.get(Study, job.study_id)
    return study if study is not None and study.version == job.study_version else None


def run_stage(ctx: NodeContext, job: Job) -> None:
    stage = STAGES[Stage(job.stage)]
    with ctx.db.session() as s:
        study = current_study(s, job)
        work = None if study is None else stage.load(ctx, s, study, job)
    if study is None:
        log.info("%s job %d superseded by a newer study version", job.stage, job.id)
        return
    outcome = stage.run(ctx, work)
    with ctx.db.session() as s:
        settle_in(s, job)  # the outcome and "job done" commit together or not at all
        study = current_study(s, job)
        if study is not None:
            stage.settle(ctx, s, study, outcome)


def run_one(ctx: NodeContext, owner: str) -> bool:
    """Claim and run one job; False when there was nothing to do."""
    p = ctx.settings.pipeline
    job = claim(ctx.db, owner, p.lease_seconds)
    if job is None:
        return False
    backoff = Backoff(p.backoff_base_seconds, p.backoff_max_seconds)
    try:
        run_stage(ctx, job)
    except LeaseLost as exc:
        log.warning("%s; outcome left to the new owner", exc)
    except PermanentError as exc:
        _settle_failure(ctx, job, exc.code, exc.detail, retryable=False, backoff=backoff)
    except RetryableError as exc:
        _settle_failure(ctx, job, exc.code, exc.detail, retryable=True, backoff=backoff)
    except Exception as exc:  # unknown: retry, the backoff and max attempts bound it
        # The log gets the class and the frames, never the message: an exception's
        # text may quote patient data. The full text is kept for admins (job_errors).
        log.error("job %d (%s) crashed: %s\n%s", job.id, job.stage, type(exc).__name__,
                  "".join(traceback.format_tb(exc.__traceback__)))
        _settle_failure(ctx, job, f"{job.stage} crashed: {type(exc).__name__}", traceback.format_exc(),
                        retryable=True, backoff=backoff)
    else:
        if not succeed(ctx.db, job):
            log.warning("job %d finished after its lease was taken over; outcome left to the new owner", job.id)
    return True


def _settle_failure(ctx: NodeContext, job: Job, error: str, detail: str, *, retryable: bool, backoff: Backoff) -> None:
    state = fail(ctx.db, job, error, retryable=retryable, max_attempts=ctx.settings.pipeline.max_attempts,
                 backoff=backoff, detail=detail)
    log.warning("job %d (%s%s) attempt %d failed -> %s: %s", job.id, job.stage,
                f" to {job.destination}" if job.destination else "", job.attempts, state, error)
    if state == JobState.DEAD and job.stage in (Stage.INFER, Stage.ENCODE):
        with ctx.db.session() as s:
            study = current_study(s, job)
            if study is not None:
                conclude(study, StudyState.FAILED, f"{job.stage}: {error}")


class WorkerPool:
    def __init__(self, ctx: NodeContext, count: int):
        self.ctx = ctx
        self.count = count
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.owner_prefix = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"

    def start(self) -> None:
        for n in range(self.count):
            t = threading.Thread(target=self._loop, args=(f"{self.owner_prefix}:{n}",), name=f"worker-{n}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)

    def _loop(self, owner: str) -> None:
        while not self._stop.is_set():
            try:
                busy = run_one(self.ctx, owner)
            except Exception:  # e.g. the database is briefly unreachable
                log.exception("worker %s: claim failed", owner)
                busy = False
            if not busy:
                self._stop.wait(self.ctx.settings.pipeline.poll_seconds)
