"""Node events: what an administrator should be able to find later (changed
content, a mixed-patient study, orphan files, purges, restores), as rows of
`node_events`, written in the caller's transaction so an event is recorded
exactly when what it describes commits. UIDs and reasons only: never PHI."""
from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db import NodeEvent, Study, server_now

log = logging.getLogger(__name__)


class EventKind:
    CHANGED_CONTENT = "changed_content"  # new bytes under a known SOP Instance UID
    MIXED_PATIENT = "mixed_patient"  # a study's images disagree on the patient
    ORPHAN_REGISTERED = "orphan_registered"  # start-up sweep: a file without a row, readable
    ORPHAN_QUARANTINED = "orphan_quarantined"  # start-up sweep: a file without a row, unusable
    STALE_TEMP_REMOVED = "stale_temp_removed"  # start-up sweep: partial writes of a crash
    RETENTION_PURGE = "retention_purge"
    RESTORED = "restored"  # this database was restored from a backup


def record_event(session: Session, kind: str, *, study: Study | None = None, sop_instance_uid: str = "",
                 detail: str = "") -> None:
    session.add(NodeEvent(
        at=server_now(session), kind=kind,
        study_id=None if study is None else study.id,
        study_uid="" if study is None else study.study_uid,
        sop_instance_uid=sop_instance_uid[:64], detail=detail[:4000],
    ))
    log.info("event %s%s%s: %s", kind, f" study={study.study_uid}" if study is not None else "",
             f" sop={sop_instance_uid}" if sop_instance_uid else "", detail)


def recent_events(session: Session, *, kind: str | None = None, limit: int = 100) -> list[NodeEvent]:
    stmt = select(NodeEvent).order_by(NodeEvent.id.desc()).limit(limit)
    if kind:
        stmt = stmt.where(NodeEvent.kind == kind)
    return list(session.scalars(stmt))
