"""Stage 2b: draw a scored study's heatmap Secondary Captures.

Runs after encode, while encode's deliveries already carry the report (SR,
FHIR, HL7) out: the SCs are the costliest objects to draw and to send (one
per positive finding and a summary per image, each a full RGB picture), and
nobody waits on them to triage. Their own deliveries (`deliver-sc`, one per
DICOM or DICOMweb destination) were queued by encode and run once this stage
is done; the study is done from then on.

CaptureWork (the ScoredStudy and the files it refers to) -> Captured (the SCs
written durably). Their UIDs are deterministic, so running this again after a
crash rewrites the same bytes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from pydicom.dataset import Dataset
from sqlalchemy.orm import Session

from node import results
from node.context import NodeContext
from node.db import Job, Study
from node.outputs.sc import build_heatmap_captures, fit_rendition
from node.pipeline import conclude
from node.pipeline.objects import DisplayPixels, EncodedObject, SourceFiles, record_outputs, write_objects
from node.scored_study import ScoredStudy
from node.states import OutputKind, StudyState

log = logging.getLogger(__name__)

# All SCs of a study share one series; each source image gets a block of
# Instance Numbers (its summary and up to 19 findings) so they never collide.
INSTANCE_NUMBERS_PER_SOURCE = 20


@dataclass(frozen=True)
class CaptureWork:
    scored: ScoredStudy
    files: SourceFiles


@dataclass(frozen=True)
class Captured:
    scored: ScoredStudy
    objects: tuple[EncodedObject, ...]


def load(ctx: NodeContext, session: Session, study: Study, job: Job) -> CaptureWork:
    scored = results.load(session, study.id, study.version)
    return CaptureWork(scored, SourceFiles.load(ctx, session, study, scored))


def run(ctx: NodeContext, work: CaptureWork) -> Captured:
    scored = work.scored
    headers = work.files.headers(ctx)
    display = DisplayPixels(ctx, work.files)
    side = ctx.settings.outputs.sc.max_side
    captures: list[tuple[OutputKind, Dataset]] = []
    for index, image in enumerate(scored.images):
        uid = image.sop_instance_uid
        drawn = build_heatmap_captures(
            headers[uid], image, fit_rendition(display(uid), image.heatmaps.source_shape, side), scored,
            first_instance_number=1 + INSTANCE_NUMBERS_PER_SOURCE * index, max_side=side,
        )
        captures.extend((OutputKind.SC, sc) for sc in drawn)
    written = write_objects(ctx, scored, captures)
    ctx.renditions.settle(list(work.files.displays.values()))  # kept on disk before this version counts as done
    return Captured(scored, written)


def settle(ctx: NodeContext, session: Session, study: Study, captured: Captured) -> None:
    """The SCs' outputs rows and "done" commit with "capture done", which lets
    their deliveries (queued by encode) run."""
    record_outputs(session, study, captured.scored.version, captured.objects)
    conclude(study, StudyState.DONE)
    log.info("study %s captured: %d SCs", study.study_uid, len(captured.objects))
