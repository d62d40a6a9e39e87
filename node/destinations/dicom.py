"""DICOM destinations: C-STORE a study version's outputs into the PACS.

A `deliver` job sends every object the encode stage wrote for the version
(the kinds `outputs.kinds` named then, the SCs aside), the SR first; a
`deliver-sc` job sends the SCs the capture stage drew. Each association
proposes its objects' SOP classes (SR, SC, SEG, GSPS, PDF), so a PACS that
refuses one says so per class.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_scp.scu import SOP_CLASS_NOT_SUPPORTED, SendError, SendStopped, send_files
from dicom_scp.tls import client_context
from node.config import DicomDestination
from node.context import NodeContext
from node.db import Output, Study
from node.jobs import LeaseLost, PermanentError, RetryableError
from node.lease import lease_lost
from node.states import OutputKind

log = logging.getLogger(__name__)


def is_permanent(status: int) -> bool:
    # 0xA9xx (does not match SOP class), 0xCxxx (cannot understand) and a
    # refused SOP class will not change on retry; 0xA7xx (out of resources)
    # and the rest might.
    return status == SOP_CLASS_NOT_SUPPORTED or 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF


@dataclass(frozen=True)
class DicomDelivery:
    destination: DicomDestination
    study_uid: str
    version: int
    paths: tuple[Path, ...]  # the SR first, then the other objects in encode order


def load(ctx: NodeContext, session: Session, study: Study, destination: DicomDestination,
         captures: bool = False) -> DicomDelivery:
    """The report's objects, or with `captures` the SCs, of the study's current version."""
    wave = (Output.kind == OutputKind.SC) if captures else (Output.kind != OutputKind.SC)
    rows = session.execute(
        select(Output.kind, Output.path)
        .where(Output.study_id == study.id, Output.version == study.version, wave)
        .order_by(Output.id)
    ).all()
    paths = [Path(path) for kind, path in rows if kind == OutputKind.SR]
    paths += [Path(path) for kind, path in rows if kind != OutputKind.SR]
    if not paths:
        raise PermanentError("no encoded outputs to deliver")
    return DicomDelivery(destination, study.study_uid, study.version, tuple(paths))


def _tls(destination: DicomDestination):
    tls = destination.tls
    if tls is None:
        return None
    try:
        return client_context(ca_certificates=tls.ca_certificates, certificate=tls.certificate,
                              private_key=tls.private_key)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError; a fixed file may come back
        raise RetryableError(f"{destination.name}: cannot load the TLS certificates: {type(exc).__name__}") from exc


def send(ctx: NodeContext, work: DicomDelivery) -> None:
    destination, paths = work.destination, list(work.paths)
    tls = _tls(destination)
    try:
        report = send_files(
            paths,
            calling_ae=destination.calling_ae_title or ctx.settings.dicom.ae_title,
            called_ae=destination.ae_title,
            host=destination.host,
            port=destination.port,
            tls=tls,
            server_name=destination.tls.server_name if destination.tls else None,
            should_stop=lease_lost,  # never two workers sending one study at once
        )
    except SendStopped as exc:
        raise LeaseLost(f"{destination.name}: {exc}") from exc
    except (SendError, OSError, RuntimeError) as exc:
        raise RetryableError(f"{destination.name}: {type(exc).__name__}", f"{destination.name}: {exc}") from exc
    failed = report.failed
    if failed:
        detail = ", ".join(f"{uid}=0x{status:04X}" for uid, status in sorted(failed.items()))
        statuses = ", ".join(sorted({f"0x{status:04X}" for status in failed.values()}))
        summary = f"{len(failed)} of {len(paths)} objects, DICOM status {statuses}"
        if all(is_permanent(st) for st in failed.values()):
            hint = ""
            if SOP_CLASS_NOT_SUPPORTED in failed.values():
                hint = " (a SOP class the PACS does not accept: drop its kind from outputs.kinds)"
            raise PermanentError(f"{destination.name} refused: {summary}{hint}", f"{destination.name} refused: {detail}{hint}")
        raise RetryableError(f"{destination.name} did not store: {summary}",
                             f"{destination.name} did not store: {detail}")
    log.info("delivered %d objects to %s (study %s v%d)", len(paths), destination.name, work.study_uid, work.version)
