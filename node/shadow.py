"""Shadow mode: a candidate scored beside the active model, stored, never published.

With `inference.shadow: NAME@VERSION` the node's batcher scores every routed
study's images with the candidate too, in the same batches and on the same
prepared inputs (inference/batcher.py `predict_with_shadow`). The infer stage
hands the candidate's answers to `store`, in the same transaction as the
active model's result, into their own table (`shadow_results`, keyed by
study version, image and shadow model). Nothing reads that table but this
module: the encode, capture and deliver stages never see it, so no SR, SC, FHIR
resource or HL7 message ever carries a shadow result.

`summary` compares the two per pathology over each study's latest scored
version: positive and negative agreement and Cohen's kappa of the verdicts
(probability >= each model's own operating point), and, on the images where
radiologists left feedback (node/feedback.py), the sensitivity and
specificity of both models against the labels that feedback gives.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass

import numpy as np
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from inference.types import CHESTXRAY14, ImageResult, ModelInfo
from node.db import ShadowResult
from node.feedback import labels_by_image
from node.governance import metrics


@dataclass(frozen=True)
class ShadowImage:
    sop_instance_uid: str
    active_probabilities: tuple[float, ...]  # 14, CHESTXRAY14 order
    active_thresholds: tuple[float, ...]
    shadow_probabilities: tuple[float, ...]
    shadow_thresholds: tuple[float, ...]


@dataclass(frozen=True)
class ShadowScores:
    """The shadow model's answers for one study version, with the active model's beside them."""

    active: ModelInfo
    shadow: ModelInfo
    images: tuple[ShadowImage, ...]

    @classmethod
    def of(cls, sop_uids: list[str], active: list[ImageResult], shadow: list[ImageResult]) -> "ShadowScores":
        if not (len(sop_uids) == len(active) == len(shadow)) or not active:
            raise ValueError("shadow scores need one active and one shadow result per image")
        images = tuple(
            ShadowImage(uid, tuple(f.probability for f in a.findings), tuple(f.threshold for f in a.findings),
                        tuple(f.probability for f in s.findings), tuple(f.threshold for f in s.findings))
            for uid, a, s in zip(sop_uids, active, shadow)
        )
        return cls(active[0].model, shadow[0].model, images)


def store(session: Session, study_id: int, study_version: int, scores: ShadowScores) -> None:
    """Replace this study version's rows for the shadow model (a re-run writes the same rows)."""
    session.execute(delete(ShadowResult).where(ShadowResult.study_id == study_id,
                                               ShadowResult.study_version == study_version,
                                               ShadowResult.shadow_model == scores.shadow.ref))
    for image in scores.images:
        session.add(ShadowResult(
            study_id=study_id, study_version=study_version, sop_instance_uid=image.sop_instance_uid,
            active_model=scores.active.ref, shadow_model=scores.shadow.ref,
            active_probabilities=json.dumps(image.active_probabilities), active_thresholds=json.dumps(image.active_thresholds),
            shadow_probabilities=json.dumps(image.shadow_probabilities), shadow_thresholds=json.dumps(image.shadow_thresholds),
        ))


def shadow_models(session: Session) -> list[str]:
    """Shadow models with stored results, most recent first."""
    rows = session.execute(select(ShadowResult.shadow_model, func.max(ShadowResult.id))
                           .group_by(ShadowResult.shadow_model)).all()
    return [ref for ref, _ in sorted(rows, key=lambda r: -r[1])]


def _latest_rows(session: Session, shadow_model: str) -> list[ShadowResult]:
    rows = session.scalars(select(ShadowResult).where(ShadowResult.shadow_model == shadow_model)
                           .order_by(ShadowResult.id)).all()
    latest: dict[int, int] = {}
    for row in rows:
        latest[row.study_id] = max(latest.get(row.study_id, 0), row.study_version)
    return [row for row in rows if row.study_version == latest[row.study_id]]


