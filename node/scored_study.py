"""The scored study: what one AI run says about one study version, as one typed value.

The infer stage builds it once and stores it (`to_json`); every consumer
(the SR, SC, FHIR and HL7 builders, the deliver stage, the API view) reads it
back through `from_json` and nothing else. It holds:

- the study's facts, read once from the source headers (`StudyFacts`);
- per scored image: its 14 findings (probability, operating point, verdict,
  severity, regions) and its class activation maps;
- the model that produced them, the triage priority, the study version, the
  report status and the issue time.

Invalid values cannot be built: `__post_init__` checks that every image has
the 14 ChestX-ray14 findings in order, that images and facts agree, that the
version is positive, the status a report status and the issue time aware.
The JSON carries a schema number; a stored value of an unknown schema is
refused rather than misread.
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from inference.serialize import (
    finding_from_json,
    finding_to_json,
    heatmaps_from_json,
    heatmaps_to_json,
    model_from_json,
    model_to_json,
)
from inference.types import CHESTXRAY14, Finding, Heatmaps, ModelInfo
from node.report import ReportStatus, Triage, conclusion, report_id, strongest_findings
from node.states import Priority
from node.study_facts import SourceImage, StudyFacts

SCHEMA = "carina.scored-study/1"


@dataclass(frozen=True)
class ScoredImage:
    """The model's verdict on one source image."""

    sop_instance_uid: str
    findings: tuple[Finding, ...]  # the 14 labels, in CHESTXRAY14 order
    heatmaps: Heatmaps
    # Which content of the source was scored: 1, or more after a re-send with
    # changed bytes (node/receiver.py); > 1 gives its outputs new UIDs.
    revision: int = 1

    def __post_init__(self) -> None:
        if tuple(f.label for f in self.findings) != CHESTXRAY14:
            raise ValueError(f"{self.sop_instance_uid}: findings are not the 14 labels in CHESTXRAY14 order")
        if self.heatmaps.maps.shape[0] != len(CHESTXRAY14):
            raise ValueError(f"{self.sop_instance_uid}: heatmaps are not one map per label")

    @property
    def positives(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.positive)


