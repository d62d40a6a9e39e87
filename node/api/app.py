"""The HTTP face of the node: health, operator API, FHIR, and the web UI."""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from node.api import ops, studies
from node.api.fhir_routes import router as fhir_router
from node.api.predict import router as predict_router
from node.context import NodeContext

UI_DIR = Path(__file__).resolve().parent.parent / "ui"


def create_app(ctx: NodeContext) -> FastAPI:
    app = FastAPI(title="Carina", version="0.1.0", docs_url="/api/docs", openapi_url="/api/openapi.json")
    app.state.node = ctx
    app.include_router(studies.router)
    app.include_router(fhir_router)
    app.include_router(predict_router)  # POST /api/v1/predict
    app.include_router(ops.probes)  # /readyz, /metrics
    app.include_router(ops.admin)  # /api/v1/admin/...
    app.mount("/ui", StaticFiles(directory=UI_DIR), name="ui")

    @app.get("/healthz", include_in_schema=False)
    def healthz(request: Request):
        """Liveness: 200 whenever the process answers HTTP. The body says
        whether its parts are up ("ok") or not yet ("starting"); readiness,
        with the reasons, is /readyz."""
        node: NodeContext = request.app.state.node
        parts = dict(node.ready)
        parts["db"] = parts.get("db", False) and node.db.ping()
        status = "draining" if node.draining else "ok" if all(parts.values()) else "starting"
        body = {"status": status, "parts": parts}
        info = node.model_info
        if info is not None:
            body["model"] = {"name": info.name, "version": info.version, "demo": info.demo, "caveat": info.caveat}
        return JSONResponse(body)

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(UI_DIR / "index.html")

    return app
