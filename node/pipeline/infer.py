"""Stage 1: route, decode and score every candidate instance of a study."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from pydicom import dcmread
from sqlalchemy import select

from inference import DecodeError, DecodedImage, decode_dicom, result_to_json
from node.context import NodeContext
from node.db import Instance, Job, Result, Study
from node.jobs import enqueue, settle_in
from node.routing import exclusion

log = logging.getLogger(__name__)

CANDIDATES = ("stored", "scored")


@dataclass
class Assessment:
    """One instance's fate before the model: an image to score, or why not."""

    instance_id: int
    sop_uid: str
    image: DecodedImage | None = None
    state: str = "scored"  # scored | ignored | failed
    reason: str = ""


def assess(ctx: NodeContext, instance_id: int, sop_uid: str, path: str) -> Assessment:
    """Never raises: hostile files end as 'failed' with a reason."""
    out = Assessment(instance_id, sop_uid)
    try:
        # defer_size: a 1 GB PixelData is not read until decode has checked
        # the header's dimensions against the pixel budget.
        ds = dcmread(path, defer_size="2 MB")
        rule = exclusion(ds, ctx.settings.routing)
        if rule:
            out.state, out.reason = "ignored", rule
            return out
        out.image = decode_dicom(ds)
    except DecodeError as exc:
        out.state, out.reason = "failed", f"failed: {exc}"
    except Exception as exc:  # truncated, corrupt, not DICOM at all
        out.state, out.reason = "failed", f"failed: unreadable DICOM ({type(exc).__name__}: {exc})"[:500]
    if out.state == "failed":
        log.warning("instance %s not scoreable: %s", sop_uid, out.reason)
    return out


def run(ctx: NodeContext, job: Job) -> None:
    with ctx.db.session() as s:
        study = s.get(Study, job.study_id)
        if study.version != job.study_version:
            log.info("infer job %d superseded by study version %d", job.id, study.version)
            return
        todo = s.execute(
            select(Instance.id, Instance.sop_instance_uid, Instance.path)
            .where(Instance.study_id == study.id, Instance.state.in_(CANDIDATES))
            .order_by(Instance.id)
        ).all()

    assessed = [assess(ctx, *row) for row in todo]
    scoreable = [a for a in assessed if a.image is not None]
    results = []
    if scoreable:
        # No lock: ctx.engine is the batching worker, which merges this study's
        # images with other workers' and API calls' into shared batches, and
        # returns all of one call's results from the same model.
        results = ctx.engine.predict([a.image for a in scoreable])

    with ctx.db.session() as s:
        settle_in(s, job)  # results and job completion commit together
        study = s.get(Study, job.study_id)
        if study.version != job.study_version:
            return
        for a in assessed:
            instance = s.get(Instance, a.instance_id)
            instance.state, instance.reason = a.state, a.reason
        if not results:
            failed = any(a.state == "failed" for a in assessed)
            study.state = "failed" if failed else "ignored"
            study.reason = "; ".join(sorted({a.reason for a in assessed}))[:2000] or "nothing to score"
            log.info("study %s %s: %s", study.study_uid, study.state, study.reason)
            return
        payload = {a.sop_uid: result_to_json(r) for a, r in zip(scoreable, results)}
        model = results[0].model
        row = s.scalar(select(Result).where(Result.study_id == study.id, Result.version == study.version))
        if row is None:
            row = Result(study_id=study.id, version=study.version)
            s.add(row)
        row.model_name, row.model_version, row.demo = model.name, model.version, model.demo
        row.findings_json = json.dumps(payload)
        enqueue(s, study.id, "encode", study.version)