@dataclass(frozen=True)
class ScoredStudy:
    """One AI run over one study version (see the module docstring)."""

    calling_ae: str  # with facts.study_uid, the study's key (two senders never merge)
    facts: StudyFacts
    images: tuple[ScoredImage, ...]  # in facts.images order
    model: ModelInfo
    triage: Triage
    version: int
    status: ReportStatus
    issued: dt.datetime  # timezone-aware
    # Set on a node restored from a backup (node/backup.py): every output UID
    # it issues differs from any the original node may have issued after the
    # backup was taken. Empty otherwise, which leaves the UIDs unchanged.
    uid_salt: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", ReportStatus(self.status))
        if not self.images:
            raise ValueError("a scored study needs at least one scored image")
        scored = tuple(image.sop_instance_uid for image in self.images)
        described = tuple(source.sop_instance_uid for source in self.facts.images)
        if scored != described:
            raise ValueError(f"scored images {scored} differ from the study facts' images {described}")
        if self.version < 1:
            raise ValueError(f"study version must be >= 1, not {self.version}")
        if self.issued.tzinfo is None:
            raise ValueError("issued must be timezone-aware")

    # -- what the report builders share -------------------------------------------------
    @property
    def study_uid(self) -> str:
        return self.facts.study_uid

    @property
    def report_id(self) -> str:
        return report_id(self.calling_ae, self.facts.study_uid)

    @property
    def findings_by_image(self) -> dict[str, tuple[Finding, ...]]:
        return {image.sop_instance_uid: image.findings for image in self.images}

    @property
    def strongest(self) -> dict[str, tuple[str, Finding]]:
        """Study-level (SOP Instance UID, finding) per label: the most probable image's."""
        return strongest_findings(self.findings_by_image)

    @property
    def positives(self) -> list[Finding]:
        """Study-level positive findings, in CHESTXRAY14 order."""
        return [finding for _, finding in self.strongest.values() if finding.positive]

    @property
    def conclusion(self) -> str:
        return conclusion(self.model, self.positives)

    @property
    def created_local(self) -> dt.datetime:
        """The issue time as DICOM dates and times carry it: the equipment's local time."""
        return self.issued.astimezone().replace(tzinfo=None)

    def source(self, sop_instance_uid: str) -> SourceImage:
        return next(s for s in self.facts.images if s.sop_instance_uid == sop_instance_uid)

    def output_uid_qualifiers(self, sop_instance_uid: str | None = None) -> tuple[str, ...]:
        """Extra parts of the output UIDs (node/outputs/uids.py): the restore salt,
        and for one source image's outputs its revision when it is not the first
        and the study version when it is not the first. A later version re-issues
        an unchanged image's SC, SEG and GSPS with its own issue time and
        instance numbers, so they are new objects under new UIDs (the SR and the
        PDF carry the version in their UIDs already)."""
        parts = (f"salt:{self.uid_salt}",) if self.uid_salt else ()
        if sop_instance_uid is not None:
            image = next(i for i in self.images if i.sop_instance_uid == sop_instance_uid)
            if image.revision > 1:
                parts += (f"revision:{image.revision}",)
            if self.version > 1:
                parts += (f"version:{self.version}",)
        return parts

    # -- the codec ----------------------------------------------------------------------
    def to_json(self) -> str:
        # revision and uid_salt only when they are not the defaults: values
        # written before they existed, and the golden outputs, stay the same.
        return json.dumps({
            "schema": SCHEMA,
            "calling_ae": self.calling_ae,
            "facts": _facts_to_json(self.facts),
            "images": [
                {
                    "sop_instance_uid": image.sop_instance_uid,
                    "findings": [finding_to_json(f) for f in image.findings],
                    "heatmaps": heatmaps_to_json(image.heatmaps),
                } | ({"revision": image.revision} if image.revision != 1 else {})
                for image in self.images
            ],
            "model": model_to_json(self.model),
            "triage": {"priority": str(self.triage.priority), "critical": list(self.triage.critical),
                       "reason": self.triage.reason},
            "version": self.version,
            "status": str(self.status),
            "issued": self.issued.isoformat(),
        } | ({"uid_salt": self.uid_salt} if self.uid_salt else {}), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "ScoredStudy":
        data = json.loads(text)
        if data.get("schema") != SCHEMA:
            raise ValueError(f"unsupported scored-study schema {data.get('schema')!r}, expected {SCHEMA!r}")
        triage = data["triage"]
        return cls(
            calling_ae=data["calling_ae"],
            facts=_facts_from_json(data["facts"]),
            images=tuple(
                ScoredImage(
                    sop_instance_uid=image["sop_instance_uid"],
                    findings=tuple(finding_from_json(f) for f in image["findings"]),
                    heatmaps=heatmaps_from_json(image["heatmaps"]),
                    revision=int(image.get("revision", 1)),
                )
                for image in data["images"]
            ),
            model=model_from_json(data["model"]),
            triage=Triage(Priority(triage["priority"]), tuple(triage["critical"]), triage["reason"]),
            version=int(data["version"]),
            status=ReportStatus(data["status"]),
            issued=dt.datetime.fromisoformat(data["issued"]),
            uid_salt=data.get("uid_salt", ""),
        )


def _facts_to_json(facts: StudyFacts) -> dict[str, Any]:
    fields = {name: getattr(facts, name) for name in StudyFacts.__dataclass_fields__ if name != "images"}
    return fields | {"images": [vars(image) for image in facts.images]}


def _facts_from_json(data: dict[str, Any]) -> StudyFacts:
    images = tuple(SourceImage(**image) for image in data["images"])
    return StudyFacts(**{**data, "images": images})
