"""What the study viewer shows, assembled from the database in one read.

Everything comes from the stored `ScoredStudy` of the chosen version (node/results.py):
images with their 14 findings (probability, operating point, verdict,
severity, region outlines), the model (and whether it runs on demo weights),
the triage priority; plus the other versions of the study (amended results)
for the side-by-side table, the outputs that can be downloaded, the delivery
state and the radiologists' feedback on this version (node/feedback.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from inference.types import CHESTXRAY14, Finding
from node import feedback, results
from node.db import Job, Output, Result, Study, StudyTriage
from node.jobs import delivery_per_destination
from node.scored_study import ScoredStudy
from node.states import DELIVERY_STAGES
from node.worklist import display_date, person_name


def label_text(label: str) -> str:
    return label.replace("_", " ")


def finding_view(finding: Finding) -> dict:
    """A finding as the viewer's script and templates use it; outlines in source pixel coordinates."""
    return {
        "label": finding.label,
        "name": label_text(finding.label),
        "probability": round(float(finding.probability), 4),
        "threshold": round(float(finding.threshold), 4),
        "positive": bool(finding.positive),
        "severity": finding.severity or "",
        "regions": [[[round(float(x), 1), round(float(y), 1)] for x, y in region.polygon.tolist()]
                    for region in finding.regions],
    }


@dataclass
class StudyReading:
    study_id: int
    study_uid: str
    calling_ae: str
    patient_name: str
    patient_id: str
    accession_number: str
    study_date: str
    state: str
    reason: str
    priority: str
    triage_reason: str
    versions: list[int]  # versions that were scored, oldest first
    version: int | None  # the version shown; None when nothing was scored
    scored: ScoredStudy | None
    outputs: list[dict] = field(default_factory=list)
    deliveries: list[dict] = field(default_factory=list)
    priors: dict = field(default_factory=dict)  # {"versions": [...], "rows": [...]}; empty with one version
    feedback_mine: dict = field(default_factory=dict)  # (sop, label) -> FeedbackView
    feedback_others: dict = field(default_factory=dict)  # (sop, label) -> [FeedbackView]

    @property
    def patient_display(self) -> str:
        return person_name(self.patient_name) or "(no name)"

    @property
    def study_date_display(self) -> str:
        return display_date(self.study_date) or "—"

    @property
    def is_latest(self) -> bool:
        return self.version is not None and self.version == self.versions[-1]

    def images(self) -> list[dict]:
        if self.scored is None:
            return []
        out = []
        for n, image in enumerate(self.scored.images, start=1):
            source = self.scored.source(image.sop_instance_uid)
            described = " · ".join(p for p in (source.modality, source.view_position, source.series_description) if p)
            out.append({
                "n": n,
                "sop_instance_uid": image.sop_instance_uid,
                "title": f"Image {n}" + (f" ({described})" if described else ""),
                "source_shape": list(image.heatmaps.source_shape),
                "findings": [finding_view(f) for f in image.findings],
            })
        return out


def _priors(scored_by_version: dict[int, ScoredStudy]) -> dict:
    """Study-level probability and verdict per label in each version, oldest first."""
    versions = sorted(scored_by_version)
    rows = []
    for label in CHESTXRAY14:
        cells = []
        for v in versions:
            _, finding = scored_by_version[v].strongest[label]
            cells.append({"probability": round(float(finding.probability), 4), "positive": bool(finding.positive)})
        changed = len({c["positive"] for c in cells}) > 1
        rows.append({"label": label, "name": label_text(label), "cells": cells, "changed": changed})
    return {"versions": versions, "rows": rows}


def load(session: Session, study_id: int, version: int | None, user: str) -> StudyReading:
    """The viewer's data for one study; LookupError when there is no such study or version."""
    study = session.get(Study, study_id)
    if study is None:
        raise LookupError(f"no study {study_id}")
    versions = sorted(session.scalars(select(Result.version).where(Result.study_id == study_id)))
    if version is not None and version not in versions:
        raise LookupError(f"study {study_id} has no scored version {version}")
    shown = version if version is not None else (versions[-1] if versions else None)
    scored_by_version = {v: results.load(session, study_id, v) for v in versions}
    scored = scored_by_version.get(shown) if shown is not None else None
    triage = session.get(StudyTriage, study_id)
    reading = StudyReading(
        study_id=study.id, study_uid=study.study_uid, calling_ae=study.calling_ae,
        patient_name=study.patient_name or (scored.facts.patient_name if scored else ""),
        patient_id=study.patient_id, accession_number=study.accession_number,
        study_date=study.study_date or (scored.facts.study_date if scored else ""),
        state=study.state, reason=study.reason, priority=triage.priority if triage else "",
        triage_reason=triage.reason if triage else "", versions=versions, version=shown, scored=scored,
    )
    if shown is None:
        return reading
    if len(versions) > 1:
        reading.priors = _priors(scored_by_version)
    outputs = session.scalars(select(Output).where(Output.study_id == study_id, Output.version == shown)
                              .order_by(Output.kind, Output.id)).all()
    reading.outputs = [{"id": o.id, "kind": o.kind, "sop_instance_uid": o.sop_instance_uid} for o in outputs]
    newest = delivery_per_destination(
        session.scalars(select(Job).where(Job.study_id == study_id, Job.stage.in_(DELIVERY_STAGES))))
    reading.deliveries = [{"destination": d, "state": j.state, "attempts": j.attempts, "version": j.study_version,
                           "last_error": j.last_error or ""} for d, j in newest.items()]
    for view in feedback.list_for_study(session, study_id, shown):
        key = (view.sop_instance_uid, view.label)
        if view.user == user:
            reading.feedback_mine[key] = view
        else:
            reading.feedback_others.setdefault(key, []).append(view)
    return reading
