"""Admin-only API: the audit trail ("who saw patient X, and when"), and jobs
with their full error text (which may quote a peer, hence admin only)."""
from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import Response
from sqlalchemy import func, select

from node.api.auth import actor
from node.api.policy import Permission, require
from node.api.studies import job_view
from node.audit import events, messages
from node.audit.trail import summary, to_csv
from node.db import Job, JobError, Study
from node.jobs import requeue_dead
from node.states import JobState

router = APIRouter(prefix="/api/v1", tags=["admin"])

ADMIN = require(Permission.ADMIN)
# A database integer: larger ids are a 422, not a driver overflow.
JOB_ID = Path(ge=1, le=2**63 - 1)


def parse_when(value: str | None, name: str) -> float | None:
    """A date (2026-11-30, UTC midnight) or an ISO date-time, as epoch seconds."""
    if not value:
        return None
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise HTTPException(400, f"{name}: expected a date (YYYY-MM-DD) or an ISO 8601 date-time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def _iso(t: float | None) -> str | None:
    return None if t is None else dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat()


# --- the audit trail ----------------------------------------------------------------------


@router.get("/audit", dependencies=[ADMIN])
def audit_records(request: Request, since: str | None = None, until: str | None = None,
                  patient: str | None = Query(None, max_length=64), limit: int = Query(200, ge=1, le=5000)):
    node = request.app.state.node
    records = node.audit.records(since=parse_when(since, "since"), until=parse_when(until, "until"),
                                 patient_id=patient or None, limit=limit, newest_first=True)
    rows = [summary(r) for r in records]
    pairs = {(p, "") for row in rows for p in row["patients"].split()}
    events.query(node.audit, actor(request), f"audit?{request.url.query}", sorted(pairs))
    return {"records": rows}


@router.get("/audit/export.csv", dependencies=[ADMIN])
def audit_export(request: Request, since: str = Query(..., description="YYYY-MM-DD or ISO date-time"),
                 until: str | None = None, patient: str | None = Query(None, max_length=64)) -> Response:
    node = request.app.state.node
    records = node.audit.records(since=parse_when(since, "since"), until=parse_when(until, "until"),
                                 patient_id=patient or None)
    body = to_csv(records)
    pairs = {(p, "") for r in records for p in messages.patient_ids_in(r.xml)}
    events.exported(node.audit, actor(request), "audit-export.csv", sorted(pairs), f"audit?{request.url.query}")
    return Response(body, media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="carina-audit.csv"'})


@router.get("/audit/verify", dependencies=[ADMIN])
def audit_verify(request: Request):
    result = request.app.state.node.audit.verify()
    return {"ok": result.ok, "records": result.records, "head_seq": result.head_seq,
            "first_break": None if result.ok else str(result.first_break)}


# --- jobs ------------------------------------------------------------------------------------


@router.get("/jobs", dependencies=[ADMIN])
def list_jobs(request: Request, state: str | None = None, stage: str | None = None,
              limit: int = Query(100, ge=1, le=1000)):
    db = request.app.state.node.db
    with db.session() as s:
        stmt = select(Job).order_by(Job.id.desc()).limit(limit)
        if state:
            stmt = stmt.where(Job.state == state)
        if stage:
            stmt = stmt.where(Job.stage == stage)
        jobs = s.scalars(stmt).all()
        backlog = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        return {"counts": backlog, "jobs": [job_view(j) | {"study_id": j.study_id} for j in jobs]}


@router.get("/jobs/{job_id}", dependencies=[ADMIN])
def job_detail(request: Request, job_id: int = JOB_ID):
    """A job with the full text of each failed attempt (it may quote a peer, and so name a patient)."""
    node = request.app.state.node
    with node.db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        study = s.get(Study, job.study_id)
        errors = s.scalars(select(JobError).where(JobError.job_id == job_id).order_by(JobError.id)).all()
        view = job_view(job) | {
            "study_id": job.study_id,
            "study_instance_uid": study.study_uid if study else None,
            "errors": [{"attempt": e.attempt, "at": _iso(e.at), "summary": e.summary, "detail": e.detail}
                       for e in errors],
        }
        pair = (study.patient_id, study.study_uid) if study else ("", "")
    events.record_read(node.audit, actor(request), request.url.path, [pair])
    return view


@router.post("/jobs/{job_id}/retry", dependencies=[ADMIN])
def retry_job(request: Request, job_id: int = JOB_ID):
    node = request.app.state.node
    with node.db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        state = job.state
    if state != JobState.DEAD:
        raise HTTPException(409, f"job {job_id} is {state}; only dead-letter jobs are retried")
    count = requeue_dead(node.db, [job_id])
    events.admin_action(node.audit, actor(request), messages.USE_OF_RESTRICTED_FUNCTION, events.job_object(job_id),
                        "dead-letter job re-queued")
    return {"requeued": count}
