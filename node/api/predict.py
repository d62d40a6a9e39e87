"""`POST /api/v1/predict`: score one uploaded image directly, outside the DICOM pipeline.

Multipart form with the file in field `image` (DICOM, PNG or JPEG); needs the
predict permission (radiologist, integration, admin) and is rate-limited per
caller (`security.predict_rate`, 429 with Retry-After). Every upload is audited
(110107 Import, with the DICOM PatientID when there is one). The image goes through the same batching worker as the pipeline, so
API calls and studies share batches and the same (hot-swappable) model.

Every bad input is a 4xx with `{"status": "error", "reason": ...}`:
413 too large (`inference.predict_max_upload_mb`, checked on Content-Length
and again while streaming), 415 not multipart or not a DICOM/PNG/JPEG,
422 missing field or undecodable image, 503 while no model is loaded.

`confidence_score` is how decisively the model answers for this image: the
mean over the 14 labels of |2·q − 1|, where q is the probability normalised
at the label's operating point (0.5 = the operating point). 1 means every
label is far from its operating point, 0 means every label sits on it.
It is not a calibrated probability that the read is correct.
"""
from __future__ import annotations

import datetime as dt
import logging
import time

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from node.api.auth import actor
from node.api.policy import Permission, require
from node.api.ratelimit import predict_limit, too_many
from node.audit import events
from node.audit.messages import MINOR_FAILURE, SUCCESS

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1", tags=["predict"])

FIELD = "image"


class _TooLarge(Exception):
    pass


class BadInput(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def error_response(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"status": "error", "reason": reason}, status_code=status)


@router.post("/predict", dependencies=[require(Permission.PREDICT)])
async def predict(request: Request):
    node = request.app.state.node
    started = time.perf_counter()
    wait = predict_limit(request)
    if wait is not None:
        return too_many(wait, "predict")
    limit = int(node.settings.inference.predict_max_upload_mb * 1024 * 1024)
    limit_text = f"{node.settings.inference.predict_max_upload_mb:g} MB (inference.predict_max_upload_mb)"

    form = await read_form(request, limit, limit_text)
    if isinstance(form, JSONResponse):
        return form
    try:
        upload = form.get(FIELD)
        if not isinstance(upload, UploadFile):
            return error_response(422, f"multipart field {FIELD!r} with the image file is missing")
        data = await upload.read()
    finally:
        await form.close()
    if not data:
        return error_response(422, f"the uploaded {FIELD!r} file is empty")

    engine = node.engine
    if engine is None:
        return error_response(503, "the model is not loaded yet; see /healthz")
    patient_id, study_uid = dicom_identity(data)
    try:
        result, kind = await run_in_threadpool(score_bytes, engine, data)
    except BadInput as exc:
        await run_in_threadpool(events.predict_import, node.audit, actor(request), kind=kind_of(data),
                                patient_id=patient_id, study_uid=study_uid, outcome=MINOR_FAILURE,
                                why=f"refused with HTTP {exc.status}")
        return error_response(exc.status, exc.reason)
    await run_in_threadpool(events.predict_import, node.audit, actor(request), kind=kind, patient_id=patient_id,
                            study_uid=study_uid, outcome=SUCCESS)
    return JSONResponse(response_body(result, kind, (time.perf_counter() - started) * 1000))


async def read_form(request: Request, limit: int, limit_text: str, field: str = FIELD):
    """The multipart form of an upload (files spooled by Starlette), or the 4xx
    JSONResponse to answer: 415 not multipart, 413 beyond `limit` bytes (on
    Content-Length, then counted while streaming), 422 malformed. The caller closes it."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        return error_response(415, f"expected a multipart/form-data upload with the file in field {field!r}, "
                           f"got Content-Type {content_type or 'none'!r}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return error_response(413, f"upload of {int(declared):,} bytes exceeds the limit of {limit_text}")

    async def capped():
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise _TooLarge
            yield chunk

    try:
        return await MultiPartParser(request.headers, capped(), max_files=1, max_fields=8).parse()
    except _TooLarge:
        return error_response(413, f"upload exceeds the limit of {limit_text}")
    except MultiPartException as exc:
        return error_response(422, f"malformed multipart body: {exc}")
    except Exception as exc:  # a broken stream or boundary the parser chokes on
        return error_response(422, f"malformed multipart body: {type(exc).__name__}")


def kind_of(data: bytes) -> str:
    from inference import sniff_format

    return sniff_format(data[:256]) or "unknown"


def dicom_identity(data: bytes) -> tuple[str, str]:
    """PatientID and StudyInstanceUID of an uploaded DICOM, for the audit trail ("", "" otherwise)."""
    import io

    from pydicom import dcmread

    if kind_of(data) != "dicom":
        return "", ""
    try:
        header = dcmread(io.BytesIO(data), stop_before_pixels=True,
                         specific_tags=["PatientID", "StudyInstanceUID"])
        return str(header.get("PatientID", "") or "").strip(), str(header.get("StudyInstanceUID", "") or "").strip()
    except Exception:  # hostile bytes: the decoder will say why; the audit record has no patient
        return "", ""


def score_bytes(engine, data: bytes):
    from inference import DecodeError, decode_image, sniff_format

    kind = sniff_format(data[:256])
    if kind is None:
        raise BadInput(415, "unsupported file type: expected a DICOM, PNG or JPEG image")
    try:
        image = decode_image(data)
    except DecodeError as exc:
        raise BadInput(422, f"cannot decode the {kind.upper()} image: {exc}") from None
    except Exception as exc:  # hostile input may trip a library in ways it does not document
        # The class only: a library's message may quote header values (names, dates) of the upload.
        raise BadInput(422, f"cannot decode the {kind.upper()} image: {type(exc).__name__}") from None
    try:
        (result,) = engine.predict([image])
    except (ValueError, DecodeError) as exc:  # e.g. a degenerate geometry the preprocessing refuses
        raise BadInput(422, f"cannot score this image: {exc}") from None
    return result, kind


def response_body(result, kind: str, elapsed_ms: float) -> dict:
    from inference.severity import normalise_at_operating_point
    from node.outputs.uids import device_uid

    model = result.model
    diagnoses = sorted(result.findings, key=lambda f: f.probability, reverse=True)
    decisiveness = [abs(2 * normalise_at_operating_point(f.probability, f.threshold) - 1) for f in result.findings]
    rows, columns = result.image.source_shape
    metadata = {
        "model_name": model.name,
        "model_version": model.version,
        "device_uid": device_uid(model.name, model.version, model.weights_sha256),
        "demo": model.demo,
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
        "image": {"format": kind, "rows": rows, "columns": columns},
    }
    if model.caveat:
        metadata["caveat"] = model.caveat
    return {
        "status": "success",
        "prediction": {
            "diagnoses": [
                {
                    "condition": f.label,
                    "probability": round(f.probability, 6),
                    "threshold": round(f.threshold, 6),
                    "positive": f.positive,
                    "severity": f.severity,
                    "regions": [list(r.bbox) for r in f.regions],
                }
                for f in diagnoses
            ],
            "confidence_score": round(sum(decisiveness) / len(decisiveness), 6),
            "processing_time_ms": round(elapsed_ms, 1),
        },
        "metadata": metadata,
    }
