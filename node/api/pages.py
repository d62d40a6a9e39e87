"""The reading web app's pages, rendered on the server (Jinja2, node/ui/templates/).

Every page declares its policy like any route: the worklist and the study
viewer need `studies:read`, the upload page `predict`, the admin pages and the
audit page `admin`. A browser without a session is sent to /login (and back
after it); a role without the permission gets a 403 page. The pages' small
scripts and styles are static files under /ui (node/ui/static/); nothing is
inline, so the CSP needs no 'unsafe-inline'.

- `/`: the worklist (node/worklist.py), refreshed by polling
  `/worklist/rows` with the last ETag (304 while nothing changed);
- `/studies/{id}`: the viewer (node/reading.py);
- `/upload`: drop DICOM, PNG, JPEG or a zip (node/api/upload.py);
- `/admin/models`, `/admin/system`, `/audit`: administration.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import shutil
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Path as PathParam, Query, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import select
from starlette.exceptions import HTTPException as StarletteHTTPException

from inference.types import CHESTXRAY14
from node import ops_queries, reading, worklist
from node.api.auth import actor
from node.api.policy import Permission, allows, public, require
from node.audit import events
from node.db import Job, Study
from node.states import JobState, Priority, StudyState

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
TAG = "pages"

templates = Jinja2Templates(directory=UI_DIR / "templates")
templates.env.globals.update(person_name=worklist.person_name, display_date=worklist.display_date,
                             label_text=reading.label_text, Permission=Permission)

router = APIRouter(include_in_schema=False, tags=[TAG])


def _iso(t: float | None) -> str:
    return "" if t is None else dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


templates.env.filters["utc"] = _iso


def render(request: Request, template: str, status_code: int = 200, **context) -> Response:
    node = request.app.state.node
    principal = getattr(request.state, "principal", None)
    base = {
        "me": principal,
        "can": lambda permission: principal is not None and allows(principal.role, permission),
        "csrf": principal.csrf_token if principal is not None else "",
        "running_model": node.model_info,
    }
    return templates.TemplateResponse(request, template, base | context, status_code=status_code)


def _is_page(request: Request) -> bool:
    route = request.scope.get("route")
    return TAG in (getattr(route, "tags", None) or [])


async def page_errors(request: Request, exc: StarletteHTTPException) -> Response:
    """A browser asking for a page: 401 becomes the login page (coming back after), other errors a page.
    Anything else (the API, scripts) gets FastAPI's JSON answer."""
    if _is_page(request) and "text/html" in request.headers.get("accept", ""):
        if exc.status_code == 401:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            response = RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
            if exc.headers and "Set-Cookie" in exc.headers:
                response.headers["Set-Cookie"] = exc.headers["Set-Cookie"]
            return response
        return render(request, "error.html", status_code=exc.status_code, status=exc.status_code, detail=exc.detail)
    return await http_exception_handler(request, exc)


# --- log in ----------------------------------------------------------------------------------


@router.get("/login", dependencies=[public("the login page")])
def login_page(request: Request):
    return render(request, "login.html")


# --- the worklist ----------------------------------------------------------------------------


def _filters(request: Request) -> worklist.Filters:
    try:
        return worklist.Filters.parse(request.query_params)
    except worklist.BadFilter as exc:
        raise HTTPException(400, str(exc)) from None


def _rows(request: Request, filters: worklist.Filters) -> list[worklist.Row]:
    with request.app.state.node.db.session() as s:
        return worklist.rows(s, filters)


def _audit_rows(request: Request, rows: list[worklist.Row]) -> None:
    events.query(request.app.state.node.audit, actor(request), f"worklist?{request.url.query}",
                 [(r.patient_id, r.study_uid) for r in rows])


def _rows_html(rows: list[worklist.Row]) -> tuple[str, str]:
    """The rows as the page's <tbody>, and its ETag (the fragment's hash)."""
    html = templates.get_template("_rows.html").render(rows=rows)
    return html, '"' + hashlib.sha256(html.encode()).hexdigest()[:32] + '"'


