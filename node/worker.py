"""Pipeline workers: claim a job, run its stage, settle it.

Every outcome is written back to the job row, so a crash at any point leaves
either a finished job or one whose lease will expire and be taken again."""
from __future__ import annotations

import logging
import os
import socket
import threading
import traceback
import uuid

from node.context import NodeContext
from node.db import Study
from node.jobs import Backoff, LeaseLost, PermanentError, RetryableError, claim, fail, succeed
from node.pipeline import deliver, encode, infer

log = logging.getLogger(__name__)

STAGE_RUNNERS = {"infer": infer.run, "encode": encode.run, "deliver": deliver.run}


def run_one(ctx: NodeContext, owner: str) -> bool:
    """Claim and run one job; False when there was nothing to do."""
    p = ctx.settings.pipeline
    job = claim(ctx.db, owner, p.lease_seconds)
    if job is None:
        return False
    backoff = Backoff(p.backoff_base_seconds, p.backoff_max_seconds)
    try:
        STAGE_RUNNERS[job.stage](ctx, job)
    except LeaseLost as exc:
        log.warning("%s; outcome left to the new owner", exc)
    except PermanentError as exc:
        _settle_failure(ctx, job, str(exc), retryable=False, backoff=backoff)
    except RetryableError as exc:
        _settle_failure(ctx, job, str(exc), retryable=True, backoff=backoff)
    except Exception as exc:  # unknown: retry, the backoff and max attempts bound it
        log.error("job %d (%s) crashed:\n%s", job.id, job.stage, traceback.format_exc())
        _settle_failure(ctx, job, f"{type(exc).__name__}: {exc}", retryable=True, backoff=backoff)
    else:
        if not succeed(ctx.db, job):
            log.warning("job %d finished after its lease was taken over; outcome left to the new owner", job.id)
    return True


def _settle_failure(ctx: NodeContext, job, error: str, *, retryable: bool, backoff: Backoff) -> None:
    state = fail(ctx.db, job, error, retryable=retryable, max_attempts=ctx.settings.pipeline.max_attempts, backoff=backoff)
    log.warning("job %d (%s%s) attempt %d failed -> %s: %s", job.id, job.stage,
                f" to {job.destination}" if job.destination else "", job.attempts, state, error)
    if state == "dead" and job.stage in ("infer", "encode"):
        with ctx.db.session() as s:
            study = s.get(Study, job.study_id)
            if study.version == job.study_version:
                study.state, study.reason = "failed", f"{job.stage}: {error}"[:2000]


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
