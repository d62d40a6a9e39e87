"""What the encode and capture stages share: the files a scored study refers
to, the pixels the pictures are drawn on, and writing and recording the DICOM
objects they make.

Encode (the report: SR, GSPS, SEG, PDF, FHIR) and capture (the heatmap SCs)
are two stages so that the report reaches the PACS and the EHR before the
pictures are drawn (node/pipeline/__init__.py); both read the same sources
and renditions and write their objects the same way.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from inference import decode_dicom
from inference.dicom_file import dcmread_bounded
from node.context import NodeContext
from node.db import Instance, Output, Study
from node.destinations import OBJECT_DESTINATIONS
from node.jobs import enqueue
from node.outputs.sc import display_rendition
from node.renditions import read_rendition
from node.scored_study import ScoredStudy
from node.states import OutputKind, Stage
from node.storage import display_path, output_path, write_durably

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceFiles:
    """The scored images' received instances and the display renditions infer kept, by SOP Instance UID."""

    sources: dict[str, Path]
    displays: dict[str, Path]

    @classmethod
    def load(cls, ctx: NodeContext, session: Session, study: Study, scored: ScoredStudy) -> SourceFiles:
        uids = [image.sop_instance_uid for image in scored.images]
        sources = dict(session.execute(
            select(Instance.sop_instance_uid, Instance.path).where(
                Instance.study_id == study.id, Instance.sop_instance_uid.in_(uids))
        ).all())
        return cls(
            sources={uid: Path(sources[uid]) for uid in uids},
            displays={uid: display_path(ctx.work_dir, study.calling_ae, study.study_uid, study.version, uid)
                      for uid in uids},
        )

    def headers(self, ctx: NodeContext) -> dict[str, Dataset]:
        # Sources arrived from the network: a Deflated one is inflated in chunks, capped.
        cap = ctx.settings.dicom.max_inflated_bytes
        return {uid: dcmread_bounded(path, stop_before_pixels=True, max_inflated_bytes=cap)
                for uid, path in self.sources.items()}


class DisplayPixels:
    """Each source's display rendition, from memory when infer ran in this
    process moments ago (node/renditions.py), else from the file it kept, else
    decoded again (e.g. a restored backup without the work directory)."""

    def __init__(self, ctx: NodeContext, files: SourceFiles):
        self._ctx, self._files = ctx, files
        self._pictures: dict[str, np.ndarray] = {}

    def __call__(self, sop_uid: str) -> np.ndarray:
        if sop_uid not in self._pictures:
            kept = self._ctx.renditions.get(self._files.displays[sop_uid])
            self._pictures[sop_uid] = kept if kept is not None else self._from_disk(sop_uid)
        return self._pictures[sop_uid]

    def _from_disk(self, sop_uid: str) -> np.ndarray:
        try:
            return read_rendition(self._files.displays[sop_uid])
        except (FileNotFoundError, ValueError):
            pass
        log.warning("display rendition of %s missing or unreadable; decoding the source again", sop_uid)
        source = dcmread_bounded(self._files.sources[sop_uid],
                                 max_inflated_bytes=self._ctx.settings.dicom.max_inflated_bytes)
        return display_rendition(decode_dicom(source))


@dataclass(frozen=True)
class EncodedObject:
    kind: OutputKind
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    path: Path


def write_objects(ctx: NodeContext, scored: ScoredStudy, objects: list[tuple[OutputKind, Dataset]]) -> tuple[EncodedObject, ...]:
    """Write each object durably under the study's outputs directory. Their UIDs
    are deterministic, so a re-run after a crash rewrites the same files."""
    written = []
    for kind, obj in objects:
        path = output_path(ctx.outputs_dir, scored.calling_ae, scored.study_uid, kind, obj.SOPInstanceUID)
        buffer = io.BytesIO()
        obj.save_as(buffer, enforce_file_format=True)
        write_durably(buffer.getvalue(), path)
        written.append(EncodedObject(kind, str(obj.SOPInstanceUID), str(obj.SOPClassUID),
                                     str(obj.SeriesInstanceUID), path))
    return tuple(written)


def record_outputs(session: Session, study: Study, version: int, objects: tuple[EncodedObject, ...]) -> None:
    """One `outputs` row per object (updated in place when a re-run wrote it again)."""
    for obj in objects:
        row = session.scalar(select(Output).where(Output.study_id == study.id,
                                                  Output.sop_instance_uid == obj.sop_instance_uid))
        if row is None:
            row = Output(study_id=study.id, sop_instance_uid=obj.sop_instance_uid)
            session.add(row)
        row.version, row.kind, row.path = version, obj.kind, str(obj.path)
        row.sop_class_uid, row.series_uid = obj.sop_class_uid, obj.series_uid


def enqueue_deliveries(ctx: NodeContext, session: Session, study: Study, version: int, stage: Stage) -> None:
    """One `stage` job (deliver or deliver-sc) per destination that takes it."""
    for destination in ctx.settings.destinations:
        if stage == Stage.DELIVER or destination.type in OBJECT_DESTINATIONS:
            enqueue(session, study.id, stage, version, destination=destination.name)
