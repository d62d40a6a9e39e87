"""DICOM destinations: C-STORE a study version's SR and SCs into the PACS."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_scp.scu import SendError, SendStopped, send_files
from node.config import DicomDestination
from node.context import NodeContext
from node.db import Output, Study
from node.jobs import LeaseLost, PermanentError, RetryableError
from node.lease import lease_lost
from node.states import OutputKind

log = logging.getLogger(__name__)


def _is_permanent(status: int) -> bool:
    # 0xA9xx (does not match SOP class) and 0xCxxx (cannot understand) will
    # not change on retry; 0xA7xx (out of resources) and the rest might.
    return 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF


@dataclass(frozen=True)
class DicomDelivery:
    destination: DicomDestination
    study_uid: str
    version: int
    paths: tuple[Path, ...]  # the SR first, then the SCs


def load(ctx: NodeContext, session: Session, study: Study, destination: DicomDestination) -> DicomDelivery:
    rows = session.execute(
        select(Output.kind, Output.path)
        .where(Output.study_id == study.id, Output.version == study.version)
        .order_by(Output.id)
    ).all()
    paths = [Path(path) for kind, path in rows if kind == OutputKind.SR]
    paths += [Path(path) for kind, path in rows if kind != OutputKind.SR]
    if not paths:
        raise PermanentError("no encoded outputs to deliver")
    return DicomDelivery(destination, study.study_uid, study.version, tuple(paths))


def send(ctx: NodeContext, work: DicomDelivery) -> None:
    destination, paths = work.destination, list(work.paths)
    try:
        report = send_files(
            paths,
            calling_ae=destination.calling_ae_title or ctx.settings.dicom.ae_title,
            called_ae=destination.ae_title,
            host=destination.host,
            port=destination.port,
            should_stop=lease_lost,  # never two workers sending one study at once
        )
    except SendStopped as exc:
        raise LeaseLost(f"{destination.name}: {exc}") from exc
    except (SendError, OSError, RuntimeError) as exc:
        raise RetryableError(f"{destination.name}: {exc}") from exc
    failed = report.failed
    if failed:
        detail = ", ".join(f"{uid}=0x{status:04X}" for uid, status in sorted(failed.items()))
        if all(_is_permanent(st) for st in failed.values()):
            raise PermanentError(f"{destination.name} refused: {detail}")
        raise RetryableError(f"{destination.name} did not store: {detail}")
    log.info("delivered %d objects to %s (study %s v%d)", len(paths), destination.name, work.study_uid, work.version)
