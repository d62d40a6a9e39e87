"""DICOM destinations: C-STORE a study version's SR and SCs into the PACS."""
from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select

from dicom_scp.scu import SendError, send_files
from node.config import DicomDestination
from node.context import NodeContext
from node.db import Job, Output
from node.jobs import PermanentError, RetryableError

log = logging.getLogger(__name__)


def _is_permanent(status: int) -> bool:
    # 0xA9xx (does not match SOP class) and 0xCxxx (cannot understand) will
    # not change on retry; 0xA7xx (out of resources) and the rest might.
    return 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF


def send(ctx: NodeContext, job: Job, destination: DicomDestination) -> None:
    with ctx.db.session() as s:
        paths = [
            Path(p)
            for p in s.scalars(
                select(Output.path)
                .where(Output.study_id == job.study_id, Output.version == job.study_version)
                .order_by(Output.kind.desc(), Output.id)  # SR first
            )
        ]
    if not paths:
        raise PermanentError("no encoded outputs to deliver")
    try:
        report = send_files(
            paths,
            calling_ae=destination.calling_ae_title or ctx.settings.dicom.ae_title,
            called_ae=destination.ae_title,
            host=destination.host,
            port=destination.port,
        )
    except (SendError, OSError, RuntimeError) as exc:
        raise RetryableError(f"{destination.name}: {exc}") from exc
    failed = report.failed
    if failed:
        detail = ", ".join(f"{uid}=0x{status:04X}" for uid, status in sorted(failed.items()))
        if all(_is_permanent(st) for st in failed.values()):
            raise PermanentError(f"{destination.name} refused: {detail}")
        raise RetryableError(f"{destination.name} did not store: {detail}")
    log.info("delivered %d objects to %s (study id %d v%d)", len(paths), destination.name, job.study_id, job.study_version)
