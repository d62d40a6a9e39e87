"""`/api/v1`: the operator's view of studies and the pipeline."""
from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response
from sqlalchemy import func, select

from node import results
from node.api.auth import actor
from node.api.policy import Permission, require
from node.audit import events
from node.db import Instance, Job, Output, Study
from node.jobs import delivery_per_destination
from node.scored_study import ScoredStudy
from node.states import JobState
from node.storage import report_pdf_path

router = APIRouter(prefix="/api/v1", tags=["studies"])


def _iso(t: float | None) -> str | None:
    import datetime as dt

    return None if t is None else dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat()


def job_view(job: Job) -> dict:
    """A job as the API shows it; `last_error` is a class and a code, never a peer's text."""
    return {
        "id": job.id,
        "stage": job.stage,
        "destination": job.destination or None,
        "study_version": job.study_version,
        "state": job.state,
        "attempts": job.attempts,
        "next_attempt_at": _iso(job.run_after) if job.state == JobState.PENDING else None,
        "last_error": job.last_error or None,
    }


def _findings_view(scored: ScoredStudy | None) -> list[dict]:
    if scored is None:
        return []
    return [
        {
            "sop_instance_uid": image.sop_instance_uid,
            "findings": [
                {
                    "label": f.label,
                    "probability": round(f.probability, 4),
                    "threshold": round(f.threshold, 4),
                    "positive": f.positive,
                    "severity": f.severity,
                    "regions": [list(r.bbox) for r in f.regions],
                }
                for f in image.findings
            ],
        }
        for image in scored.images
    ]


def study_view(s, study: Study) -> dict:
    scored = results.load_latest(s, study.id)
    jobs = s.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id)).all()
    instances = s.scalars(select(Instance).where(Instance.study_id == study.id).order_by(Instance.id)).all()
    outputs = s.scalars(select(Output).where(Output.study_id == study.id).order_by(Output.kind.desc(), Output.id)).all()
    latest = delivery_per_destination(jobs)
    return {
        "study_instance_uid": study.study_uid,
        "calling_ae": study.calling_ae,
        "state": study.state,
        "reason": study.reason or None,
        "version": study.version,
        "patient_id": study.patient_id,
        "accession_number": study.accession_number,
        "first_received_at": _iso(study.first_received_at),
        "last_received_at": _iso(study.last_received_at),
        "completed_at": _iso(study.completed_at),
        "released_at": _iso(study.released_at),
        "model": None if scored is None else {
            "name": scored.model.name,
            "version": scored.model.version,
            "demo": scored.model.demo,
            "caveat": scored.model.caveat,
        },
        "priority": None if scored is None else scored.triage.priority,
        "images": _findings_view(scored),
        "instances": [
            {"sop_instance_uid": i.sop_instance_uid, "sop_class_uid": i.sop_class_uid, "state": i.state, "reason": i.reason or None}
            for i in instances
        ],
        "outputs": [
            {"kind": o.kind, "sop_instance_uid": o.sop_instance_uid, "series_instance_uid": o.series_uid, "version": o.version}
            for o in outputs
        ],
        "deliveries": [
            {"destination": name, "state": j.state, "attempts": j.attempts, "study_version": j.study_version,
             "next_attempt_at": _iso(j.run_after) if j.state == JobState.PENDING else None, "last_error": j.last_error or None}
            for name, j in latest.items()
        ],
        "jobs": [job_view(j) for j in jobs],
    }


@router.get("/studies", dependencies=[require(Permission.READ_STUDIES)])
def list_studies(request: Request, state: str | None = None, limit: int = Query(50, ge=1, le=500)):
    node = request.app.state.node
    with node.db.session() as s:
        stmt = select(Study).order_by(Study.last_received_at.desc()).limit(limit)
        if state:
            stmt = stmt.where(Study.state == state)
        studies = s.scalars(stmt).all()
        counts = dict(s.execute(select(Study.state, func.count()).group_by(Study.state)).all())
        shown = [(st.patient_id, st.study_uid) for st in studies]
        view = {
            "counts": counts,
            "studies": [
                {
                    "study_instance_uid": st.study_uid,
                    "calling_ae": st.calling_ae,
                    "state": st.state,
                    "reason": st.reason or None,
                    "version": st.version,
                    "last_received_at": _iso(st.last_received_at),
                    "positives": _positives(s, st),
                }
                for st in studies
            ],
        }
    # After the read transaction: the audit append is a write of its own.
    events.query(node.audit, actor(request), f"studies?{request.url.query}", shown)
    return view


def _positives(s, study: Study) -> list[str]:
    scored = results.load_latest(s, study.id)
    return [] if scored is None else sorted(f.label for f in scored.positives)


@router.get("/studies/{study_uid}", dependencies=[require(Permission.READ_STUDIES)])
def get_study(request: Request, study_uid: str, calling_ae: str | None = None):
    node = request.app.state.node
    with node.db.session() as s:
        stmt = select(Study).where(Study.study_uid == study_uid).order_by(Study.last_received_at.desc())
        if calling_ae:
            stmt = stmt.where(Study.calling_ae == calling_ae)
        studies = s.scalars(stmt).all()
        if not studies:
            raise HTTPException(404, f"no study {study_uid}" + (f" from {calling_ae}" if calling_ae else ""))
        view = study_view(s, studies[0])
        # Same UID from another sender is a different study; say so.
        view["other_routes"] = [st.calling_ae for st in studies[1:]]
        patient = studies[0].patient_id
    events.record_read(node.audit, actor(request), request.url.path, [(patient, study_uid)])
    return view


@router.get("/studies/{study_uid}/report.pdf", dependencies=[require(Permission.READ_STUDIES)],
            response_class=Response, responses={200: {"content": {"application/pdf": {}}}})
def get_report_pdf(request: Request, study_uid: str, calling_ae: str | None = None,
                   version: int | None = Query(None, ge=1, le=2**31 - 1)):
    """The printable report of a study version (default: the latest), as encode wrote it."""
    node = request.app.state.node
    if not node.settings.outputs.report_pdf.download:
        raise HTTPException(404, "the PDF report download is switched off (outputs.report_pdf.download)")
    with node.db.session() as s:
        stmt = select(Study).where(Study.study_uid == study_uid).order_by(Study.last_received_at.desc())
        if calling_ae:
            stmt = stmt.where(Study.calling_ae == calling_ae)
        study = s.scalars(stmt).first()
        if study is None:
            raise HTTPException(404, f"no study {study_uid}" + (f" from {calling_ae}" if calling_ae else ""))
        wanted = version or results.latest_version(s, study.id)
        ae, patient = study.calling_ae, study.patient_id
    path = report_pdf_path(node.outputs_dir, ae, study_uid, wanted) if wanted else None
    if path is None or not path.exists():
        raise HTTPException(404, f"no PDF report for study {study_uid}" + (f" version {version}" if version else ""))
    data = path.read_bytes()
    events.record_read(node.audit, actor(request), request.url.path, [(patient, study_uid)])
    return Response(data, media_type="application/pdf",
                    headers={"Content-Disposition": f'inline; filename="carina-report-v{wanted}.pdf"'})