@router.get("/", dependencies=[require(Permission.READ_STUDIES)])
def worklist_page(request: Request):
    filters = _filters(request)
    rows = _rows(request, filters)
    html, etag = _rows_html(rows)
    _audit_rows(request, rows)
    return render(request, "worklist.html", rows_html=html, rows_etag=etag, filters=filters, findings=CHESTXRAY14,
                  states=list(StudyState), priorities=list(Priority),
                  refresh_seconds=request.app.state.node.settings.ui.refresh_seconds)


@router.get("/worklist/rows", dependencies=[require(Permission.READ_STUDIES)])
def worklist_rows(request: Request):
    """The worklist's rows as an HTML fragment, for the page's polling. An
    unchanged list is a 304, with no body and no audit record."""
    rows = _rows(request, _filters(request))
    html, etag = _rows_html(rows)
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    _audit_rows(request, rows)
    return Response(html, media_type="text/html; charset=utf-8", headers={"ETag": etag})


# --- the study viewer --------------------------------------------------------------------------


@router.get("/studies/{study_id}", dependencies=[require(Permission.READ_STUDIES)])
def study_page(request: Request, study_id: int = PathParam(ge=1, le=2**63 - 1),
               version: int | None = Query(None, ge=1, le=2**31)):
    node = request.app.state.node
    principal = request.state.principal
    with node.db.session() as s:
        try:
            study = reading.load(s, study_id, version, principal.user_id)
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from None
    events.record_read(node.audit, actor(request), request.url.path, [(study.patient_id, study.study_uid)])
    return render(request, "viewer.html", study=study, images=study.images())


# --- upload ----------------------------------------------------------------------------------


@router.get("/upload", dependencies=[require(Permission.PREDICT)])
def upload_page(request: Request):
    settings = request.app.state.node.settings
    return render(request, "upload.html", upload=settings.ui.upload,
                  max_image_mb=settings.inference.predict_max_upload_mb)


# --- administration ----------------------------------------------------------------------------


@router.get("/admin/models", dependencies=[require(Permission.ADMIN)])
def models_page(request: Request):
    from node.api.admin_models import models_view

    return render(request, "admin_models.html", view=models_view(request.app.state.node))


def _disk(path: Path) -> dict:
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return {}
    return {"total_gb": usage.total / 1e9, "used_gb": usage.used / 1e9, "free_gb": usage.free / 1e9,
            "used_fraction": usage.used / usage.total if usage.total else 0.0}


@router.get("/admin/system", dependencies=[require(Permission.ADMIN)])
def system_page(request: Request):
    node = request.app.state.node
    snap = ops_queries.snapshot(node.db)
    stages = sorted({stage for stage, _ in snap.jobs_by_stage_state})
    with node.db.session() as s:
        dead = s.execute(select(Job, Study.study_uid).join(Study, Study.id == Job.study_id)
                         .where(Job.state == JobState.DEAD).order_by(Job.finished_at).limit(200)).all()
        dead_letters = [{"id": j.id, "stage": j.stage, "destination": j.destination, "study_uid": uid,
                         "version": j.study_version, "attempts": j.attempts, "dead_since": _iso(j.finished_at),
                         "last_error": j.last_error} for j, uid in dead]
    return render(
        request, "admin_system.html",
        snapshot=snap, stages=stages, job_states=list(JobState), dead_letters=dead_letters,
        disk=_disk(node.data_dir), floor_mb=node.settings.storage.min_free_mb,
        throughput=[ops_queries.throughput(node.db, 3600), ops_queries.throughput(node.db, 86400)],
        destinations=node.settings.destinations,
    )


@router.get("/audit", dependencies=[require(Permission.ADMIN)])
def audit_page(request: Request):
    return render(request, "audit.html")
