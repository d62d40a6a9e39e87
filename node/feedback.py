"""Radiologist feedback on AI findings: saving, listing, and the labelled set it makes.

A feedback row is one radiologist's verdict on one finding (label) of one
image of one study version: `agree`, `disagree` or `uncertain`, with an
optional comment. When it is saved the model's verdict on that finding (from
the study version's stored `ScoredStudy`) is kept with it, so its meaning is
fixed: what the radiologist agreed or disagreed *with*.

From feedback to a label (what `carina feedback export` writes and shadow
mode compares against), per image and pathology:

- `agree`: the truth is the model's verdict: 1 if the model said positive, else 0;
- `disagree`: the truth is the opposite: 0 if the model said positive, else 1
  (a false positive becomes 0, a missed finding becomes 1);
- `uncertain`: no label; the row is left out;
- several rows for one image and pathology (other radiologists, or the same
  image in a later study version): their labels are used when they all give
  the same label; if they conflict the pathology is left unlabelled for that
  image, like `uncertain`.
An image without any labelled pathology is not exported; a pathology without
feedback stays empty in its row ("not labelled", never 0).

Only a row's author may edit it (`update`); the reading app's API
(node/api/reading.py) builds on `save`, `update`, `list_for_study` and `labelled_set`.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from inference.types import CHESTXRAY14
from node import results
from node.db import Database, Feedback, Instance, Study, now
from node.states import FeedbackVerdict


class FeedbackError(ValueError):
    """The feedback cannot be saved: no such study version, image or label, or a bad verdict."""


class NotAuthor(PermissionError):
    """Only the author of a feedback row may change it."""


@dataclass(frozen=True)
class FeedbackView:
    id: int
    study_id: int
    study_version: int
    sop_instance_uid: str
    label: str
    verdict: str
    comment: str
    user: str
    model_ref: str
    model_positive: bool
    model_probability: float
    created_at: float
    updated_at: float

    @classmethod
    def of(cls, row: Feedback) -> "FeedbackView":
        return cls(**{name: getattr(row, name) for name in cls.__dataclass_fields__})

    @property
    def derived_label(self) -> int | None:
        return derived_label(self.model_positive, self.verdict)


def derived_label(model_positive: bool, verdict: str) -> int | None:
    """1/0 from the model's verdict and the radiologist's; None for `uncertain`."""
    verdict = FeedbackVerdict(verdict)
    if verdict == FeedbackVerdict.UNCERTAIN:
        return None
    agrees = verdict == FeedbackVerdict.AGREE
    return int(model_positive) if agrees else 1 - int(model_positive)


def save(session: Session, *, study_id: int, study_version: int, sop_instance_uid: str, label: str, verdict: str,
         user: str, comment: str = "") -> FeedbackView:
    """Create the author's feedback on a finding, or update the author's existing one."""
    try:
        verdict = FeedbackVerdict(verdict)
    except ValueError:
        raise FeedbackError(f"verdict must be one of {', '.join(v.value for v in FeedbackVerdict)}, not {verdict!r}") from None
    if label not in CHESTXRAY14:
        raise FeedbackError(f"unknown finding {label!r}")
    if not user:
        raise FeedbackError("feedback needs its author")
    try:
        scored = results.load(session, study_id, study_version)
    except LookupError:
        raise FeedbackError(f"study {study_id} has no scored version {study_version}") from None
    findings = scored.findings_by_image.get(sop_instance_uid)
    if findings is None:
        raise FeedbackError(f"image {sop_instance_uid} was not scored in study {study_id} v{study_version}")
    finding = next(f for f in findings if f.label == label)
    row = session.scalar(select(Feedback).where(
        Feedback.study_id == study_id, Feedback.study_version == study_version,
        Feedback.sop_instance_uid == sop_instance_uid, Feedback.label == label, Feedback.user == user))
    if row is None:
        row = Feedback(study_id=study_id, study_version=study_version, sop_instance_uid=sop_instance_uid, label=label,
                       user=user, model_ref=scored.model.ref, model_positive=bool(finding.positive),
                       model_probability=float(finding.probability), created_at=now())
        session.add(row)
    row.verdict, row.comment, row.updated_at = verdict, comment or "", now()
    session.flush()
    return FeedbackView.of(row)


def update(session: Session, feedback_id: int, *, user: str, verdict: str | None = None,
           comment: str | None = None) -> FeedbackView:
    row = session.get(Feedback, feedback_id)
    if row is None:
        raise FeedbackError(f"no feedback {feedback_id}")
    if row.user != user:
        raise NotAuthor(f"feedback {feedback_id} is {row.user}'s; only its author may change it")
    if verdict is not None:
        try:
            row.verdict = FeedbackVerdict(verdict)
        except ValueError:
            raise FeedbackError(f"verdict must be one of {', '.join(v.value for v in FeedbackVerdict)}") from None
    if comment is not None:
        row.comment = comment
    row.updated_at = now()
    session.flush()
    return FeedbackView.of(row)


def list_for_study(session: Session, study_id: int, study_version: int | None = None) -> list[FeedbackView]:
    stmt = select(Feedback).where(Feedback.study_id == study_id)
    if study_version is not None:
        stmt = stmt.where(Feedback.study_version == study_version)
    return [FeedbackView.of(r) for r in session.scalars(stmt.order_by(Feedback.id))]


def labels_by_image(session: Session) -> dict[tuple[int, str], dict[str, int]]:
    """(study id, SOP Instance UID) -> {label: 0/1}, by the rules in the module docstring."""
    votes: dict[tuple[int, str], dict[str, set[int]]] = {}
    for row in session.scalars(select(Feedback).order_by(Feedback.id)):
        value = derived_label(row.model_positive, row.verdict)
        if value is None:
            continue
        votes.setdefault((row.study_id, row.sop_instance_uid), {}).setdefault(row.label, set()).add(value)
    out = {}
    for key, by_label in votes.items():
        agreed = {label: next(iter(values)) for label, values in by_label.items() if len(values) == 1}
        if agreed:
            out[key] = agreed
    return out


def labelled_set(db: Database, *, instances_dir: Path) -> tuple[str, list[tuple[str, str]]]:
    """The feedback as a labelled set (node/governance/labels.py columns format),
    as CSV text, with the (patient ID, study UID) of every row for the audit trail.

    Columns: `image` (the stored instance, relative to `instances_dir` when
    under it), `study_instance_uid`, `sop_instance_uid` (ignored by the
    reader), then one column per ChestX-ray14 pathology: 1, 0, or empty when
    not labelled."""
    instances_dir = Path(instances_dir).resolve()
    rows, pairs = [], []
    with db.session() as s:
        labelled = labels_by_image(s)
        for (study_id, sop_uid), labels in sorted(labelled.items()):
            instance = s.scalar(select(Instance).where(Instance.study_id == study_id,
                                                       Instance.sop_instance_uid == sop_uid))
            study = s.get(Study, study_id)
            if instance is None or study is None:
                continue
            path = Path(instance.path).resolve()
            image = os.path.relpath(path, instances_dir) if path.is_relative_to(instances_dir) else str(path)
            rows.append([image, study.study_uid, sop_uid] + [str(labels[l]) if l in labels else "" for l in CHESTXRAY14])
            pairs.append((study.patient_id, study.study_uid))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "study_instance_uid", "sop_instance_uid", *CHESTXRAY14])
    writer.writerows(rows)
    return buffer.getvalue(), pairs


def export_labelled_set(db: Database, out: Path, *, instances_dir: Path) -> int:
    """Write `labelled_set` to `out`; returns the number of rows."""
    text, pairs = labelled_set(db, instances_dir=instances_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return len(pairs)
