"""DICOM Person Name (PN) -> its components, for FHIR HumanName and HL7 v2 XPN.

PN is `Family^Given^Middle^Prefix^Suffix`, with up to three component groups
separated by '=' (alphabetic, ideographic, phonetic). Only the alphabetic group
is used: it is the one every receiving system can display.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PersonName:
    family: str = ""
    given: str = ""
    middle: str = ""
    prefix: str = ""
    suffix: str = ""

    @classmethod
    def from_dicom(cls, value: str | None) -> "PersonName":
        alphabetic = str(value or "").split("=", 1)[0]
        parts = [p.strip() for p in alphabetic.split("^")] + [""] * 5
        return cls(*parts[:5])

    @property
    def empty(self) -> bool:
        return not any((self.family, self.given, self.middle, self.prefix, self.suffix))

    def fhir(self) -> dict | None:
        """FHIR R4 HumanName, or None when the name is empty."""
        if self.empty:
            return None
        name: dict = {"use": "official"}
        if self.family:
            name["family"] = self.family
        given = [g for g in (self.given, *self.middle.split()) if g]
        if given:
            name["given"] = given
        if self.prefix:
            name["prefix"] = [self.prefix]
        if self.suffix:
            name["suffix"] = [self.suffix]
        return name


FHIR_GENDER = {"M": "male", "F": "female", "O": "other"}


def fhir_birth_date(dicom_date: str) -> str | None:
    text = (dicom_date or "").strip()
    if len(text) == 8 and text.isdigit() and text != "00000000":
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return None
