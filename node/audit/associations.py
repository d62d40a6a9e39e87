"""Auditing inbound DICOM associations: one record per association, at its end.

`association_auditor(...)` returns the SCP's `on_association(event)` callback.
It runs once per association (never per instance, so the C-STORE path stays
"store durably, record, return"), looks up the patients of the studies the
association brought with one query, and appends one audit record
(node/audit/events.py `association`). `event` is duck-typed: kind, calling_ae,
called_ae, peer_address, peer_port, reason, study_uids, tls.
"""
from __future__ import annotations

import logging
from typing import Callable

from sqlalchemy import select

from node.audit import events
from node.audit.trail import AuditTrail
from node.db import Database, Study

log = logging.getLogger(__name__)


def patients_of(db: Database, calling_ae: str, study_uids) -> dict[str, str]:
    uids = list(study_uids or ())
    if not uids:
        return {}
    with db.session() as s:
        rows = s.execute(select(Study.study_uid, Study.patient_id)
                         .where(Study.calling_ae == calling_ae, Study.study_uid.in_(uids))).all()
    return {uid: patient for uid, patient in rows}


def association_auditor(db: Database, trail: AuditTrail, node_ae: str) -> Callable[[object], None]:
    def on_association(event) -> None:
        try:
            patients = patients_of(db, event.calling_ae, event.study_uids) if event.kind in ("released", "aborted") else {}
            events.association(trail, event, node_ae, patients)
        except Exception as exc:  # the association is over either way; say so without its data
            log.error("audit record of a DICOM association (%s from %s) could not be written: %s",
                      event.kind, event.calling_ae, type(exc).__name__)

    return on_association
