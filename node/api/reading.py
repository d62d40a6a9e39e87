"""The reading app's data routes under `/api/v1/read/{study_id}` (the study's
row id, which names one (sender, study) pair) and `/api/v1/feedback`.

- `GET .../images/{sop}.png?version=N`: the radiograph as the pipeline
  rendered it (node/rendering.py); `GET .../heatmaps/{sop}/{label}.png?version=N`:
  one finding's class activation map as a transparent overlay. Both answer
  `Cache-Control: private, no-store` and are audited (110110 Patient Record).
- `GET .../outputs/{output_id}`: one output file of the study (any kind the
  encode stage wrote: SR, SC, SEG, GSPS, PDF ...); `GET .../fhir.json`: the
  study's FHIR resources as a collection Bundle. Audited as exports.
- `PUT .../feedback`: the caller's verdict on one finding (node/feedback.py
  `save`: creates or updates the caller's own); `PATCH /api/v1/feedback/{id}`:
  change one by id (only its author; 403 otherwise). Audited (C or U).
- `GET /api/v1/feedback/export.csv`: all feedback as a labelled set for
  `carina eval --labels` (audited as an export, with every patient in it).
"""
from __future__ import annotations

import json
import mimetypes
from pathlib import Path

from fastapi import APIRouter, HTTPException, Path as PathParam, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from sqlalchemy import select

from inference.types import CHESTXRAY14
from node import feedback, fhir_store, rendering, results
from node.api.auth import actor
from node.api.fhir_routes import base_url
from node.api.policy import Permission, require
from node.audit import events
from node.db import Feedback, Instance, InstanceRevision, Output, Study
from node.storage import display_path

router = APIRouter(prefix="/api/v1", tags=["reading"])

READ = require(Permission.READ_STUDIES)
FEEDBACK = require(Permission.FEEDBACK)
# Pictures of a patient: never kept by the browser or anything between.
IMAGE_HEADERS = {"Cache-Control": "private, no-store"}


def db_id():
    """A database row id in the path (larger ones are a 422, not a driver overflow). A fresh
    Param per parameter: FastAPI must not share one FieldInfo between two parameters."""
    return PathParam(ge=1, le=2**63 - 1)


def _study(session, study_id: int) -> Study:
    study = session.get(Study, study_id)
    if study is None:
        raise HTTPException(404, f"no study {study_id}")
    return study


def _scored(session, study: Study, version: int):
    try:
        return results.load(session, study.id, version)
    except LookupError:
        raise HTTPException(404, f"study {study.id} has no scored version {version}") from None


def _scored_image(scored, sop_uid: str):
    image = next((i for i in scored.images if i.sop_instance_uid == sop_uid), None)
    if image is None:
        raise HTTPException(404, f"image {sop_uid} was not scored in this version")
    return image


def _instance_file(session, study: Study, sop_uid: str, revision: int) -> Path | None:
    """The received file that version scored (an earlier revision after a changed re-send)."""
    instance = session.scalar(select(Instance).where(Instance.study_id == study.id, Instance.sop_instance_uid == sop_uid))
    if instance is None:
        return None
    path = session.scalar(select(InstanceRevision.path).where(InstanceRevision.instance_id == instance.id,
                                                              InstanceRevision.revision == revision))
    return Path(path or instance.path)


@router.get("/read/{study_id}/images/{sop_uid}.png", dependencies=[READ])
def source_image(request: Request, study_id: int = db_id(), sop_uid: str = PathParam(max_length=64),
                 version: int = Query(ge=1, le=2**31)):
    node = request.app.state.node
    with node.db.session() as s:
        study = _study(s, study_id)
        image = _scored_image(_scored(s, study, version), sop_uid)
        display = display_path(node.work_dir, study.calling_ae, study.study_uid, version, sop_uid)
        instance_file = _instance_file(s, study, sop_uid, image.revision)
        pair = (study.patient_id, study.study_uid)
    try:
        body = rendering.source_png(display, instance_file)
    except FileNotFoundError:
        raise HTTPException(410, "the image is no longer stored (retention)") from None
    except ValueError as exc:  # DecodeError
        raise HTTPException(422, f"the stored image cannot be decoded: {type(exc).__name__}") from None
    events.record_read(node.audit, actor(request), request.url.path, [pair])
    return Response(body, media_type="image/png", headers=IMAGE_HEADERS)


@router.get("/read/{study_id}/heatmaps/{sop_uid}/{label}.png", dependencies=[READ])
def heatmap(request: Request, study_id: int = db_id(), sop_uid: str = PathParam(max_length=64),
            label: str = PathParam(max_length=32), version: int = Query(ge=1, le=2**31)):
    if label not in CHESTXRAY14:
        raise HTTPException(404, f"unknown finding {label!r}")
    node = request.app.state.node
    with node.db.session() as s:
        study = _study(s, study_id)
        image = _scored_image(_scored(s, study, version), sop_uid)
        pair = (study.patient_id, study.study_uid)
    body = rendering.heatmap_png(image.heatmaps, CHESTXRAY14.index(label))
    events.record_read(node.audit, actor(request), request.url.path, [pair])
    return Response(body, media_type="image/png", headers=IMAGE_HEADERS)


def download_name(kind: str, sop_uid: str, path: Path) -> str:
    return f"carina-{kind}-{sop_uid}{path.suffix or '.dcm'}"


def _media_type(path: Path) -> str:
    if path.suffix in ("", ".dcm"):
        return "application/dicom"
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


