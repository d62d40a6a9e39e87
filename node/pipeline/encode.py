"""Stage 2: render a scored study as its report: the DICOM objects that
carry the findings and the FHIR resources.

The DICOM objects are the kinds `outputs.kinds` names, except the heatmap
SCs: the TID 1500 SR (always), a SEG and a GSPS per image with a drawn
finding, and the printable report as an Encapsulated PDF. The PDF itself is
also kept as a file (`report-v<N>.pdf`) for the API download and FHIR's
presentedForm whenever one of its uses is on (`outputs.report_pdf`). The SCs
are drawn by the next stage, capture (node/pipeline/capture.py), while this
stage's deliveries already run: drawing them costs more than the whole report,
and the PACS, the EHR and the radiologist's triage need the report first.

EncodeWork (the ScoredStudy and the files it refers to) -> Encoded (the
objects written durably, the FHIR resources). UIDs, ids and creation times
are deterministic, so running this again after a crash rewrites the same
bytes rather than creating new objects.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from node import results
from node.context import NodeContext
from node.db import Job, Output, Study
from node.fhir_store import save_resources
from node.jobs import enqueue
from node.outputs.encapsulated_pdf import build_encapsulated_pdf
from node.outputs.fhir_report import build_report_resources, pdf_attachment
from node.outputs.gsps import build_presentation_state
from node.outputs.pdf_report import Predecessor, predecessor_of, render_report_pdf
from node.outputs.seg import build_segmentation
from node.outputs.sr import build_sr
from node.pipeline import conclude
from node.pipeline.objects import DisplayPixels, EncodedObject, SourceFiles, enqueue_deliveries, record_outputs, write_objects
from node.scored_study import ScoredStudy
from node.states import OutputKind, Stage, StudyState
from node.storage import report_pdf_path, write_durably

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodeWork:
    scored: ScoredStudy
    files: SourceFiles
    predecessor_srs: tuple[Path, ...]  # the SR of the previous version, if any
    predecessor: Predecessor | None = None  # the report version this one amends, if any


@dataclass(frozen=True)
class Encoded:
    scored: ScoredStudy
    objects: tuple[EncodedObject, ...]
    resources: list[dict]  # FHIR R4, the DiagnosticReport first


def load(ctx: NodeContext, session: Session, study: Study, job: Job) -> EncodeWork:
    scored = results.load(session, study.id, study.version)
    previous = session.scalars(
        select(Output.path)
        .where(Output.study_id == study.id, Output.kind == OutputKind.SR, Output.version < study.version)
        .order_by(Output.version.desc())
        .limit(1)
    ).all()
    return EncodeWork(
        scored=scored,
        files=SourceFiles.load(ctx, session, study, scored),
        predecessor_srs=tuple(Path(p) for p in previous),
        predecessor=_predecessor(session, study),
    )


def _predecessor(session: Session, study: Study) -> Predecessor | None:
    previous = results.load_before(session, study.id, study.version) if study.version > 1 else None
    return None if previous is None else predecessor_of(previous)


def run(ctx: NodeContext, work: EncodeWork) -> Encoded:
    scored = work.scored
    kinds = set(ctx.settings.outputs.kinds)
    headers = work.files.headers(ctx)
    predecessors = [dcmread(p, stop_before_pixels=True) for p in work.predecessor_srs if p.exists()]

    # Per source image: its GSPS and SEG (when it has a drawn finding).
    # The GSPS come first because the SR references them.
    states: dict[str, Dataset] = {}
    per_image: list[tuple[OutputKind, Dataset]] = []
    for index, image in enumerate(scored.images):
        uid = image.sop_instance_uid
        if OutputKind.GSPS in kinds and (gsps := build_presentation_state(headers[uid], image, scored,
                                                                         instance_number=index + 1)):
            states[uid] = gsps
            per_image.append((OutputKind.GSPS, gsps))
        if OutputKind.SEG in kinds and (seg := build_segmentation(headers[uid], image, scored,
                                                                  instance_number=index + 1)):
            per_image.append((OutputKind.SEG, seg))
    sr = build_sr(scored, headers, predecessors or None, presentation_states=states)
    objects: list[tuple[OutputKind, Dataset]] = [(OutputKind.SR, sr)]

    pdf = None
    report = ctx.settings.outputs.report_pdf
    if ctx.settings.outputs.renders_pdf:
        display = DisplayPixels(ctx, work.files)
        pdf = render_report_pdf(scored, {image.sop_instance_uid: display(image.sop_instance_uid) for image in scored.images},
                                font_dir=report.font_dir, predecessor=work.predecessor)
        write_durably(pdf, report_pdf_path(ctx.outputs_dir, scored.calling_ae, scored.study_uid, scored.version))
        if OutputKind.PDF in kinds:
            sources = [headers[image.sop_instance_uid] for image in scored.images]
            objects.append((OutputKind.PDF, build_encapsulated_pdf(pdf, sources, scored)))
    objects.extend(per_image)

    written = write_objects(ctx, scored, objects)
    if OutputKind.SC not in kinds:  # this version is done now: its renditions on disk (node/renditions.py)
        ctx.renditions.settle(list(work.files.displays.values()))
    attachment = pdf_attachment(pdf, scored) if pdf is not None and report.fhir else None
    resources = build_report_resources(scored, patient_system=ctx.settings.api.patient_identifier_system,
                                       presented_form=attachment)
    return Encoded(scored, written, resources)


def settle(ctx: NodeContext, session: Session, study: Study, encoded: Encoded) -> None:
    """Outputs, FHIR versions, the deliver jobs and the capture job commit with "encode done".
    The SCs' deliveries are queued now too, waiting for capture (node/jobs.py), so a
    destination's delivery shows unfinished until the SCs reached it. The study is
    done here only when no SCs are to be drawn; otherwise capture concludes it."""
    version = encoded.scored.version
    record_outputs(session, study, version, encoded.objects)
    save_resources(session, encoded.resources, study.id)
    enqueue_deliveries(ctx, session, study, version, Stage.DELIVER)
    if OutputKind.SC in ctx.settings.outputs.kinds:
        enqueue(session, study.id, Stage.CAPTURE, version)
        enqueue_deliveries(ctx, session, study, version, Stage.DELIVER_SC)
    else:
        conclude(study, StudyState.DONE)
    log.info("study %s encoded: %d DICOM objects, %d FHIR resources", study.study_uid, len(encoded.objects),
             len(encoded.resources))
