"""The HTTP face of the node: health, operator API, FHIR, and the web UI."""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from node.api import studies
from node.api.fhir_routes import router as fhir_router
from node.api.predict import router as predict_router
from node.api.shadow import router as shadow_router
from node.context import NodeContext

UI_DIR = Path(__file__).resolve().parent.parent / "ui"


def create_app(ctx: NodeContext) -> FastAPI:
    app = FastAPI(title="Carina", version="0.1.0", docs_url="/api/docs", openapi_url="/api/openapi.json")
    app.state.node = ctx
    app.include_router(studies.router)
    app.include_router(fhir_router)
    app.include_router(predict_router)  # POST /api/v1/predict
    app.include_router(shadow_router)  # GET /api/v1/shadow[.csv]: admin-only
    app.mount("/ui", StaticFiles(directory=UI_DIR), name="ui")

    @app.get("/healthz", include_in_schema=False)
    def healthz(request: Request):
        node: NodeContext = request.app.state.node
        parts = dict(node.ready)
        parts["db"] = parts.get("db", False) and node.db.ping()
        body = {"status": "ok" if all(parts.values()) else "starting", "parts": parts}
        info = node.model_info
        if info is not None:
            body["model"] = {"name": info.name, "version": info.version, "demo": info.demo, "caveat": info.caveat}
            if node.models is not None:  # the runtime and the shadow candidate (model governance)
                body["model"]["backend"] = node.models.backend
                shadow_info = getattr(node.engine, "shadow_model_info", None)
                body["model"]["shadow"] = None if shadow_info is None else shadow_info.ref
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(UI_DIR / "index.html")

    return app
