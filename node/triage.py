"""AI triage, persisted: a study's priority only ever moves up.

The rule itself (configured critical findings at or above their cut make a
study STAT) is `node.report.assess_triage`; this module keeps the outcome per
study. Once a version of a study was STAT, later versions stay STAT (the row
only moves up), because a radiologist may already be acting on it.

Where the priority shows:
- FHIR: DiagnosticReport extension `TRIAGE_PRIORITY_URL` (request-priority
  codes) and Observation.interpretation AA "Critical abnormal" on the critical
  findings;
- HL7 v2 ORU: TQ1-9 (Table 0485) and OBR-27.6 (Table 0027) 'S', OBX-8 'AA';
- the API and the UI: the study's `priority`.
"""
from __future__ import annotations

from sqlalchemy.orm import Session

from node.db import StudyTriage, now
from node.report import KEPT_FROM_EARLIER, Triage
from node.states import Priority


def previous(session: Session, study_id: int) -> Triage | None:
    row = session.get(StudyTriage, study_id)
    return None if row is None else Triage(Priority(row.priority), (), row.reason)


def record(session: Session, study_id: int, version: int, triage: Triage) -> None:
    """Persist `triage` for the study unless that would lower its priority."""
    row = session.get(StudyTriage, study_id, with_for_update=True)
    if row is None:
        session.add(StudyTriage(study_id=study_id, priority=triage.priority, reason=triage.reason, version=version))
        return
    if triage.priority.rank > Priority(row.priority).rank or (
        triage.priority == row.priority and not triage.reason.startswith(KEPT_FROM_EARLIER)
    ):
        row.priority, row.reason, row.version = triage.priority, triage.reason, version
    row.updated_at = now()
