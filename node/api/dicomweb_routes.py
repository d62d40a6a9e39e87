"""DICOMweb at /dicomweb (PS3.18): STOW-RS in; QIDO-RS and WADO-RS over Carina's outputs.

- `POST /dicomweb/studies[/{study}]`: STOW-RS, `multipart/related;
  type="application/dicom"`, streamed part by part to disk and stored through
  the C-STORE intake (node/dicomweb/stow.py). Integration tokens listed in
  `dicomweb.stow_senders` (Permission.STOW). Limits: `dicomweb.max_part_mb`
  per part (that part fails, 0xA700), `dicomweb.max_request_mb` per request
  (413: at once when Content-Length says so, else where the body crosses it).
- QIDO-RS `GET /dicomweb/{studies,series,instances}` and below a study or
  series; WADO-RS `GET` of a study, series or instance (multipart/related
  application/dicom, as stored: Explicit VR Little Endian), their `/metadata`
  (application/dicom+json, large binary values as BulkDataURIs) and an
  instance's `/bulkdata/{tag}`. Viewer and up (Permission.READ_STUDIES);
  every answer naming patients is audited (a search as a Query with every
  patient returned, a retrieval as a Patient Record read).
"""
from __future__ import annotations

import json
import logging

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from node.api.auth import actor, client_address
from node.api.policy import Permission, require
from node.audit import events
from node.dicomweb import query as q
from node.dicomweb.multipart import BadMultipart, PartWriter, media_type, new_boundary, stream_parts
from node.dicomweb.stow import DICOM, Outcome, StowIntake, StowResult
from node.receiver import Receiver, record_release

log = logging.getLogger(__name__)
router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])
READ = require(Permission.READ_STUDIES)
STORE = require(Permission.STOW)
DICOM_JSON = "application/dicom+json"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
MiB = 2**20


def _node(request: Request):
    node = request.app.state.node
    if not node.settings.dicomweb.enabled:
        raise HTTPException(404, "DICOMweb is switched off (dicomweb.enabled)")
    return node


def base_url(request: Request) -> str:
    public = request.app.state.node.settings.api.public_base_url.rstrip("/")
    return f"{public or str(request.base_url).rstrip('/')}/dicomweb"


def _json(body, status: int = 200) -> Response:
    return Response(json.dumps(body), status_code=status, media_type=DICOM_JSON)


# --- STOW-RS ----------------------------------------------------------------------------


@router.post("/studies", dependencies=[STORE], status_code=200,
             responses={200: {"content": {DICOM_JSON: {}}}, 202: {}, 409: {}, 413: {}, 415: {}})
async def stow(request: Request):
    """Store instances (STOW-RS)."""
    return await _stow(request, None)


@router.post("/studies/{study_uid}", dependencies=[STORE], status_code=200,
             responses={200: {"content": {DICOM_JSON: {}}}, 202: {}, 409: {}, 413: {}, 415: {}})
async def stow_study(request: Request, study_uid: str):
    """Store instances of one study (STOW-RS); an instance of another study fails with 0xA900."""
    return await _stow(request, study_uid)


def _sender(request: Request, node) -> str:
    principal = request.state.principal
    source = node.settings.dicomweb.source_of(principal.name) if principal.kind == "token" else None
    if source is None:
        why = f"{principal.user_id} is not a STOW-RS sender (dicomweb.stow_senders)"
        events.access_denied(node.audit, actor(request), request.method, request.url.path, why)
        raise HTTPException(403, f"{why}: list the token there with the source name its studies are keyed by")
    return source