@router.get("/read/{study_id}/outputs/{output_id}", dependencies=[READ])
def download_output(request: Request, study_id: int = db_id(), output_id: int = db_id()):
    node = request.app.state.node
    with node.db.session() as s:
        study = _study(s, study_id)
        output = s.get(Output, output_id)
        if output is None or output.study_id != study.id:
            raise HTTPException(404, f"study {study_id} has no output {output_id}")
        path, kind, sop_uid = Path(output.path), output.kind, output.sop_instance_uid
        pair = (study.patient_id, study.study_uid)
    try:
        body = path.read_bytes()
    except FileNotFoundError:
        raise HTTPException(410, "the output is no longer stored (retention)") from None
    name = download_name(kind, sop_uid, path)
    events.exported(node.audit, actor(request), f"output:{kind}:{sop_uid}", [pair])
    return Response(body, media_type=_media_type(path),
                    headers={"Content-Disposition": f'attachment; filename="{name}"', **IMAGE_HEADERS})


@router.get("/read/{study_id}/fhir.json", dependencies=[READ])
def fhir_bundle(request: Request, study_id: int = db_id()):
    node = request.app.state.node
    base = base_url(request)
    with node.db.session() as s:
        study = _study(s, study_id)
        resources = fhir_store.study_resources(s, study.id)
        pair = (study.patient_id, study.study_uid)
    if not resources:
        raise HTTPException(404, f"study {study_id} has no FHIR report yet")
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r} for r in resources]}
    events.exported(node.audit, actor(request), f"fhir-bundle:{study.study_uid}", [pair])
    return Response(json.dumps(bundle, ensure_ascii=False, indent=1), media_type="application/fhir+json",
                    headers={"Content-Disposition": f'attachment; filename="carina-fhir-{study.study_uid}.json"'})


# --- feedback ------------------------------------------------------------------------------


class FeedbackIn(BaseModel):
    version: int = Field(ge=1, le=2**31)
    sop_instance_uid: str = Field(min_length=1, max_length=64)
    label: str = Field(min_length=1, max_length=32)
    verdict: str = Field(min_length=1, max_length=16)
    comment: str = Field(default="", max_length=2000)


class FeedbackChange(BaseModel):
    verdict: str | None = Field(default=None, max_length=16)
    comment: str | None = Field(default=None, max_length=2000)


def feedback_json(view: feedback.FeedbackView, user: str) -> dict:
    import datetime as dt

    return {
        "id": view.id, "study_version": view.study_version, "sop_instance_uid": view.sop_instance_uid,
        "label": view.label, "verdict": view.verdict, "comment": view.comment, "user": view.user,
        "mine": view.user == user, "model_positive": view.model_positive, "model_ref": view.model_ref,
        "updated_at": dt.datetime.fromtimestamp(view.updated_at, dt.timezone.utc).isoformat(timespec="seconds"),
    }


@router.get("/read/{study_id}/feedback", dependencies=[READ])
def list_feedback(request: Request, study_id: int = db_id(), version: int | None = Query(None, ge=1, le=2**31)):
    node = request.app.state.node
    user = request.state.principal.user_id
    with node.db.session() as s:
        study = _study(s, study_id)
        views = feedback.list_for_study(s, study.id, version)
        pair = (study.patient_id, study.study_uid)
    events.record_read(node.audit, actor(request), request.url.path, [pair])
    return {"feedback": [feedback_json(v, user) for v in views]}


@router.put("/read/{study_id}/feedback", dependencies=[FEEDBACK])
def save_feedback(request: Request, body: FeedbackIn, study_id: int = db_id()):
    node = request.app.state.node
    user = request.state.principal.user_id
    with node.db.session() as s:
        study = _study(s, study_id)
        existed = s.scalar(select(Feedback.id).where(
            Feedback.study_id == study.id, Feedback.study_version == body.version, Feedback.label == body.label,
            Feedback.sop_instance_uid == body.sop_instance_uid, Feedback.user == user)) is not None
        try:
            view = feedback.save(s, study_id=study.id, study_version=body.version,
                                 sop_instance_uid=body.sop_instance_uid, label=body.label, verdict=body.verdict,
                                 user=user, comment=body.comment)
        except feedback.FeedbackError as exc:
            raise HTTPException(422, str(exc)) from None
        pair = (study.patient_id, study.study_uid)
    events.record_changed(node.audit, actor(request), f"feedback:{view.id}", [pair], created=not existed)
    return feedback_json(view, user)


@router.patch("/feedback/{feedback_id}", dependencies=[FEEDBACK])
def change_feedback(request: Request, body: FeedbackChange, feedback_id: int = db_id()):
    node = request.app.state.node
    user = request.state.principal.user_id
    with node.db.session() as s:
        row = s.get(Feedback, feedback_id)
        if row is None:
            raise HTTPException(404, f"no feedback {feedback_id}")
        study = s.get(Study, row.study_id)
        pair = (study.patient_id, study.study_uid) if study else ("", "")
        try:
            view = feedback.update(s, feedback_id, user=user, verdict=body.verdict, comment=body.comment)
        except feedback.NotAuthor as exc:
            raise HTTPException(403, str(exc)) from None
        except feedback.FeedbackError as exc:
            raise HTTPException(422, str(exc)) from None
    events.record_changed(node.audit, actor(request), f"feedback:{feedback_id}", [pair], created=False)
    return feedback_json(view, user)


@router.get("/feedback/export.csv", dependencies=[FEEDBACK])
def export_feedback(request: Request):
    node = request.app.state.node
    text, pairs = feedback.labelled_set(node.db, instances_dir=node.instances_dir)
    events.exported(node.audit, actor(request), "feedback-labelled-set.csv", sorted(set(pairs)))
    return Response(text, media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="carina-feedback-labels.csv"'})
