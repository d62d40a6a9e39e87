"""Stage 1: decode every scoreable instance of a study and run the model."""
from __future__ import annotations

import json
import logging

from pydicom import dcmread
from sqlalchemy import select

from inference import DecodeError, decode_dicom, result_to_json
from node.context import NodeContext
from node.db import Instance, Job, Result, Study
from node.jobs import enqueue

log = logging.getLogger(__name__)

SCOREABLE = ("stored", "scored")


def run(ctx: NodeContext, job: Job) -> None:
    with ctx.db.session() as s:
        study = s.get(Study, job.study_id)
        if study.version != job.study_version:
            log.info("infer job %d superseded by study version %d", job.id, study.version)
            return
        instances = s.scalars(
            select(Instance).where(Instance.study_id == study.id, Instance.state.in_(SCOREABLE)).order_by(Instance.id)
        ).all()
        todo = [(i.id, i.sop_instance_uid, i.path) for i in instances]

    decoded, failures = [], {}
    for instance_id, sop_uid, path in todo:
        try:
            decoded.append((instance_id, sop_uid, decode_dicom(dcmread(path))))
        except DecodeError as exc:
            failures[instance_id] = f"failed: {exc}"
        except Exception as exc:  # truncated or corrupt file: the study goes on without it
            failures[instance_id] = f"failed: unreadable DICOM ({type(exc).__name__}: {exc})"[:500]
        if instance_id in failures:
            log.warning("instance %s not scoreable: %s", sop_uid, failures[instance_id])

    results = []
    if decoded:
        with ctx.engine_lock:
            results = ctx.engine.predict([image for _, _, image in decoded])

    with ctx.db.session() as s:
        study = s.get(Study, job.study_id)
        if study.version != job.study_version:
            return
        for instance_id, reason in failures.items():
            instance = s.get(Instance, instance_id)
            instance.state, instance.reason = "failed", reason
        if not results:
            study.state = "failed"
            study.reason = "; ".join(sorted(set(failures.values())))[:2000] or "nothing to score"
            log.warning("study %s failed: %s", study.study_uid, study.reason)
            return
        for instance_id, _, _ in decoded:
            s.get(Instance, instance_id).state = "scored"
        payload = {sop_uid: result_to_json(r) for (_, sop_uid, _), r in zip(decoded, results)}
        model = results[0].model
        row = s.scalar(select(Result).where(Result.study_id == study.id, Result.version == study.version))
        if row is None:
            row = Result(study_id=study.id, version=study.version)
            s.add(row)
        row.model_name, row.model_version, row.demo = model.name, model.version, model.demo
        row.findings_json = json.dumps(payload)
        enqueue(s, study.id, "encode", study.version)
