"""Stage 1: route, decode and score every candidate instance of a study version.

InferWork (the candidate instances) -> Inferred (each instance's verdict and,
when anything was scored, the `ScoredStudy`). Each source is read and decoded
here once per study version: the study facts come from the same headers, and
the display rendition the heatmap SCs are drawn on is kept beside the outputs
(node/storage.py `display_path`), so no later stage decodes pixels again.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from inference import DecodeError, DecodedImage, decode_dicom
from inference.dicom_file import dcmread_bounded
from inference.types import ImageResult
from node import results, shadow, triage
from node.context import NodeContext
from node.db import UID_SALT, Instance, Job, Study, get_meta
from node.events import EventKind, record_event
from node.jobs import enqueue
from node.outputs.sc import display_rendition
from node.pipeline import conclude
from node.report import ReportStatus, Triage, assess_triage, never_lower, strongest_findings
from node.routing import exclusion
from node.scored_study import ScoredImage, ScoredStudy
from node.states import SCOREABLE_INSTANCE_STATES, InstanceState, Stage, StudyState
from node.storage import display_path
from node.study_facts import StudyFacts, patient_disagreement

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    instance_id: int
    sop_uid: str
    path: Path
    revision: int = 1  # which content of the instance (node/receiver.py)


@dataclass(frozen=True)
class InferWork:
    study_id: int
    calling_ae: str
    study_uid: str
    version: int
    candidates: tuple[Candidate, ...]
    earlier_triage: Triage | None  # a priority is never lowered
    uid_salt: str = ""  # set on a restored node (node/backup.py)


@dataclass(frozen=True)
class Assessment:
    """One instance's fate before the model: an image to score, or why not."""

    candidate: Candidate
    state: InstanceState
    reason: str = ""
    header: Dataset | None = None  # pixels deferred: read only by the decode (also kept when ignored)
    image: DecodedImage | None = None


@dataclass(frozen=True)
class Inferred:
    assessments: tuple[Assessment, ...]
    scored: ScoredStudy | None  # None: nothing could be scored
    refusal: str = ""  # why the study as a whole is not scored (its images disagree on the patient)
    # Shadow mode (node/shadow.py): the candidate's answers, stored beside, never published.
    shadow: shadow.ShadowScores | None = None


def load(ctx: NodeContext, session: Session, study: Study, job: Job) -> InferWork:
    rows = session.execute(
        select(Instance.id, Instance.sop_instance_uid, Instance.path, Instance.revision)
        .where(Instance.study_id == study.id, Instance.state.in_(SCOREABLE_INSTANCE_STATES))
        .order_by(Instance.id)
    ).all()
    return InferWork(
        study_id=study.id,
        calling_ae=study.calling_ae,
        study_uid=study.study_uid,
        version=study.version,
        candidates=tuple(Candidate(i, sop, Path(path), revision or 1) for i, sop, path, revision in rows),
        earlier_triage=triage.previous(session, study.id),
        uid_salt=get_meta(session, UID_SALT),
    )


def assess(ctx: NodeContext, candidate: Candidate) -> Assessment:
    """Never raises: hostile files end as FAILED with a reason."""
    try:
        # defer_size: a 1 GB PixelData is not read until decode has checked
        # the header's dimensions against the pixel budget. A Deflated source
        # is inflated in chunks up to the SCP's cap (refused beyond it).
        ds = dcmread_bounded(candidate.path, defer_size="2 MB",
                             max_inflated_bytes=ctx.settings.dicom.max_inflated_bytes)
        rule = exclusion(ds, ctx.settings.routing)
        if rule:
            return Assessment(candidate, InstanceState.IGNORED, rule, header=ds)
        return Assessment(candidate, InstanceState.SCORED, header=ds, image=decode_dicom(ds))
    except DecodeError as exc:
        reason = f"failed: {exc}"
    except Exception as exc:  # truncated, corrupt, not DICOM at all
        reason = f"failed: unreadable DICOM ({type(exc).__name__}: {exc})"[:500]
    log.warning("instance %s not scoreable: %s", candidate.sop_uid, reason)
    return Assessment(candidate, InstanceState.FAILED, reason)


