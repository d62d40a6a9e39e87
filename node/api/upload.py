"""`POST /api/v1/upload`: the reading app's drop zone.

Multipart field `file`: one DICOM, PNG or JPEG, or a zip of them (bounded:
node/uploads.py, `ui.upload`). Each image takes the direct predict path
(node/api/predict.py `score_bytes`: the same decoding and batching engine as
the pipeline), and is audited as an import, like `POST /api/v1/predict`.
Nothing is stored.

The answer streams as NDJSON, one line as each image is done, so the page
shows progress through a zip:

    {"type": "start", "total": N, "archive": true|false}
    {"type": "result", "index": i, "name": ..., "status": "success", "prediction": ..., "metadata": ..., "view": ...}
    {"type": "result", "index": i, "name": ..., "status": "error", "http_status": 422, "reason": ...}
    {"type": "done", "scored": n, "failed": m}

`view` is what the viewer draws: a JPEG preview, the 14 findings with their
outlines and each finding's heatmap overlay (PNG), as data URLs.
An archive refused as a whole, or a single file out of bounds, is a plain 4xx.
"""
from __future__ import annotations

import base64
import json
import time

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import UploadFile

from inference.types import CHESTXRAY14
from node import rendering, uploads
from node.api.auth import actor
from node.api.policy import Permission, require
from node.api.predict import BadInput, dicom_identity, error_response, kind_of, read_form, response_body, score_bytes
from node.api.ratelimit import predict_limit, too_many
from node.audit import events
from node.audit.messages import MINOR_FAILURE, SUCCESS
from node.reading import finding_view

router = APIRouter(prefix="/api/v1", tags=["upload"])

FIELD = "file"


def _data_url(media_type: str, body: bytes) -> str:
    return f"data:{media_type};base64," + base64.b64encode(body).decode("ascii")


def view(result) -> dict:
    heatmaps = result.heatmaps
    return {
        "image": _data_url("image/jpeg", rendering.preview(result.image)),
        "source_shape": list(heatmaps.source_shape),
        "findings": [finding_view(f) for f in result.findings],
        "heatmaps": {label: _data_url("image/png", rendering.heatmap_png(heatmaps, i))
                     for i, label in enumerate(CHESTXRAY14)},
    }


def _line(value: dict) -> bytes:
    return (json.dumps(value, ensure_ascii=False) + "\n").encode()


@router.post("/upload", dependencies=[require(Permission.PREDICT)])
async def upload(request: Request):
    node = request.app.state.node
    wait = predict_limit(request)
    if wait is not None:
        return too_many(wait, "upload")
    settings = node.settings
    limits = uploads.Limits.from_settings(settings)
    zip_limit = int(settings.ui.upload.max_zip_mb * uploads.MB)
    form = await read_form(request, max(zip_limit, limits.member_bytes),
                           f"{settings.ui.upload.max_zip_mb:g} MB (ui.upload.max_zip_mb)", FIELD)
    if isinstance(form, JSONResponse):
        return form
    upload_file = form.get(FIELD)
    if not isinstance(upload_file, UploadFile):
        await form.close()
        return error_response(422, f"multipart field {FIELD!r} with the file is missing")
    if node.engine is None:
        await form.close()
        return error_response(503, "the model is not loaded yet; see /healthz")
    who = actor(request)
    name = (upload_file.filename or "upload")[:200]
    head = await upload_file.read(8)
    await upload_file.seek(0)
    if uploads.is_zip(head):
        try:
            total, members = await run_in_threadpool(uploads.open_archive, upload_file.file, limits)
        except uploads.ArchiveRefused as exc:
            await form.close()
            await run_in_threadpool(events.predict_import, node.audit, who, kind="zip", patient_id="", study_uid="",
                                    outcome=MINOR_FAILURE, why="archive refused")
            return error_response(422, str(exc))
        archive = True
    else:
        data = await upload_file.read(limits.member_bytes + 1)
        if len(data) > limits.member_bytes:
            await form.close()
            return error_response(413, f"one image is at most {settings.inference.predict_max_upload_mb:g} MB "
                               "(inference.predict_max_upload_mb); upload several as a zip")
        if not data:
            await form.close()
            return error_response(422, f"the uploaded {FIELD!r} file is empty")
        total, members, archive = 1, iter([uploads.Member(name, data)]), False

    def results():
        scored = failed = 0
        try:
            yield _line({"type": "start", "total": total, "archive": archive})
            for index, member in enumerate(members):
                line = _score_member(node, who, index, member)
                scored, failed = (scored + 1, failed) if line["status"] == "success" else (scored, failed + 1)
                yield _line(line)
            yield _line({"type": "done", "scored": scored, "failed": failed})
        finally:
            upload_file.file.close()

    # A sync generator: Starlette runs each step in its thread pool, so scoring never blocks the loop.
    return StreamingResponse(results(), media_type="application/x-ndjson")


def _score_member(node, who, index: int, member: uploads.Member) -> dict:
    base = {"type": "result", "index": index, "name": member.name}
    if member.problem:
        return base | {"status": "error", "http_status": 422, "reason": member.problem}
    started = time.perf_counter()
    patient_id, study_uid = dicom_identity(member.data)
    try:
        result, kind = score_bytes(node.engine, member.data)
    except BadInput as exc:
        events.predict_import(node.audit, who, kind=kind_of(member.data), patient_id=patient_id, study_uid=study_uid,
                              outcome=MINOR_FAILURE, why=f"refused with HTTP {exc.status}")
        return base | {"status": "error", "http_status": exc.status, "reason": exc.reason}
    events.predict_import(node.audit, who, kind=kind, patient_id=patient_id, study_uid=study_uid, outcome=SUCCESS)
    body = response_body(result, kind, (time.perf_counter() - started) * 1000)
    return base | body | {"view": view(result)}
