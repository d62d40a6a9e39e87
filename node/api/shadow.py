"""`/api/v1/shadow`: how a shadow candidate compares with the active model.

ADMIN-ONLY (policy to assign at merge): these figures are for the AI
committee deciding on activation, not for clinical users. The routes only
read the `shadow_results` and `feedback` tables (node/shadow.py).

- `GET /api/v1/shadow[?model=NAME@VERSION]`: JSON, per pathology positive and
  negative agreement and Cohen's kappa against the active model, and, where
  radiologists left feedback, sensitivity and specificity of both models
  against it. Without `model`: the configured `inference.shadow`, else the
  shadow model with the most recent results.
- `GET /api/v1/shadow.csv[?model=...]`: the same table as CSV, for export.
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from node import shadow
from node.api.auth import require_token

router = APIRouter(prefix="/api/v1", dependencies=[Depends(require_token)])


def _view(request: Request, model: str | None) -> dict:
    node = request.app.state.node
    with node.db.session() as s:
        return shadow.summary(s, model or node.settings.inference.shadow)


@router.get("/shadow")
def shadow_json(request: Request, model: str | None = None) -> dict:  # admin-only (see module docstring)
    view = _view(request, model)
    view["configured_shadow"] = request.app.state.node.settings.inference.shadow
    return view


@router.get("/shadow.csv")
def shadow_csv(request: Request, model: str | None = None) -> Response:  # admin-only (see module docstring)
    view = _view(request, model)
    name = (view["shadow_model"] or "none").replace("@", "_")
    return Response(shadow.to_csv(view), media_type="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="shadow-{name}.csv"'})
