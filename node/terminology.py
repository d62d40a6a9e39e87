"""Typed access to fhir/terminology.json, the single source of codes.

SR, FHIR and HL7 builders all ask this module, so a finding can never be coded
one way in the PACS and another way in the EHR.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from pydicom.sr.coding import Code

TERMINOLOGY_PATH = Path(__file__).resolve().parent.parent / "fhir" / "terminology.json"


@dataclass(frozen=True)
class Coding:
    system: str  # FHIR system URI
    code: str
    display: str  # FHIR display (the code system's preferred term)
    scheme: str  # DICOM coding scheme designator
    # DICOM Code Meaning when it differs from the FHIR display (e.g. LOINC
    # 18748-4 is "Diagnostic imaging study" in LOINC, "Diagnostic Imaging
    # Report" in PS3.16 CID 7000).
    meaning: str | None = None
    v2_system: str | None = None  # HL7 v2 Table 0396 name, when one is known

    def dicom(self) -> Code:
        return Code(self.code, self.scheme, self.meaning or self.display)

    def fhir(self) -> dict:
        return {"system": self.system, "code": self.code, "display": self.display}

    def v2(self) -> tuple[str, str, str]:
        """(identifier, text, coding system) for an HL7 v2 CWE."""
        return self.code, self.display, self.v2_system or self.scheme


@dataclass(frozen=True)
class FindingCodes:
    label: str  # model label, e.g. "Pleural_Thickening"
    display: str  # human wording for reports
    snomed: Coding
    radlex: Coding | None
    dicom: Coding  # the concept used as Finding in the SR (falls back to SNOMED)


@dataclass(frozen=True)
class Terminology:
    findings: dict[str, FindingCodes]
    report: dict[str, Coding]
    sr: dict[str, Coding]
    fhir: dict[str, Coding] = field(default_factory=dict)  # FHIR-only codes (Device.type, ...)
    seg: dict[str, Coding] = field(default_factory=dict)  # DICOM SEG segment category, algorithm family
    # verdict ("positive" | "negative" | "critical") -> {"fhir": Coding, "v2": Coding}
    interpretation: dict[str, dict[str, Coding]] = field(default_factory=dict)
    # priority ("routine" | "stat") -> {"fhir": ..., "v2_tq1": ..., "v2_obr27": ...}
    priority: dict[str, dict[str, Coding]] = field(default_factory=dict)

    def finding(self, label: str) -> FindingCodes:
        return self.findings[label]


@lru_cache(maxsize=1)
def load_terminology(path: Path = TERMINOLOGY_PATH) -> Terminology:
    raw = json.loads(Path(path).read_text())
    systems: dict[str, str] = raw["systems"]
    scheme_of = {uri: scheme for scheme, uri in systems.items()}
    v2_systems = {k: v for k, v in raw.get("v2_systems", {}).items() if not k.startswith("_")}

    def coding(entry: dict, default_scheme: str | None = None) -> Coding:
        # A code needs a FHIR system URI or a scheme (DICOM designator or an
        # HL7 v2 table "HL7nnnn"); FHIR-only systems have no DICOM scheme.
        scheme = entry.get("scheme") or scheme_of.get(entry.get("system", ""), default_scheme) or ""
        system = entry.get("system") or systems.get(scheme, "")
        if not scheme and not system:
            raise ValueError(f"terminology entry without scheme/system: {entry}")
        return Coding(
            system=system,
            code=entry["code"],
            display=entry.get("display") or entry["meaning"],
            scheme=scheme,
            meaning=entry.get("meaning"),
            # HL7-defined tables are named HL7nnnn in Table 0396 too.
            v2_system=v2_systems.get(scheme) or (scheme if scheme.startswith("HL7") else None),
        )

    def group(section: dict) -> dict[str, dict[str, Coding]]:
        return {
            name: {kind: coding(entry) for kind, entry in kinds.items()}
            for name, kinds in section.items()
            if not name.startswith("_")
        }

    findings = {}
    for label, item in raw["findings"].items():
        snomed = coding(item["snomed"], "SCT")
        findings[label] = FindingCodes(
            label=label,
            display=item["display"],
            snomed=snomed,
            radlex=coding(item["radlex"], "RADLEX") if item.get("radlex") else None,
            dicom=coding(item["dicom"]) if item.get("dicom") else snomed,
        )
    return Terminology(
        findings=findings,
        report={k: coding(v) for k, v in raw["report"].items()},
        sr={k: coding(v) for k, v in raw["sr"].items()},
        fhir={k: coding(v) for k, v in raw.get("fhir", {}).items()},
        seg={k: coding(v) for k, v in raw.get("seg", {}).items() if not k.startswith("_")},
        interpretation=group(raw.get("interpretation", {})),
        priority=group(raw.get("priority", {})),
    )


def procedure_coding(terms: Terminology, view_positions: list[str]) -> Coding:
    """LOINC procedure for the scored images, shared by the SR and FHIR.

    One frontal image is "single view"; two different projections (e.g. PA
    and lateral) are "2 views". Images without ViewPosition count apart
    (callers pass a unique placeholder such as the SOP Instance UID)."""
    return terms.report["two_views" if len(set(view_positions)) >= 2 else "single_view"]