def run(ctx: NodeContext, work: InferWork) -> Inferred:
    assessed = tuple(assess(ctx, candidate) for candidate in work.candidates)
    # Images of two patients under one StudyInstanceUID (a misfiled study):
    # one report would state one patient's findings about another. Refuse
    # the study as a whole, before spending the model on it.
    refusal = patient_disagreement([a.header for a in assessed if a.header is not None])
    if refusal:
        return Inferred(assessed, None, refusal=refusal)
    scoreable = [a for a in assessed if a.image is not None]
    if not scoreable:
        return Inferred(assessed, None)
    # No lock: ctx.engine is the batching worker, which merges this study's
    # images with other workers' and API calls' into shared batches, and
    # returns all of one call's results from the same model.
    images = [a.image for a in scoreable]
    if getattr(ctx.engine, "shadow_model_info", None) is not None:  # shadow mode: one batcher, both models
        predictions, shadowed = ctx.engine.predict_with_shadow(images)
    else:
        predictions, shadowed = ctx.engine.predict(images), None
    scored = scored_study(ctx, work, [a.header for a in scoreable], predictions)
    for a in scoreable:
        keep_display(ctx, work, a.candidate.sop_uid, a.image)
    candidate = None if shadowed is None else shadow.ShadowScores.of(
        [a.candidate.sop_uid for a in scoreable], predictions, shadowed)
    return Inferred(assessed, scored, shadow=candidate)


def scored_study(ctx: NodeContext, work: InferWork, headers: list[Dataset], predictions: list[ImageResult]) -> ScoredStudy:
    """The one typed value every later consumer reads."""
    models = {p.model for p in predictions}
    if len(models) != 1:
        raise RuntimeError(f"one study scored by {len(models)} models")  # the batcher guarantees one
    revisions = {c.sop_uid: c.revision for c in work.candidates}
    images = tuple(
        ScoredImage(str(h.SOPInstanceUID), p.findings, p.heatmaps, revisions.get(str(h.SOPInstanceUID), 1))
        for h, p in zip(headers, predictions)
    )
    strongest = strongest_findings({image.sop_instance_uid: image.findings for image in images})
    return ScoredStudy(
        calling_ae=work.calling_ae,
        facts=StudyFacts.from_datasets(headers),
        images=images,
        model=models.pop(),
        # Critical findings raise priority; an earlier STAT is never lowered.
        triage=never_lower(work.earlier_triage, assess_triage(ctx.settings.triage, strongest)),
        version=work.version,
        status=ReportStatus.for_version(work.version),
        issued=ctx.clock(),
        uid_salt=work.uid_salt,
    )


def keep_display(ctx: NodeContext, work: InferWork, sop_uid: str, image: DecodedImage) -> None:
    """Keep the image's display rendition (a PNG, written in the background) for
    the heatmap SCs of this study version and the reading app (node/renditions.py)."""
    ctx.renditions.keep(display_path(ctx.work_dir, work.calling_ae, work.study_uid, work.version, sop_uid),
                        display_rendition(image))


def settle(ctx: NodeContext, session: Session, study: Study, inferred: Inferred) -> None:
    if inferred.refusal:
        # Nothing was scored: the images stay STORED (a corrected re-send is
        # assessed again), the study fails with the reason an admin sees.
        conclude(study, StudyState.FAILED, inferred.refusal)
        record_event(session, EventKind.MIXED_PATIENT, study=study, detail=f"version {study.version}: {inferred.refusal}")
        return
    for a in inferred.assessments:
        instance = session.get(Instance, a.candidate.instance_id)
        instance.state, instance.reason = a.state, a.reason
    scored = inferred.scored
    if scored is None:
        failed = any(a.state == InstanceState.FAILED for a in inferred.assessments)
        reason = "; ".join(sorted({a.reason for a in inferred.assessments})) or "nothing to score"
        conclude(study, StudyState.FAILED if failed else StudyState.IGNORED, reason)
        log.info("study %s %s: %s", study.study_uid, study.state, study.reason)
        return
    results.store(session, study.id, scored)
    if inferred.shadow is not None:
        shadow.store(session, study.id, scored.version, inferred.shadow)
    triage.record(session, study.id, scored.version, scored.triage)
    enqueue(session, study.id, Stage.ENCODE, scored.version)