async def _stow(request: Request, study_uid: str | None) -> Response:
    node = _node(request)
    settings = node.settings.dicomweb
    kind, params = media_type(request.headers.get("content-type", ""))
    if kind != "multipart/related" or params.get("type", DICOM).lower() != DICOM:
        raise HTTPException(415, 'STOW-RS takes multipart/related; type="application/dicom"')
    source = _sender(request, node)
    max_request = int(settings.max_request_mb * MiB)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_request:
        raise HTTPException(413, f"request larger than dicomweb.max_request_mb ({settings.max_request_mb:g} MB)")
    node.tmp_dir.mkdir(parents=True, exist_ok=True)
    try:
        writer = PartWriter(params.get("boundary", ""), node.tmp_dir, int(settings.max_part_mb * MiB))
    except BadMultipart as exc:
        raise HTTPException(400, str(exc)) from None
    intake = StowIntake(Receiver(node.db, node.instances_dir, node.settings.storage.min_free_mb), source,
                        client_address(request), node.settings.dicom.max_inflated_bytes, study_uid)
    result = StowResult()
    too_large = False

    def store_finished() -> None:
        for part in writer.done():
            result.outcomes.append(intake.store(part))

    def feed(chunk: bytes) -> None:
        writer.feed(chunk)
        store_finished()

    try:
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_request:
                too_large = result.truncated = True
                break
            if chunk:
                await run_in_threadpool(feed, chunk)
        if not too_large:
            await run_in_threadpool(writer.finish)
            await run_in_threadpool(store_finished)
    except BadMultipart as exc:
        log.warning("STOW-RS from %s: %s", source, exc)
        if not result.outcomes:
            raise HTTPException(400, str(exc)) from None
        result.truncated = True
        result.outcomes.append(Outcome("", "", "", "", 0xC000))  # the part the framing broke in
    finally:
        writer.abort()

    stored = result.stored
    studies = sorted({o.study_uid for o in stored})
    if studies:
        # The end of a request is the end of an association: the same marker the SCP's release sets.
        await run_in_threadpool(record_release, node.db, source, studies)
    pairs = sorted({(o.patient_id, o.study_uid) for o in stored})
    events.stow_received(node.audit, actor(request), source=source, pairs=pairs, stored=len(stored),
                         failed=len(result.failed) + (1 if too_large else 0))
    status = 413 if too_large else result.http_status()
    return _json(result.json(), status)


# --- QIDO-RS ----------------------------------------------------------------------------


def _search(request: Request, level: str, *, study_uid: str | None = None, series_uid: str | None = None) -> Response:
    node = _node(request)
    try:
        query = q.Query.parse(list(request.query_params.multi_items()))
    except q.QueryError as exc:
        raise HTTPException(400, str(exc)) from None
    with node.db.session() as s:
        found = q.entries(s, query, study_uid=study_uid, series_uid=series_uid)
    answer, pairs = q.search(found, query, level, base_url(request))
    events.query(node.audit, actor(request), f"{request.url.path}?{request.url.query}", pairs)
    return _json(answer)


_QIDO = {"responses": {200: {"content": {DICOM_JSON: {}}}}}


@router.get("/studies", dependencies=[READ], **_QIDO)
def search_studies(request: Request):
    """QIDO-RS: studies that have Carina outputs."""
    return _search(request, q.STUDY)


@router.get("/series", dependencies=[READ], **_QIDO)
def search_series(request: Request):
    return _search(request, q.SERIES)


@router.get("/instances", dependencies=[READ], **_QIDO)
def search_instances(request: Request):
    return _search(request, q.INSTANCE)


@router.get("/studies/{study_uid}/series", dependencies=[READ], **_QIDO)
def search_study_series(request: Request, study_uid: str):
    return _search(request, q.SERIES, study_uid=study_uid)


@router.get("/studies/{study_uid}/instances", dependencies=[READ], **_QIDO)
def search_study_instances(request: Request, study_uid: str):
    return _search(request, q.INSTANCE, study_uid=study_uid)


@router.get("/studies/{study_uid}/series/{series_uid}/instances", dependencies=[READ], **_QIDO)
def search_series_instances(request: Request, study_uid: str, series_uid: str):
    return _search(request, q.INSTANCE, study_uid=study_uid, series_uid=series_uid)


# --- WADO-RS ----------------------------------------------------------------------------


def _found(request: Request, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None):
    node = _node(request)
    with node.db.session() as s:
        found = q.entries(s, q.Query({}, frozenset(), 1, 0), study_uid=study_uid, series_uid=series_uid,
                          sop_uid=sop_uid)
    if not found:
        what = "/".join(p for p in (study_uid, series_uid, sop_uid) if p)
        raise HTTPException(404, f"no Carina output under {what}")
    events.record_read(node.audit, actor(request), request.url.path,
                       sorted({(e.patient_id, e.study_uid) for e in found}))
    return found


