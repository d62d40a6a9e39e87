"""Stage 2: render a scored study as DICOM objects and FHIR resources.

The DICOM objects are the kinds `outputs.kinds` names: the TID 1500 SR
(always), heatmap SCs, a SEG and a GSPS per image with a drawn finding, and
the printable report as an Encapsulated PDF. The PDF itself is also kept as
a file (`report-v<N>.pdf`) for the API download and FHIR's presentedForm
whenever one of its uses is on (`outputs.report_pdf`).

EncodeWork (the ScoredStudy and the files it refers to) -> Encoded (the
objects written durably, the FHIR resources). UIDs, ids and creation times
are deterministic, so running this again after a crash rewrites the same
bytes rather than creating new objects.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from inference import decode_dicom
from inference.dicom_file import dcmread_bounded
from node import results
from node.context import NodeContext
from node.db import Instance, Job, Output, Study
from node.fhir_store import save_resources
from node.jobs import enqueue
from node.outputs.encapsulated_pdf import build_encapsulated_pdf
from node.outputs.fhir_report import build_report_resources, pdf_attachment
from node.outputs.gsps import build_presentation_state
from node.outputs.pdf_report import Predecessor, predecessor_of, render_report_pdf
from node.outputs.sc import build_heatmap_captures, display_rendition, fit_rendition
from node.outputs.seg import build_segmentation
from node.outputs.sr import build_sr
from node.pipeline import conclude
from node.scored_study import ScoredStudy
from node.states import OutputKind, Stage, StudyState
from node.storage import display_path, output_path, report_pdf_path, write_durably

log = logging.getLogger(__name__)

# All SCs of a study share one series; each source image gets a block of
# Instance Numbers (its summary and up to 19 findings) so they never collide.
INSTANCE_NUMBERS_PER_SOURCE = 20


@dataclass(frozen=True)
class EncodeWork:
    scored: ScoredStudy
    sources: dict[str, Path]  # SOP Instance UID -> the received instance
    displays: dict[str, Path]  # SOP Instance UID -> the display rendition infer kept
    predecessor_srs: tuple[Path, ...]  # the SR of the previous version, if any
    predecessor: Predecessor | None = None  # the report version this one amends, if any


@dataclass(frozen=True)
class EncodedObject:
    kind: OutputKind
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    path: Path


@dataclass(frozen=True)
class Encoded:
    scored: ScoredStudy
    objects: tuple[EncodedObject, ...]
    resources: list[dict]  # FHIR R4, the DiagnosticReport first


def load(ctx: NodeContext, session: Session, study: Study, job: Job) -> EncodeWork:
    scored = results.load(session, study.id, study.version)
    uids = [image.sop_instance_uid for image in scored.images]
    sources = dict(session.execute(
        select(Instance.sop_instance_uid, Instance.path).where(
            Instance.study_id == study.id, Instance.sop_instance_uid.in_(uids))
    ).all())
    previous = session.scalars(
        select(Output.path)
        .where(Output.study_id == study.id, Output.kind == OutputKind.SR, Output.version < study.version)
        .order_by(Output.version.desc())
        .limit(1)
    ).all()
    return EncodeWork(
        scored=scored,
        sources={uid: Path(sources[uid]) for uid in uids},
        displays={uid: display_path(ctx.work_dir, study.calling_ae, study.study_uid, study.version, uid) for uid in uids},
        predecessor_srs=tuple(Path(p) for p in previous),
        predecessor=_predecessor(session, study),
    )


def _predecessor(session: Session, study: Study) -> Predecessor | None:
    previous = results.load_before(session, study.id, study.version) if study.version > 1 else None
    return None if previous is None else predecessor_of(previous)


def run(ctx: NodeContext, work: EncodeWork) -> Encoded:
    scored = work.scored
    kinds = set(ctx.settings.outputs.kinds)
    # Sources arrived from the network: a Deflated one is inflated in chunks, capped.
    cap = ctx.settings.dicom.max_inflated_bytes
    headers = {uid: dcmread_bounded(path, stop_before_pixels=True, max_inflated_bytes=cap)
               for uid, path in work.sources.items()}
    predecessors = [dcmread(p, stop_before_pixels=True) for p in work.predecessor_srs if p.exists()]

    # Per source image: its GSPS and SEG (when it has a drawn finding), its SCs.
    # The GSPS come first because the SR references them.
    states: dict[str, Dataset] = {}
    per_image: list[tuple[OutputKind, Dataset]] = []
    displays: dict[str, np.ndarray] = {}

    def display(uid: str) -> np.ndarray:
        if uid not in displays:
            kept = ctx.renditions.get(work.displays[uid])  # infer ran in this process: its pixels
            displays[uid] = kept if kept is not None else _display(work, uid, cap)
        return displays[uid]

    for index, image in enumerate(scored.images):
        uid = image.sop_instance_uid
        if OutputKind.GSPS in kinds and (gsps := build_presentation_state(headers[uid], image, scored,
                                                                         instance_number=index + 1)):
            states[uid] = gsps
            per_image.append((OutputKind.GSPS, gsps))
        if OutputKind.SEG in kinds and (seg := build_segmentation(headers[uid], image, scored,
                                                                  instance_number=index + 1)):
            per_image.append((OutputKind.SEG, seg))
        if OutputKind.SC in kinds:
            side = ctx.settings.outputs.sc.max_side
            captures = build_heatmap_captures(
                headers[uid], image, fit_rendition(display(uid), image.heatmaps.source_shape, side), scored,
                first_instance_number=1 + INSTANCE_NUMBERS_PER_SOURCE * index, max_side=side,
            )
            per_image.extend((OutputKind.SC, sc) for sc in captures)
    sr = build_sr(scored, headers, predecessors or None, presentation_states=states)
    objects: list[tuple[OutputKind, Dataset]] = [(OutputKind.SR, sr)]

    pdf = None
    report = ctx.settings.outputs.report_pdf
    if ctx.settings.outputs.renders_pdf:
        pdf = render_report_pdf(scored, {image.sop_instance_uid: display(image.sop_instance_uid) for image in scored.images},
                                font_dir=report.font_dir, predecessor=work.predecessor)
        write_durably(pdf, report_pdf_path(ctx.outputs_dir, scored.calling_ae, scored.study_uid, scored.version))
        if OutputKind.PDF in kinds:
            sources = [headers[image.sop_instance_uid] for image in scored.images]
            objects.append((OutputKind.PDF, build_encapsulated_pdf(pdf, sources, scored)))
    objects.extend(per_image)

    written = []
    for kind, obj in objects:
        path = output_path(ctx.outputs_dir, scored.calling_ae, scored.study_uid, kind, obj.SOPInstanceUID)
        buffer = io.BytesIO()
        obj.save_as(buffer, enforce_file_format=True)
        write_durably(buffer.getvalue(), path)
        written.append(EncodedObject(kind, str(obj.SOPInstanceUID), str(obj.SOPClassUID),
                                     str(obj.SeriesInstanceUID), path))
    ctx.renditions.settle(list(work.displays.values()))  # kept on disk before this version counts as encoded
    attachment = pdf_attachment(pdf, scored) if pdf is not None and report.fhir else None
    resources = build_report_resources(scored, patient_system=ctx.settings.api.patient_identifier_system,
                                       presented_form=attachment)
    return Encoded(scored, tuple(written), resources)


def _display(work: EncodeWork, sop_uid: str, max_inflated_bytes: int) -> np.ndarray:
    """The rendition infer kept; decoded again only if it is gone (e.g. a
    restored backup without the work directory)."""
    path = work.displays[sop_uid]
    if path.exists():
        with Image.open(path) as picture:
            return np.asarray(picture)
    log.warning("display rendition of %s missing; decoding the source again", sop_uid)
    return display_rendition(decode_dicom(dcmread_bounded(work.sources[sop_uid], max_inflated_bytes=max_inflated_bytes)))


def settle(ctx: NodeContext, session: Session, study: Study, encoded: Encoded) -> None:
    """Outputs, FHIR versions and the deliver jobs commit with "encode done"."""
    for obj in encoded.objects:
        row = session.scalar(select(Output).where(Output.study_id == study.id,
                                                  Output.sop_instance_uid == obj.sop_instance_uid))
        if row is None:
            row = Output(study_id=study.id, sop_instance_uid=obj.sop_instance_uid)
            session.add(row)
        row.version, row.kind, row.path = encoded.scored.version, obj.kind, str(obj.path)
        row.sop_class_uid, row.series_uid = obj.sop_class_uid, obj.series_uid
    save_resources(session, encoded.resources, study.id)
    conclude(study, StudyState.DONE)
    for destination in ctx.settings.destinations:
        enqueue(session, study.id, Stage.DELIVER, encoded.scored.version, destination=destination.name)
    log.info("study %s encoded: %d DICOM objects, %d FHIR resources", study.study_uid, len(encoded.objects),
             len(encoded.resources))
