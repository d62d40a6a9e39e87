"""`/api/v1/shadow`: how a shadow candidate compares with the active model.

Admin only: these figures are for the AI committee deciding on activation,
not for clinical users. The routes only read the `shadow_results` and
`feedback` tables (node/shadow.py) and return per-pathology aggregates, no
patient data.

- `GET /api/v1/shadow[?model=NAME@VERSION]`: JSON, per pathology positive and
  negative agreement and Cohen's kappa against the active model, and, where
  radiologists left feedback, sensitivity and specificity of both models
  against it. Without `model`: the configured `inference.shadow`, else the
  shadow model with the most recent results.
- `GET /api/v1/shadow.csv[?model=...]`: the same table as CSV, for export.
"""
from __future__ import annotations

import re

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from node import shadow
from node.api.policy import Permission, require

router = APIRouter(prefix="/api/v1", dependencies=[require(Permission.ADMIN)])
# NAME@VERSION as the registry names models (node/models.py); anything else is a 422.
MODEL_REF = Query(None, max_length=140, pattern=r"^[A-Za-z0-9._+-]+@[A-Za-z0-9._+-]+$")


def _view(request: Request, model: str | None) -> dict:
    node = request.app.state.node
    with node.db.session() as s:
        return shadow.summary(s, model or node.settings.inference.shadow)


@router.get("/shadow")
def shadow_json(request: Request, model: str | None = MODEL_REF) -> dict:
    view = _view(request, model)
    view["configured_shadow"] = request.app.state.node.settings.inference.shadow
    return view


@router.get("/shadow.csv")
def shadow_csv(request: Request, model: str | None = MODEL_REF) -> Response:
    view = _view(request, model)
    # The name comes from the query: only registry-safe characters go into the header
    # (anything else, e.g. a character outside Latin-1, cannot be sent and was a 500).
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", view["shadow_model"] or "none")[:140]
    return Response(shadow.to_csv(view), media_type="text/csv",
                    headers={"Content-Disposition": f'attachment; filename="shadow-{name}.csv"'})
