"""What a study's AI report says, whatever format carries it.

The SR, the heatmap SCs, FHIR, the HL7 ORU and the API view all render the
same report; the decisions they share live here, once, with no database or
format import: the study-level finding per label, the conclusion sentence,
the report status, the triage priority, and the stable ids that key a
report across versions.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Iterable, Mapping, Sequence

from inference.types import CHESTXRAY14, DEMO_WARNING, Finding, ModelInfo
from node.states import Priority
from node.terminology import load_terminology


class ReportStatus(StrEnum):
    """FHIR DiagnosticReport.status values Carina issues (HL7 result status P / C)."""

    PRELIMINARY = "preliminary"  # the first AI run of a study: not reviewed by a radiologist
    AMENDED = "amended"  # a later run (a late image reopened the study)

    @classmethod
    def for_version(cls, study_version: int) -> "ReportStatus":
        return cls.PRELIMINARY if study_version == 1 else cls.AMENDED


# --- the study-level finding ------------------------------------------------------------


def strongest_findings(findings_by_image: Mapping[str, Sequence[Finding]]) -> dict[str, tuple[str, Finding]]:
    """Per label (CHESTXRAY14 order): (SOP Instance UID, finding) of the image with the
    highest probability. A finding seen on any view is a finding of the study."""
    if not findings_by_image:
        raise ValueError("no scored images: a report needs at least one")
    best: dict[str, tuple[str, Finding]] = {}
    for sop_uid in sorted(findings_by_image):  # sorted: ties resolve the same way every run
        for finding in findings_by_image[sop_uid]:
            if finding.label not in CHESTXRAY14:
                raise ValueError(f"unknown finding label {finding.label!r}")
            if finding.label not in best or finding.probability > best[finding.label][1].probability:
                best[finding.label] = (sop_uid, finding)
    missing = [label for label in CHESTXRAY14 if label not in best]
    if missing:
        raise ValueError(f"findings missing for {missing}")
    return {label: best[label] for label in CHESTXRAY14}


def conclusion(model: ModelInfo, positives: Iterable[Finding]) -> str:
    """The human sentence: positive findings with probabilities, demo caveat first."""
    terms = load_terminology()
    positives = sorted(positives, key=lambda f: -f.probability)
    if positives:
        listed = ", ".join(f"{terms.finding(f.label).display} ({f.probability:.0%})" for f in positives)
        text = f"AI findings above the operating threshold: {listed}."
    else:
        text = "No AI finding above the operating threshold."
    text += f" Model {model.name} {model.version}; not reviewed by a radiologist."
    return f"{DEMO_WARNING}. {text}" if model.demo else text


# --- triage -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Triage:
    """A study version's AI priority: configured critical findings at or above
    their cut make it STAT (see node/triage.py for how it is persisted)."""

    priority: Priority
    critical: tuple[str, ...] = ()  # labels critical in *this* version's findings
    reason: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "priority", Priority(self.priority))
        unknown = [label for label in self.critical if label not in CHESTXRAY14]
        if unknown:
            raise ValueError(f"critical findings {unknown} are not ChestX-ray14 labels")

    @property
    def stat(self) -> bool:
        return self.priority is Priority.STAT


def assess_triage(settings, strongest: Mapping[str, tuple[str, Finding]]) -> Triage:
    """The priority this version's study-level findings call for (settings: config.TriageSettings).

    A critical label is hit when its probability reaches `settings.threshold`,
    or the model's own operating point for the label when that is null."""
    if not settings.enabled:
        return Triage(Priority.ROUTINE, (), "AI triage disabled")
    hits = []
    for label in settings.critical_findings:
        _, finding = strongest[label]
        cut = settings.threshold if settings.threshold is not None else finding.threshold
        if finding.probability >= cut:
            hits.append((label, finding.probability, cut))
    if not hits:
        watched = ", ".join(settings.critical_findings) or "none configured"
        return Triage(Priority.ROUTINE, (), f"no critical AI finding (watched: {watched})")
    listed = "; ".join(f"{label} p={p:.2f} >= {cut:.2f}" for label, p, cut in hits)
    return Triage(Priority.STAT, tuple(label for label, _, _ in hits), f"AI critical finding: {listed}")


KEPT_FROM_EARLIER = "kept from an earlier version: "


def never_lower(earlier: Triage | None, current: Triage) -> Triage:
    """`current`, but with the earlier priority when that was higher: a
    radiologist may already be acting on a STAT."""
    if earlier is None or earlier.priority.rank <= current.priority.rank:
        return current
    return Triage(earlier.priority, current.critical, f"{KEPT_FROM_EARLIER}{earlier.reason}")


# --- stable ids -------------------------------------------------------------------------

# Fixed namespace: changing it would re-key every resource a site has stored.
_ID_NAMESPACE = uuid.UUID("6f1c2a1e-6b0e-5c8a-9a51-3f0b8c1d2e47")


def resource_id(kind: str, *parts: str) -> str:
    """A stable FHIR id (UUID5, 36 chars, within the 64-char id limit)."""
    return str(uuid.uuid5(_ID_NAMESPACE, "|".join((kind, *parts))))


def report_id(calling_ae: str, study_uid: str) -> str:
    # Keyed by calling AE too: the node keeps two routes' copies of one
    # StudyInstanceUID apart (db.Study), so their reports must not merge either.
    return resource_id("DiagnosticReport", calling_ae, study_uid)


def observation_id(calling_ae: str, study_uid: str, label: str) -> str:
    return resource_id("Observation", calling_ae, study_uid, label)


def imaging_study_id(calling_ae: str, study_uid: str) -> str:
    return resource_id("ImagingStudy", calling_ae, study_uid)


def device_id(model: ModelInfo) -> str:
    # From the model's identity, the same inputs as uids.device_uid: one
    # Device per model, and a new one whenever the model changes (IHE AIR).
    return resource_id("Device", model.name, model.version, model.weights_sha256 or "demo")


def provenance_id(calling_ae: str, study_uid: str, study_version: int) -> str:
    # One Provenance per AI run (study version): each records its own activity.
    return resource_id("Provenance", calling_ae, study_uid, str(study_version))


def patient_id(patient_system: str, patient_value: str) -> str:
    return resource_id("Patient", patient_system, patient_value)
