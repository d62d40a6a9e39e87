"""Admin API behind the reading app's admin pages: the model registry and the destinations' health.

- `GET /api/v1/admin/models`: every registry entry (node/models.py) with its
  kind, weights hash and import time, which one is active, the activation log,
  and which model a rollback would go back to;
- `POST /api/v1/admin/models/activate` `{"ref": "NAME@VERSION", "force": false}`:
  `carina model activate` from the browser. The activation guard applies: its
  objections are a 409 with the reasons unless `force` (recorded as an
  override, as `--force` is). Every activation, and every refusal, is in the
  audit trail (110113 / 110131 Software Configuration);
- `POST /api/v1/admin/models/rollback` `{"force": false}`: activate the model
  that was active before the current one (the activation log says which);
- `GET /api/v1/admin/destinations/health`: each destination probed now
  (node/probes.py: C-ECHO, HTTP or MLLP).

A running node switches to a newly activated model within
`inference.model_poll_seconds`, as after the CLI. A node pinned to
`inference.weights` ignores activation, so these answer 409 there.
"""
from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from node import probes
from node.api.auth import actor
from node.api.policy import Permission, require
from node.audit import events, messages
from node.models import ActivationRefused, ModelRegistry, RegistryError

router = APIRouter(prefix="/api/v1/admin", dependencies=[require(Permission.ADMIN)], tags=["admin"])


def registry_of(node) -> ModelRegistry:
    return node.models.registry if node.models is not None else ModelRegistry.for_settings(node.settings)


def _lineage(meta: dict) -> str:
    if meta.get("kind") == "ensemble":
        return "ensemble of " + ", ".join(meta.get("members", []))
    if "calibration" in meta:
        return f"calibrated from {meta.get('parent')}"
    if "finetune" in meta:
        return f"fine-tuned from {meta.get('parent')}"
    return ""


def _file_time(path) -> str:
    """When a registry entry was written, for entries whose record has no import time (the demo)."""
    import datetime as dt

    try:
        return dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).isoformat(timespec="seconds")
    except OSError:
        return ""


def rollback_target(registry: ModelRegistry) -> str | None:
    """The model active before the current one: the `previous` of the activation that made it active."""
    active = registry.active_ref()
    for record in reversed(registry.activations()):
        if record.get("ref") == active:
            previous = record.get("previous")
            return previous if previous and previous != active else None
    return None


def models_view(node) -> dict:
    registry = registry_of(node)
    active = registry.active_ref()
    entries = []
    for e in registry.entries():
        m = e.meta
        entries.append({
            "ref": e.ref, "name": e.name, "version": e.version, "active": e.ref == active,
            "kind": "ensemble" if e.is_ensemble else ("demo" if e.demo else "clinical"),
            "weights_sha256": m.get("sha256") or "", "source_sha256": m.get("source_sha256") or "",
            "imported_at": m.get("imported_at") or m.get("created_at") or _file_time(e.directory / "model.json"),
            "lineage": _lineage(m),
            "problem": m.get("problem", ""),
        })
    return {
        "active": active,
        "pinned": node.settings.inference.weights is not None,
        "entries": entries,
        "activations": list(reversed(registry.activations()))[:20],
        "rollback_to": rollback_target(registry),
    }


@router.get("/models")
def list_models(request: Request):
    return models_view(request.app.state.node)


class ActivationRequest(BaseModel):
    ref: str = Field(min_length=3, max_length=140)
    force: bool = False


class RollbackRequest(BaseModel):
    force: bool = False


def _activate(request: Request, ref: str, force: bool, how: str):
    node = request.app.state.node
    if node.settings.inference.weights is not None:
        raise HTTPException(409, "this node is pinned to inference.weights; activation would be ignored")
    registry = registry_of(node)
    previous = registry.active_ref()
    who = actor(request)
    try:
        entry = registry.activate(ref, force=force, user=f"{who.user_id} (web)")
    except ActivationRefused as exc:
        events.admin_action(node.audit, who, messages.SOFTWARE_CONFIGURATION, events.model_object(ref),
                            f"{how} refused by the activation guard", outcome=messages.MINOR_FAILURE)
        return JSONResponse({"detail": str(exc), "reasons": exc.reasons}, status_code=409)
    except RegistryError as exc:
        raise HTTPException(404 if "no model" in str(exc) else 422, str(exc)) from None
    record = registry.activations()[-1]
    what = f"{how} (was {previous or 'none'})"
    if record.get("forced"):
        what += "; the activation guard's objections were overridden"
    events.admin_action(node.audit, who, messages.SOFTWARE_CONFIGURATION, events.model_object(entry.ref), what)
    return {"active": entry.ref, "previous": previous, "forced": bool(record.get("forced")),
            "guard": record.get("guard", []), "demo": entry.demo}


@router.post("/models/activate")
def activate(request: Request, body: ActivationRequest):
    return _activate(request, body.ref, body.force, "activated from the web app")


@router.post("/models/rollback")
def rollback(request: Request, body: RollbackRequest):
    target = rollback_target(registry_of(request.app.state.node))
    if target is None:
        raise HTTPException(409, "nothing to roll back to: no earlier activation of another model")
    return _activate(request, target, body.force, "rolled back from the web app")


@router.get("/destinations/health")
async def destinations_health(request: Request):
    results = await run_in_threadpool(probes.probe_all, request.app.state.node.settings)
    return {"destinations": [asdict(r) for r in results]}
