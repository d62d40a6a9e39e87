"""Operations endpoints: probes, metrics and the administrator's JSON.

- `GET /readyz` (no token): 200 `ready` when the database answers, storage is
  writable and above its floor, a model is loaded and the SCP listens (for
  the roles that have them: node/service.py ROLE_PARTS) and no
  dead-letter job is older than `health.dead_letter_max_age_seconds`; else
  503 with `unready` (a part is down), `degraded` (dead letters) or
  `draining` (graceful shutdown under way), and which check failed. In the
  receiver, worker and api roles `degraded` answers 200: dead letters are the
  site's state, not the replica's.
  `warnings` lists what the node's parts reported (e.g. configuration that
  works but deserves a look); they do not change the status.
- `GET /metrics` (no token): Prometheus text format (node/metrics.py). It
  carries no PHI: counts, states, stages, destination names.
- `/api/v1/admin/...` (admin token): dead letters, node events (changed
  content, mixed-patient studies, orphans, purges, restores), failed studies
  with their reasons, and re-queueing dead letters after an outage.
"""
from __future__ import annotations

import os

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import select

from node import ops_queries
from node.api.auth import actor
from node.api.policy import Permission, public, require
from node.audit import events as audit_events
from node.audit import messages
from node.context import NodeContext
from node.db import Job, Study
from node.events import recent_events
from node.jobs import requeue_dead
from node.states import JobState, StudyState
from node.storage import free_mb

probes = APIRouter(include_in_schema=False)


def _iso(t: float | None) -> str | None:
    import datetime as dt

    return None if t is None else dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat()


def readiness(node: NodeContext) -> tuple[str, dict]:
    checks = {"database": node.db.ping()}
    try:
        writable = os.access(node.data_dir, os.W_OK)
        floor = node.settings.storage.min_free_mb
        checks["storage"] = writable and (not floor or free_mb(node.data_dir) >= floor)
    except OSError:
        checks["storage"] = False
    # A role without a part does not wait for it (node/service.py ROLE_PARTS): a worker has no SCP.
    if "model" in node.ready:
        checks["model"] = bool(node.ready.get("model")) and node.engine is not None
    if "scp" in node.ready:
        checks["scp"] = node.scp is not None and node.scp.listening
    body: dict = {"checks": checks, "warnings": list(getattr(node, "warnings", []) or [])}
    dead_ok = True
    if checks["database"]:
        try:
            snap = ops_queries.snapshot(node.db)
        except Exception:
            checks["database"] = False
        else:
            limit = node.settings.health.dead_letter_max_age_seconds
            dead_ok = not (snap.dead_total and snap.oldest_dead_age > limit)
            by_destination: dict[str, int] = {}  # a destination's deliver and deliver-sc jobs together
            for (_, dest), n in sorted(snap.dead_letters.items()):
                by_destination[dest or "(stage)"] = by_destination.get(dest or "(stage)", 0) + n
            body["dead_letters"] = {
                "count": snap.dead_total,
                "oldest_age_seconds": round(snap.oldest_dead_age, 1),
                "by_destination": by_destination,
            }
    checks["dead_letters"] = dead_ok
    if node.draining:
        status = "draining"
    elif not all(v for k, v in checks.items() if k != "dead_letters"):
        status = "unready"
    elif not dead_ok:
        status = "degraded"
    else:
        status = "ready"
    return status, body


@probes.get("/readyz", dependencies=[public("orchestrators probe readiness; counts and states only, no patient data")])
def readyz(request: Request):
    node: NodeContext = request.app.state.node
    status, body = readiness(node)
    # Dead letters are the whole site's state, not one replica's: in the scale-out roles they are
    # reported (status "degraded") without taking the replica out of its load balancer, which
    # for receivers would stop all intake because one destination is down.
    ok = status == "ready" or (status == "degraded" and node.role != "all")
    return JSONResponse({"status": status, **body}, status_code=200 if ok else 503)


@probes.get("/metrics", dependencies=[public("Prometheus scrapes it; counters by stage, destination and reason, "
                                            "no patient data")])
def metrics(request: Request):
    node: NodeContext = request.app.state.node
    return Response(generate_latest(node.metrics.registry), media_type=CONTENT_TYPE_LATEST)


admin = APIRouter(prefix="/api/v1/admin", dependencies=[require(Permission.ADMIN)])


@admin.get("/status")
def status(request: Request):
    node: NodeContext = request.app.state.node
    snap = ops_queries.snapshot(node.db)
    state, ready = readiness(node)
    return {
        "readiness": {"status": state, **ready},
        "studies_by_state": snap.studies_by_state,
        "queue": [{"stage": stage, "state": st, "count": n} for (stage, st), n in sorted(snap.jobs_by_stage_state.items())],
        "oldest_pending_age_seconds": snap.oldest_pending_age,
    }


@admin.get("/dead-letters")
def dead_letters(request: Request, destination: str | None = None, limit: int = Query(200, ge=1, le=5000)):
    db = request.app.state.node.db
    with db.session() as s:
        stmt = (select(Job, Study.study_uid, Study.calling_ae).join(Study, Study.id == Job.study_id)
                .where(Job.state == JobState.DEAD).order_by(Job.finished_at).limit(limit))
        if destination is not None:
            stmt = stmt.where(Job.destination == destination)
        rows = s.execute(stmt).all()
        return {"dead_letters": [
            {"job_id": job.id, "stage": job.stage, "destination": job.destination or None,
             "study_instance_uid": study_uid, "calling_ae": calling_ae, "study_version": job.study_version,
             "attempts": job.attempts, "failing_since": _iso(job.retry_since), "dead_since": _iso(job.finished_at),
             "last_error": job.last_error}
            for job, study_uid, calling_ae in rows
        ]}


@admin.post("/dead-letters/retry")
def retry_dead_letters(request: Request, destination: str | None = None):
    """What `carina jobs retry --all [--destination NAME]` does."""
    node = request.app.state.node
    count = requeue_dead(node.db, destination=destination)
    where = f" for destination {destination!r}" if destination is not None else ""
    audit_events.admin_action(node.audit, actor(request), messages.USE_OF_RESTRICTED_FUNCTION,
                              messages.ParticipantObject(f"jobs:all-dead{where}", messages.URI, 2, 20),
                              f"re-queued {count} dead-letter job(s){where}")
    return {"requeued": count}


@admin.get("/events")
def events(request: Request, kind: str | None = None, limit: int = Query(100, ge=1, le=1000)):
    with request.app.state.node.db.session() as s:
        return {"events": [
            {"id": e.id, "at": _iso(e.at), "kind": e.kind, "study_instance_uid": e.study_uid or None,
             "sop_instance_uid": e.sop_instance_uid or None, "detail": e.detail}
            for e in recent_events(s, kind=kind, limit=limit)
        ]}


@admin.get("/failed-studies")
def failed_studies(request: Request, limit: int = Query(100, ge=1, le=1000)):
    """Studies that were not scored or not encoded, with why (e.g. images of two patients)."""
    with request.app.state.node.db.session() as s:
        rows = s.scalars(select(Study).where(Study.state == StudyState.FAILED)
                         .order_by(Study.last_received_at.desc()).limit(limit))
        return {"studies": [
            {"study_instance_uid": st.study_uid, "calling_ae": st.calling_ae, "version": st.version,
             "reason": st.reason, "last_received_at": _iso(st.last_received_at)}
            for st in rows
        ]}
