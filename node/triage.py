"""AI triage: configured critical findings raise a study's priority to STAT.

The rule is deliberately simple and visible: a finding listed in
`triage.critical_findings` whose study-level probability (the highest over the
scored images, as in the report) is at or above `triage.threshold` (or, when
that is null, the model's own operating point for the label) makes the study
STAT. Nothing ever lowers a priority: once a version of a study was STAT, later
versions stay STAT (the persisted row only moves up), because a radiologist may
already be acting on it.

Where the priority shows:
- FHIR: DiagnosticReport extension `TRIAGE_PRIORITY_URL` (request-priority
  codes) and Observation.interpretation AA "Critical abnormal" on the critical
  findings;
- HL7 v2 ORU: TQ1-9 (Table 0485) and OBR-27.6 (Table 0027) 'S', OBX-8 'AA'.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from sqlalchemy.orm import Session

from inference.types import Finding
from node.db import StudyTriage, now

PRIORITIES = ("routine", "stat")  # lowest first


@dataclass(frozen=True)
class Triage:
    priority: str  # one of PRIORITIES
    critical: tuple[str, ...] = ()  # labels critical in *this* version's findings
    reason: str = ""

    @property
    def stat(self) -> bool:
        return self.priority == "stat"


def rank(priority: str) -> int:
    return PRIORITIES.index(priority) if priority in PRIORITIES else 0


def strongest(findings: Iterable[Finding]) -> dict[str, Finding]:
    """Study-level finding per label: the highest probability over the images."""
    best: dict[str, Finding] = {}
    for finding in findings:
        if finding.label not in best or finding.probability > best[finding.label].probability:
            best[finding.label] = finding
    return best


def assess(settings, findings: Iterable[Finding]) -> Triage:
    """The priority this version's findings call for (settings: config.TriageSettings)."""
    if not settings.enabled:
        return Triage("routine", (), "AI triage disabled")
    best = strongest(findings)
    hits = []
    for label in settings.critical_findings:
        finding = best.get(label)
        if finding is None:
            continue
        cut = settings.threshold if settings.threshold is not None else finding.threshold
        if finding.probability >= cut:
            hits.append((label, finding.probability, cut))
    if not hits:
        watched = ", ".join(settings.critical_findings) or "none configured"
        return Triage("routine", (), f"no critical AI finding (watched: {watched})")
    listed = "; ".join(f"{label} p={p:.2f} >= {cut:.2f}" for label, p, cut in hits)
    return Triage("stat", tuple(label for label, _, _ in hits), f"AI critical finding: {listed}")


def previous(session: Session, study_id: int) -> Triage | None:
    row = session.get(StudyTriage, study_id)
    return None if row is None else Triage(row.priority, (), row.reason)


def never_lower(earlier: Triage | None, current: Triage) -> Triage:
    """`current`, but with the earlier priority when that was higher."""
    if earlier is None or rank(earlier.priority) <= rank(current.priority):
        return current
    return Triage(earlier.priority, current.critical, f"kept from an earlier version: {earlier.reason}")


def record(session: Session, study_id: int, version: int, triage: Triage) -> Triage:
    """Persist `triage` for the study unless that would lower its priority; returns what is stored."""
    row = session.get(StudyTriage, study_id, with_for_update=True)
    if row is None:
        row = StudyTriage(study_id=study_id, priority=triage.priority, reason=triage.reason, version=version)
        session.add(row)
    elif rank(triage.priority) > rank(row.priority) or (
        triage.priority == row.priority and not triage.reason.startswith("kept from")
    ):
        row.priority, row.reason, row.version = triage.priority, triage.reason, version
    row.updated_at = now()
    session.flush()
    return Triage(row.priority, triage.critical, row.reason)
