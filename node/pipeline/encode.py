"""Stage 2: turn a study's findings into DICOM objects (SR + heatmap SCs) and
FHIR resources. UIDs and ids are deterministic, so running this again after a
crash rewrites the same objects rather than creating new ones."""
from __future__ import annotations

import datetime as dt
import io
import json
import logging
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select

from dicom_scp.durable import write_durably
from dicom_scp.scp import safe_path_component
from inference import decode_dicom, result_from_json
from node import triage as ai_triage
from node.context import NodeContext
from node.db import Instance, Job, Output, Result, Study
from node.fhir_store import save_resources
from node.jobs import enqueue, settle_in
from node.outputs.fhir_report import build_report_resources
from node.outputs.sc import build_heatmap_captures
from node.outputs.sr import build_sr
from node.outputs.study_facts import StudyFacts

log = logging.getLogger(__name__)


def run(ctx: NodeContext, job: Job) -> None:
    with ctx.db.session() as s:
        study = s.get(Study, job.study_id)
        if study.version != job.study_version:
            return
        result = s.scalar(select(Result).where(Result.study_id == study.id, Result.version == study.version))
        payload = json.loads(result.findings_json)
        paths = dict(
            s.execute(
                select(Instance.sop_instance_uid, Instance.path).where(
                    Instance.study_id == study.id, Instance.sop_instance_uid.in_(list(payload))
                )
            ).all()
        )
        previous_sr_paths = s.scalars(
            select(Output.path)
            .where(Output.study_id == study.id, Output.kind == "sr", Output.version < study.version)
            .order_by(Output.version.desc())
            .limit(1)
        ).all()
        calling_ae, study_key, version = study.calling_ae, (study.calling_ae, study.study_uid), study.version
        earlier_triage = ai_triage.previous(s, study.id)

    sources: list[tuple[Dataset, object]] = []
    for sop_uid, item in payload.items():
        ds = dcmread(paths[sop_uid])
        sources.append((ds, result_from_json(item, decode_dicom(ds))))
    model = sources[0][1].model
    predecessors = [dcmread(p, stop_before_pixels=True) for p in previous_sr_paths if Path(p).exists()]

    objects: list[tuple[str, Dataset]] = [("sr", build_sr(sources, model, version, predecessors=predecessors or None))]
    for index, (ds, image_result) in enumerate(sources):
        # All SCs of a study share one series; keep their Instance Numbers apart.
        captures = build_heatmap_captures(ds, image_result, model, first_instance_number=1 + 20 * index)
        objects.extend(("sc", sc) for sc in captures)

    out_dir = ctx.outputs_dir / safe_path_component(study_key[0]) / safe_path_component(study_key[1])
    written = []
    for kind, obj in objects:
        path = out_dir / f"{kind}-{obj.SOPInstanceUID}.dcm"
        buffer = io.BytesIO()
        obj.save_as(buffer, enforce_file_format=True)
        write_durably(buffer.getvalue(), path)
        written.append((kind, obj, path))

    facts = StudyFacts.from_datasets([ds for ds, _ in sources])
    # Critical findings raise priority; an earlier STAT is never lowered.
    triage = ai_triage.never_lower(
        earlier_triage, ai_triage.assess(ctx.settings.triage, [f for _, r in sources for f in r.findings])
    )
    resources = build_report_resources(
        facts,
        {ds.SOPInstanceUID: list(r.findings) for ds, r in sources},
        model,
        study_version=version,
        status="preliminary" if version == 1 else "amended",
        issued=dt.datetime.now(dt.timezone.utc),
        patient_system=ctx.settings.api.patient_identifier_system,
        calling_ae=calling_ae,
        triage=triage,
    )

    with ctx.db.session() as s:
        settle_in(s, job)  # outputs, FHIR versions and job completion commit together
        study = s.get(Study, job.study_id)
        if study.version != job.study_version:
            return
        for kind, obj, path in written:
            row = s.scalar(select(Output).where(Output.study_id == study.id, Output.sop_instance_uid == obj.SOPInstanceUID))
            if row is None:
                row = Output(study_id=study.id, sop_instance_uid=str(obj.SOPInstanceUID))
                s.add(row)
            row.version, row.kind, row.path = version, kind, str(path)
            row.sop_class_uid, row.series_uid = str(obj.SOPClassUID), str(obj.SeriesInstanceUID)
        save_resources(s, resources, study.id)
        ai_triage.record(s, study.id, version, triage)
        study.state = "done"
        study.reason = ""
        for destination in ctx.settings.destinations:
            enqueue(s, study.id, "deliver", version, destination=destination.name)
    log.info("study %s encoded: %d DICOM objects, %d FHIR resources", study_key[1], len(written), len(resources))
