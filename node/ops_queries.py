"""The operator's view of the database: what `/metrics`, `/readyz` and the admin
API report (studies by state, queues, dead letters), read in one short
transaction so that all three say the same thing."""
from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select

from node.db import Database, Instance, Job, Result, Study, server_now
from node.states import DELIVERY_STAGES, JobState, Stage


@dataclass(frozen=True)
class Snapshot:
    at: float
    studies_by_state: dict[str, int]
    jobs_by_stage_state: dict[tuple[str, str], int]
    oldest_pending_age: dict[str, float]  # every stage, 0 when none pending
    dead_letters: dict[tuple[str, str], int]  # (stage, destination or "") -> count
    oldest_dead_age: float  # 0 when none
    dead_since: dict[str, float] = field(default_factory=dict)  # destination -> when its oldest dead job died

    @property
    def dead_total(self) -> int:
        return sum(self.dead_letters.values())


def snapshot(db: Database, settings=None) -> Snapshot:
    with db.session() as s:
        t = server_now(s)
        studies = {state: n for state, n in s.execute(select(Study.state, func.count()).group_by(Study.state))}
        jobs = {(stage, state): n for stage, state, n in
                s.execute(select(Job.stage, Job.state, func.count()).group_by(Job.stage, Job.state))}
        pending = dict(s.execute(
            select(Job.stage, func.min(Job.created_at)).where(Job.state == JobState.PENDING).group_by(Job.stage)).all())
        dead_rows = s.execute(
            select(Job.stage, Job.destination, func.count(), func.min(Job.finished_at))
            .where(Job.state == JobState.DEAD).group_by(Job.stage, Job.destination)).all()
    oldest_pending = {str(stage): max(0.0, t - pending[stage]) if pending.get(stage) is not None else 0.0
                      for stage in Stage}
    dead = {(stage, destination or ""): n for stage, destination, n, _ in dead_rows}
    died = [since for *_, since in dead_rows if since is not None]
    dead_since: dict[str, float] = {}
    for _, destination, _, since in dead_rows:
        if since is not None:
            key = destination or ""
            dead_since[key] = min(since, dead_since.get(key, since))
    return Snapshot(
        at=t,
        studies_by_state=studies,
        jobs_by_stage_state=jobs,
        oldest_pending_age=oldest_pending,
        dead_letters=dead,
        oldest_dead_age=max(0.0, t - min(died)) if died else 0.0,
        dead_since=dead_since,
    )


@dataclass(frozen=True)
class Throughput:
    window_seconds: float
    instances_received: int
    studies_scored: int  # study versions with a result
    deliveries_done: int
    deliveries_dead: int


def throughput(db: Database, window_seconds: float) -> Throughput:
    """What the node did in the last `window_seconds` (for the admin's system page)."""
    with db.session() as s:
        since = server_now(s) - window_seconds
        received = s.scalar(select(func.count()).select_from(Instance).where(Instance.received_at >= since))
        scored = s.scalar(select(func.count()).select_from(Result).where(Result.created_at >= since))
        delivered = dict(s.execute(
            select(Job.state, func.count()).where(Job.stage.in_(DELIVERY_STAGES), Job.finished_at >= since,
                                                  Job.state.in_([JobState.DONE, JobState.DEAD]))
            .group_by(Job.state)).all())
    return Throughput(window_seconds, received or 0, scored or 0, delivered.get(JobState.DONE, 0),
                      delivered.get(JobState.DEAD, 0))
