"""Retention: the scheduled purge that keeps storage from filling.

`retention.instances_days`: a study last received longer ago loses its
received files (every revision), their rows and its display renditions.
`retention.outputs_days`: encoded SR/SC files older than this go, with their
rows. `retention.jobs_days`: finished (done) job rows older than this go.
Each is off (keep forever) when null.

What is never purged:
- a study whose results are not delivered everywhere: one still receiving
  or processing, or with any job not done (pending, running, or dead: a
  dead letter is waiting for an operator);
- results, FHIR resources, node events, and any table this module does not
  own (the audit trail among them).

Crash-safe and idempotent: for each study, the rows go and the files to
delete are queued (`purge_files`) in one transaction that also re-checks,
under the study's row lock, that the study is still eligible (a late instance
may just have arrived). The files are deleted after the commit, then their
queue entries. A crash anywhere leaves either the rows (the next run purges
again) or queue entries (the next run, or start-up, deletes those files), never
a file without a row that the start-up sweep could take for an orphan.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import delete, exists, select
from sqlalchemy.orm import Session

from node.context import NodeContext
from node.db import Instance, InstanceRevision, Job, JobError, Output, PurgeFile, server_now, Study
from node.events import EventKind, record_event
from node.states import JobState, StudyState
from node.storage import study_dir

log = logging.getLogger(__name__)

DAY = 86400.0
BATCH = 200  # studies per query, job rows per delete


@dataclass
class PurgeReport:
    studies_instances: int = 0  # studies whose received files were purged
    instances: int = 0
    outputs: int = 0
    jobs: int = 0
    files: int = 0
    protected: set[int] = field(default_factory=set)  # old enough, kept: results not delivered everywhere
    details: list[str] = field(default_factory=list)

    @property
    def anything(self) -> bool:
        return bool(self.instances or self.outputs or self.jobs or self.files)


def undelivered(session: Session, study: Study):
    """A study whose results are not delivered everywhere (never purged)."""
    if study.state in (StudyState.RECEIVED, StudyState.PROCESSING):
        return True
    return session.scalar(select(exists().where(Job.study_id == study.id, Job.state != JobState.DONE)))


def purge(ctx: NodeContext) -> PurgeReport:
    r = ctx.settings.retention
    report = PurgeReport()
    report.files += finish_queued(ctx)
    with ctx.db.session() as s:
        t = server_now(s)
    if r.instances_days is not None:
        _purge_studies(ctx, report, t - r.instances_days * DAY, kind="instances")
    if r.outputs_days is not None:
        _purge_studies(ctx, report, t - r.outputs_days * DAY, kind="outputs")
    if r.jobs_days is not None:
        _purge_jobs(ctx, report, t - r.jobs_days * DAY)
    if report.anything:
        summary = (f"{report.instances} instance(s) of {report.studies_instances} study(ies), {report.outputs} "
                   f"output(s), {report.jobs} job row(s), {report.files} file(s); {len(report.protected)} old "
                   "study(ies) kept with undelivered results")
        with ctx.db.session() as s:
            record_event(s, EventKind.RETENTION_PURGE, detail=summary)
        log.info("retention purge: %s", summary)
    for kind in ("instances", "outputs", "jobs", "files"):
        ctx.metrics.purged.labels(kind).inc(getattr(report, kind))
    return report


def _purge_studies(ctx: NodeContext, report: PurgeReport, cutoff: float, *, kind: str) -> None:
    after_id = 0
    while True:
        with ctx.db.session() as s:
            ids = list(s.scalars(_candidates(kind, cutoff).where(Study.id > after_id).order_by(Study.id).limit(BATCH)))
        if not ids:
            return
        after_id = ids[-1]
        for study_id in ids:
            queued = _unlink_rows(ctx, study_id, cutoff, kind, report)
            if queued:
                report.files += _delete_queued(ctx, queued)


def _candidates(kind: str, cutoff: float):
    if kind == "instances":
        return select(Study.id).where(Study.last_received_at < cutoff,
                                      exists().where(Instance.study_id == Study.id))
    return select(Study.id).where(exists().where(Output.study_id == Study.id, Output.created_at < cutoff))


def _unlink_rows(ctx: NodeContext, study_id: int, cutoff: float, kind: str, report: PurgeReport) -> list[int]:
    """In one transaction: re-check the study under its lock, delete its rows,
    queue their files. Returns the queue entries to delete after the commit."""
    with ctx.db.session() as s:
        study = s.scalar(select(Study).where(Study.id == study_id).with_for_update())
        if study is None:
            return []
        if undelivered(s, study):
            report.protected.add(study.id)
            return []
        paths: list[str] = []
        if kind == "instances":
            if study.last_received_at >= cutoff:
                return []  # something arrived meanwhile
            instance_ids = list(s.scalars(select(Instance.id).where(Instance.study_id == study.id)))
            paths += s.scalars(select(Instance.path).where(Instance.study_id == study.id))
            paths += s.scalars(select(InstanceRevision.path).where(InstanceRevision.instance_id.in_(instance_ids)))
            paths.append(str(study_dir(ctx.work_dir, study.calling_ae, study.study_uid)))  # display renditions
            s.execute(delete(InstanceRevision).where(InstanceRevision.instance_id.in_(instance_ids)))
            s.execute(delete(Instance).where(Instance.id.in_(instance_ids)))
            report.instances += len(instance_ids)
            report.studies_instances += 1
        else:
            rows = s.execute(select(Output.id, Output.path).where(Output.study_id == study.id,
                                                                  Output.created_at < cutoff)).all()
            paths += [path for _, path in rows]
            s.execute(delete(Output).where(Output.id.in_([i for i, _ in rows])))
            report.outputs += len(rows)
        entries = [PurgeFile(path=p) for p in sorted(set(paths))]
        s.add_all(entries)
        s.flush()
        return [e.id for e in entries]


def _purge_jobs(ctx: NodeContext, report: PurgeReport, cutoff: float) -> None:
    while True:
        with ctx.db.session() as s:
            ids = list(s.scalars(select(Job.id).where(Job.state == JobState.DONE, Job.finished_at < cutoff)
                                 .order_by(Job.id).limit(BATCH)))
            if not ids:
                return
            # A job's error texts (admin-only, may quote a peer) go with it.
            s.execute(delete(JobError).where(JobError.job_id.in_(ids)))
            s.execute(delete(Job).where(Job.id.in_(ids), Job.state == JobState.DONE))
            report.jobs += len(ids)


def finish_queued(ctx: NodeContext) -> int:
    """Delete files a crashed purge queued but did not delete (start-up and each run)."""
    with ctx.db.session() as s:
        ids = list(s.scalars(select(PurgeFile.id)))
    return _delete_queued(ctx, ids) if ids else 0


def _delete_queued(ctx: NodeContext, ids: list[int]) -> int:
    with ctx.db.session() as s:
        paths = list(s.scalars(select(PurgeFile.path).where(PurgeFile.id.in_(ids))))
    deleted = 0
    for path in map(Path, paths):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            deleted += 1
        elif path.exists():
            path.unlink(missing_ok=True)
            deleted += 1
        # Directories stay: removing one could race a receiver creating a file in it.
    with ctx.db.session() as s:
        s.execute(delete(PurgeFile).where(PurgeFile.id.in_(ids)))
    return deleted