def _syntax(entry: q.Entry) -> str:
    meta = getattr(entry.header, "file_meta", None)
    return str((meta or {}).get("TransferSyntaxUID", "") or EXPLICIT_LE)


def _acceptable(request: Request, syntaxes: set[str]) -> bool:
    """Whether the Accept header takes multipart/related application/dicom in the syntaxes stored."""
    accept = request.headers.get("accept", "").strip()
    if not accept:
        return True
    for option in accept.split(","):
        kind, params = media_type(option)
        if kind in ("*/*", "multipart/*"):
            return True
        if kind == "multipart/related" and params.get("type", DICOM).lower() in (DICOM, "*/*"):
            wanted = params.get("transfer-syntax", "*")
            if wanted == "*" or {wanted} >= syntaxes:
                return True
    return False


def _retrieve(request: Request, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None):
    found = _found(request, study_uid, series_uid, sop_uid)
    syntaxes = {_syntax(e) for e in found}
    if not _acceptable(request, syntaxes):
        raise HTTPException(406, "Carina serves its outputs as stored (" + ", ".join(sorted(syntaxes)) +
                            ') as multipart/related; type="application/dicom"; it does not transcode')
    boundary = new_boundary()
    parts = [(e.path, f"{DICOM}; transfer-syntax={_syntax(e)}") for e in found]
    return StreamingResponse(stream_parts(parts, boundary),
                             media_type=f'multipart/related; type="{DICOM}"; boundary={boundary}')


_WADO = {"response_class": StreamingResponse, "responses": {200: {"content": {"multipart/related": {}}}}}


@router.get("/studies/{study_uid}", dependencies=[READ], **_WADO)
def retrieve_study(request: Request, study_uid: str):
    """WADO-RS: every Carina output of the study."""
    return _retrieve(request, study_uid)


@router.get("/studies/{study_uid}/series/{series_uid}", dependencies=[READ], **_WADO)
def retrieve_series(request: Request, study_uid: str, series_uid: str):
    return _retrieve(request, study_uid, series_uid)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}", dependencies=[READ], **_WADO)
def retrieve_instance(request: Request, study_uid: str, series_uid: str, sop_uid: str):
    return _retrieve(request, study_uid, series_uid, sop_uid)


def _metadata(request: Request, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None):
    found = _found(request, study_uid, series_uid, sop_uid)
    base = base_url(request)
    return _json([q.metadata_json(e.header, f"{base}/studies/{e.study_uid}/series/{e.series_uid}/instances/{e.sop_uid}")
                  for e in found])


@router.get("/studies/{study_uid}/metadata", dependencies=[READ], **_QIDO)
def study_metadata(request: Request, study_uid: str):
    return _metadata(request, study_uid)


@router.get("/studies/{study_uid}/series/{series_uid}/metadata", dependencies=[READ], **_QIDO)
def series_metadata(request: Request, study_uid: str, series_uid: str):
    return _metadata(request, study_uid, series_uid)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/metadata", dependencies=[READ], **_QIDO)
def instance_metadata(request: Request, study_uid: str, series_uid: str, sop_uid: str):
    return _metadata(request, study_uid, series_uid, sop_uid)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/bulkdata/{tag}", dependencies=[READ],
            **_WADO)
def bulkdata(request: Request, study_uid: str, series_uid: str, sop_uid: str, tag: str):
    """A BulkDataURI of the metadata: one value, as multipart/related application/octet-stream."""
    if len(tag) != 8 or not all(c in "0123456789abcdefABCDEF" for c in tag):
        raise HTTPException(404, "a bulk data tag is 8 hex digits")
    [entry] = _found(request, study_uid, series_uid, sop_uid)
    value = q.bulk_value(entry.path, int(tag, 16))
    if value is None:
        raise HTTPException(404, f"no element {tag} in {sop_uid}")
    boundary = new_boundary()
    body = (f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n".encode() + value +
            f"\r\n--{boundary}--\r\n".encode())
    return Response(body, media_type=f'multipart/related; type="application/octet-stream"; boundary={boundary}')