def _proportion(hits: int, total: int) -> dict:
    return {"value": None if total == 0 else hits / total, "ci": metrics.wilson(hits, total), "n": total}


def summary(session: Session, shadow_model: str | None = None) -> dict:
    """Per pathology agreement (and, with feedback, sensitivity/specificity) of the shadow
    model against the active one; see the module docstring."""
    if shadow_model is None:
        known = shadow_models(session)
        shadow_model = known[0] if known else None
    if shadow_model is None:
        return {"shadow_model": None, "images": 0, "studies": 0, "active_models": {}, "pathologies": {}}
    rows = _latest_rows(session, shadow_model)
    active_p = np.array([json.loads(r.active_probabilities) for r in rows], dtype=np.float64).reshape(-1, 14)
    active_t = np.array([json.loads(r.active_thresholds) for r in rows], dtype=np.float64).reshape(-1, 14)
    shadow_p = np.array([json.loads(r.shadow_probabilities) for r in rows], dtype=np.float64).reshape(-1, 14)
    shadow_t = np.array([json.loads(r.shadow_thresholds) for r in rows], dtype=np.float64).reshape(-1, 14)
    active_pos, shadow_pos = active_p >= active_t, shadow_p >= shadow_t
    truth = labels_by_image(session)
    pathologies = {}
    for i, label in enumerate(CHESTXRAY14):
        row = {"agreement": metrics.agreement(active_pos[:, i], shadow_pos[:, i]) if len(rows) else metrics.agreement([], [])}
        labelled = [(j, truth[(r.study_id, r.sop_instance_uid)][label]) for j, r in enumerate(rows)
                    if label in truth.get((r.study_id, r.sop_instance_uid), {})]
        feedback = {"images": len(labelled)}
        if labelled:
            idx = np.array([j for j, _ in labelled])
            y = np.array([v for _, v in labelled], dtype=bool)
            for who, verdicts in (("active", active_pos[idx, i]), ("shadow", shadow_pos[idx, i])):
                feedback[who] = {
                    "sensitivity": _proportion(int((verdicts & y).sum()), int(y.sum())),
                    "specificity": _proportion(int((~verdicts & ~y).sum()), int((~y).sum())),
                }
        row["feedback"] = feedback
        pathologies[label] = row
    actives: dict[str, int] = {}
    for r in rows:
        actives[r.active_model] = actives.get(r.active_model, 0) + 1
    return {
        "shadow_model": shadow_model,
        "images": len(rows),
        "studies": len({r.study_id for r in rows}),
        "active_models": actives,
        "verdict_rule": "positive: probability >= the model's own operating point",
        "feedback_rule": "agree: the model's verdict; disagree: its opposite; uncertain or conflicting: left out",
        "pathologies": pathologies,
    }


CSV_COLUMNS = (
    "pathology", "images", "both_positive", "both_negative", "only_active_positive", "only_candidate_positive",
    "positive_agreement", "negative_agreement", "kappa", "feedback_images",
    "active_sensitivity", "active_specificity", "shadow_sensitivity", "shadow_specificity",
)


def to_csv(view: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["# shadow model", view["shadow_model"] or "", "active models",
                     "; ".join(f"{k} ({v})" for k, v in view["active_models"].items())])
    writer.writerow(CSV_COLUMNS)

    def cell(value):
        return "" if value is None else (f"{value:.6f}" if isinstance(value, float) else value)

    for label, row in view["pathologies"].items():
        a, fb = row["agreement"], row["feedback"]

        def fb_value(who, what):
            return fb.get(who, {}).get(what, {}).get("value")

        writer.writerow([cell(v) for v in (
            label, a["n"], a["both_positive"], a["both_negative"], a["only_active_positive"], a["only_candidate_positive"],
            a["positive_agreement"], a["negative_agreement"], a["kappa"], fb["images"],
            fb_value("active", "sensitivity"), fb_value("active", "specificity"),
            fb_value("shadow", "sensitivity"), fb_value("shadow", "specificity"),
        )])
    return buffer.getvalue()
