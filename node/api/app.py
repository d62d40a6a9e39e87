"""The HTTP face of the node: health, operator API, FHIR, and the reading web app.

Every route declares its access policy (node/api/policy.py); `check_policies`
refuses to build an app with a route that does not. Every response carries
the security headers of node/api/headers.py.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from node.api import admin, admin_models, ops, pages, reading, sessions, studies, upload
from node.api.dicomweb_routes import router as dicomweb_router
from node.api.fhir_routes import router as fhir_router
from node.api.headers import SecurityHeaders
from node.api.policy import Permission, check_policies, mount_public, public, require
from node.api.predict import router as predict_router
from node.api.shadow import router as shadow_router
from node.context import NodeContext

STATIC_DIR = Path(__file__).resolve().parent.parent / "ui" / "static"
OPENAPI_PATH = "/api/openapi.json"


def healthz(request: Request):
    """Liveness: 200 whenever the process answers HTTP. The body says
    whether its parts are up ("ok") or not yet ("starting"); readiness,
    with the reasons, is /readyz. The parts are those of the process's role."""
    node: NodeContext = request.app.state.node
    parts = dict(node.ready)
    parts["db"] = parts.get("db", False) and node.db.ping()
    status = "draining" if node.draining else "ok" if all(parts.values()) else "starting"
    body = {"status": status, "role": node.role, "parts": parts}
    info = node.model_info
    if info is not None:
        body["model"] = {"name": info.name, "version": info.version, "demo": info.demo, "caveat": info.caveat}
        if node.models is not None:  # the runtime and the shadow candidate (model governance)
            body["model"]["backend"] = node.models.backend
            shadow_info = getattr(node.engine, "shadow_model_info", None)
            body["model"]["shadow"] = None if shadow_info is None else shadow_info.ref
    return JSONResponse(body)


def add_healthz(app: FastAPI) -> None:
    app.get("/healthz", include_in_schema=False,
            dependencies=[public("probed by load balancers and monitoring; no patient data")])(healthz)


def create_probe_app(ctx: NodeContext) -> FastAPI:
    """The HTTP face of the receiver and worker roles (node/service.py): /healthz,
    /readyz and /metrics only, for the orchestrator's probes and Prometheus."""
    app = FastAPI(title="Carina", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.node = ctx
    app.include_router(ops.probes)  # /readyz, /metrics
    add_healthz(app)
    app.add_middleware(SecurityHeaders, https=sessions.https(ctx.settings),
                       hsts_max_age=ctx.settings.security.hsts_max_age_seconds)
    check_policies(app)
    return app


def create_app(ctx: NodeContext) -> FastAPI:
    # No Swagger/ReDoc pages: they load scripts from a CDN and inline, which the
    # CSP forbids (and the node has no network). The schema itself needs a login.
    app = FastAPI(title="Carina", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.node = ctx
    app.include_router(sessions.router)
    app.include_router(studies.router)
    app.include_router(admin.router)
    app.include_router(fhir_router)
    app.include_router(predict_router)  # POST /api/v1/predict
    app.include_router(ops.probes)  # /readyz, /metrics
    app.include_router(ops.admin)  # /api/v1/admin/...
    app.include_router(shadow_router)  # GET /api/v1/shadow[.csv]: admin-only
    app.include_router(dicomweb_router)  # STOW-RS in, QIDO-RS and WADO-RS of Carina's outputs
    app.include_router(reading.router)  # the reading app's images, heatmaps, downloads and feedback
    app.include_router(upload.router)  # POST /api/v1/upload
    app.include_router(admin_models.router)  # the admin pages' model registry and destination probes
    app.include_router(pages.router)  # the reading app's pages (server-rendered)
    app.add_exception_handler(StarletteHTTPException, pages.page_errors)
    mount_public(app, "/ui", StaticFiles(directory=STATIC_DIR), "ui",
                 "the web app's scripts, styles and admin page shells; no patient data")

    @app.get(OPENAPI_PATH, include_in_schema=False, dependencies=[require(Permission.SESSION)])
    def openapi():
        return JSONResponse(app.openapi())

    add_healthz(app)
    settings = ctx.settings
    app.add_middleware(SecurityHeaders, https=sessions.https(settings),
                       hsts_max_age=settings.security.hsts_max_age_seconds)
    check_policies(app)
    return app
