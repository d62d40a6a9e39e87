"""Typed access to fhir/terminology.json, the single source of codes.

SR, FHIR and HL7 builders all ask this module, so a finding can never be coded
one way in the PACS and another way in the EHR.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pydicom.sr.coding import Code

TERMINOLOGY_PATH = Path(__file__).resolve().parent.parent / "fhir" / "terminology.json"


@dataclass(frozen=True)
class Coding:
    system: str  # FHIR system URI
    code: str
    display: str
    scheme: str  # DICOM coding scheme designator

    def dicom(self) -> Code:
        return Code(self.code, self.scheme, self.display)

    def fhir(self) -> dict:
        return {"system": self.system, "code": self.code, "display": self.display}


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

    def finding(self, label: str) -> FindingCodes:
        return self.findings[label]


@lru_cache(maxsize=1)
def load_terminology(path: Path = TERMINOLOGY_PATH) -> Terminology:
    raw = json.loads(Path(path).read_text())
    systems: dict[str, str] = raw["systems"]
    scheme_of = {uri: scheme for scheme, uri in systems.items()}

    def coding(entry: dict, default_scheme: str | None = None) -> Coding:
        scheme = entry.get("scheme") or scheme_of.get(entry.get("system", ""), default_scheme)
        if scheme is None:
            raise ValueError(f"terminology entry without scheme/system: {entry}")
        return Coding(
            system=entry.get("system") or systems[scheme],
            code=entry["code"],
            display=entry.get("display") or entry["meaning"],
            scheme=scheme,
        )

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
    )
