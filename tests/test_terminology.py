"""fhir/terminology.json: every finding coded, sourced, and consistent with DICOM."""
from __future__ import annotations

import json
import re

import pytest
from pydicom.sr._concepts_dict import concepts

from inference.types import CHESTXRAY14
from node.terminology import TERMINOLOGY_PATH, load_terminology

RAW = json.loads(TERMINOLOGY_PATH.read_text())
SNOMED_ID = re.compile(r"^[1-9]\d{5,17}$")  # SCTID: 6-18 digits, no leading zero


def _snomed_check_digit_ok(sctid: str) -> bool:
    """SNOMED CT ids end in a Verhoeff check digit: a typo in a code fails here."""
    d = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 6, 7, 8, 9, 5], [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
         [3, 4, 0, 1, 2, 8, 9, 5, 6, 7], [4, 0, 1, 2, 3, 9, 5, 6, 7, 8], [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
         [6, 5, 9, 8, 7, 1, 0, 4, 3, 2], [7, 6, 5, 9, 8, 2, 1, 0, 4, 3], [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
         [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]
    p = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 5, 7, 6, 2, 8, 3, 0, 9, 4], [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
         [8, 9, 1, 6, 0, 4, 3, 5, 2, 7], [9, 4, 5, 3, 1, 2, 6, 8, 7, 0], [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
         [2, 7, 9, 3, 8, 0, 6, 4, 1, 5], [7, 0, 4, 6, 9, 1, 3, 2, 5, 8]]
    check = 0
    for i, digit in enumerate(reversed(sctid)):
        check = d[check][p[i % 8][int(digit)]]
    return check == 0


def test_every_chestxray14_label_has_sourced_snomed_code():
    terms = load_terminology()
    assert set(terms.findings) == set(CHESTXRAY14)
    for label in CHESTXRAY14:
        raw = RAW["findings"][label]["snomed"]
        codes = terms.finding(label)
        assert SNOMED_ID.match(codes.snomed.code), label
        assert _snomed_check_digit_ok(codes.snomed.code), f"{label}: {codes.snomed.code} fails the SCTID check digit"
        assert codes.snomed.system == "http://snomed.info/sct"
        assert codes.snomed.display.strip(), label
        assert len(raw.get("source", "").strip()) > 20, f"{label}: snomed code has no real source"


def test_snomed_concepts_are_distinct_per_finding():
    codes = [load_terminology().finding(label).snomed.code for label in CHESTXRAY14]
    assert len(set(codes)) == len(codes)


def test_nothing_left_to_verify():
    text = TERMINOLOGY_PATH.read_text()
    assert "TO VERIFY" not in text.upper()


def test_radlex_entries_are_sourced_rids_or_null():
    for label in CHESTXRAY14:
        radlex = RAW["findings"][label]["radlex"]
        if radlex is None:
            continue
        assert re.fullmatch(r"RID\d+", radlex["code"]), label
        assert radlex.get("display") and len(radlex.get("source", "")) > 20, label
    rids = [RAW["findings"][label]["radlex"]["code"] for label in CHESTXRAY14 if RAW["findings"][label]["radlex"]]
    assert len(set(rids)) == len(rids), "two findings share one RadLex id"


def test_sr_and_fhir_use_the_same_concept():
    terms = load_terminology()
    for label in CHESTXRAY14:
        codes = terms.finding(label)
        assert RAW["findings"][label]["dicom"] is None, f"{label}: SR would diverge from FHIR"
        assert (codes.dicom.code, codes.dicom.scheme) == (codes.snomed.code, "SCT")
        assert codes.dicom.dicom().scheme_designator == "SCT"


@pytest.mark.parametrize("label", ["Pneumothorax", "Edema", "Effusion", "Nodule", "Mass"])
def test_codes_cited_from_dicom_are_in_ps316(label):
    """Codes whose source cites DICOM PS3.16 must really be in pydicom's copy of it."""
    codes = load_terminology().finding(label)
    assert "PS3.16" in RAW["findings"][label]["snomed"]["source"]
    in_ps316 = {code: meaning for by_code in concepts["SCT"].values() for code, (meaning, _cids) in by_code.items()}
    assert in_ps316.get(codes.snomed.code) == codes.snomed.display


def test_dicom_ambiguous_cardiomegaly_code_is_not_used():
    # pydicom's PS3.16 dict lists 287272002 under two different meanings.
    assert load_terminology().finding("Cardiomegaly").snomed.code != "287272002"


def test_loinc_report_codes_and_displays():
    report = load_terminology().report
    expected = {
        "single_view": ("36554-4", "XR Chest Single view"),
        "two_views": ("36643-5", "XR Chest 2 Views"),
        "sr_title": ("18748-4", "Diagnostic imaging study"),
        "category": ("LP29684-5", "Radiology"),
    }
    for key, (code, display) in expected.items():
        assert report[key].system == "http://loinc.org"
        assert (report[key].code, report[key].display) == (code, display)
        assert RAW["report"][key]["source"].strip()
    # The SR keeps the DICOM Code Meaning of CID 7000, the FHIR side the LOINC display.
    assert report["sr_title"].dicom().meaning == "Diagnostic Imaging Report"
    assert concepts["LN"]["DiagnosticImagingReport"]["18748-4"][0] == "Diagnostic Imaging Report"


def test_fhir_only_codes_come_from_ps316():
    fhir = load_terminology().fhir
    dcm = {code: meaning for by_code in concepts["DCM"].values() for code, (meaning, _cids) in by_code.items()}
    for key in ("device_type", "operating_point"):
        assert dcm[fhir[key].code] == fhir[key].display


def test_hl7_v2_coding_system_names():
    terms = load_terminology()
    assert terms.finding("Effusion").snomed.v2() == ("60046008", "Pleural effusion", "SCT")
    assert terms.report["single_view"].v2()[2] == "LN"
