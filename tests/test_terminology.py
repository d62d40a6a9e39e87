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


def test_seg_codes_come_from_their_ps316_context_groups():
    """The SEG's segment category (CID 7150) and algorithm family (CID 7162),
    as pydicom's copy of PS3.16 has them."""
    from pydicom.sr.codedict import codes as ps316

    seg = load_terminology().seg
    for key, expected in (("category", ps316.cid7150.MorphologicallyAbnormalStructure),
                          ("algorithm_family", ps316.cid7162.ArtificialIntelligence)):
        code = seg[key].dicom()
        assert (code.value, code.scheme_designator, code.meaning) == (expected.value, expected.scheme_designator, expected.meaning)
        assert len(RAW["seg"][key]["source"]) > 20


def test_hl7_v2_coding_system_names():
    terms = load_terminology()
    assert terms.finding("Effusion").snomed.v2() == ("60046008", "Pleural effusion", "SCT")
    assert terms.report["single_view"].v2()[2] == "LN"


# --- one map, three outputs: SR, FHIR and HL7 built from the same inputs agree ------------

def _sr_groups(sr) -> dict[tuple[str, str], dict]:
    """Per finding concept (code, scheme): the qualitative value and probability in the SR,
    from a measurement group (findings with a region) or a report-level
    qualitative evaluation (the rest)."""
    groups = {}

    def probability(items) -> float:
        [num] = [i for i in items if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "122157"]
        return float(num.MeasuredValueSequence[0].NumericValue)

    def walk(items):
        for item in items:
            name = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
            if item.ValueType == "CONTAINER" and name is not None and name.CodeValue == "125007":
                group = {"probability": probability(item.ContentSequence)}
                for child in item.ContentSequence:
                    child_name = child.ConceptNameCodeSequence[0]
                    if child.ValueType == "CODE" and child_name.CodeValue == "121071":  # Finding
                        concept = child.ConceptCodeSequence[0]
                        group["finding"] = (concept.CodeValue, concept.CodingSchemeDesignator)
                    elif child.ValueType == "CODE":  # qualitative evaluation: name = finding concept
                        value = child.ConceptCodeSequence[0]
                        group["evaluation"] = (child_name.CodeValue, (value.CodeValue, value.CodingSchemeDesignator))
                groups[group["finding"]] = group
            elif item.ValueType == "CONTAINER" and name is not None and name.CodeValue == "C0034375":
                for evaluation in item.ContentSequence:
                    if evaluation.ValueType != "CODE":
                        continue
                    concept, value = evaluation.ConceptNameCodeSequence[0], evaluation.ConceptCodeSequence[0]
                    groups[(concept.CodeValue, concept.CodingSchemeDesignator)] = {
                        "finding": (concept.CodeValue, concept.CodingSchemeDesignator),
                        "evaluation": (concept.CodeValue, (value.CodeValue, value.CodingSchemeDesignator)),
                        "probability": probability(evaluation.ContentSequence),
                    }
            elif "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return groups


def test_sr_fhir_and_hl7_code_every_finding_identically():
    import datetime as dt

    import hl7
    import numpy as np

    from dicom_factory import make_dx
    from node.outputs.fhir_report import build_report_resources
    from node.outputs.hl7_oru import build_oru, encode
    from node.outputs.sr import build_sr
    from pipeline_rig import DEMO, image_result
    from scored_factory import headers, scored_study

    ds = make_dx(np.tile(np.linspace(20, 230, 64, dtype=np.uint8), (64, 1)))
    result = image_result(ds, {"Pneumothorax": 0.91, "Effusion": 0.64})
    study = scored_study([(ds, result)], model=DEMO, issued=dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc))

    sr = _sr_groups(build_sr(study, headers([(ds, result)])))
    fhir = build_report_resources(study, patient_system="urn:oid:1.2.3")
    oru = hl7.parse(encode(build_oru(study)))
    observations = {o["code"]["text"]: o for o in fhir if o["resourceType"] == "Observation"}
    obx = {str(seg(3)(1)(1)): seg for seg in oru.segments("OBX")}

    terms = load_terminology()
    present, absent = terms.sr["present"], terms.sr["absent"]
    assert len(sr) == len(observations) == len(obx) == 14
    for finding in result.findings:
        codes = terms.finding(finding.label)
        sr_group = sr[(codes.dicom.code, codes.dicom.scheme)]
        fhir_obs = observations[finding.label]
        hl7_obx = obx[codes.snomed.code]
        # Same concept everywhere: SR Finding and qualitative evaluation, FHIR code, OBX-3.
        assert sr_group["finding"] == (codes.snomed.code, "SCT")
        assert sr_group["evaluation"][0] == codes.snomed.code
        assert fhir_obs["code"]["coding"][0] == codes.snomed.fhir()
        assert (str(hl7_obx(3)(1)(1)), str(hl7_obx(3)(1)(3))) == (codes.snomed.code, codes.snomed.v2_system)
        # Same verdict: SR Present/Absent = OBX-5, FHIR POS/NEG = OBX-8 A/N.
        verdict = present if finding.positive else absent
        assert sr_group["evaluation"][1] == (verdict.code, "SCT")
        assert str(hl7_obx(5)(1)(1)) == verdict.code
        fhir_verdict = terms.interpretation["positive" if finding.positive else "negative"]
        assert fhir_obs["interpretation"][0]["coding"][0]["code"] == fhir_verdict["fhir"].code
        # A triage-critical finding (Pneumothorax here) is AA in both, on top of the verdict in FHIR.
        flag = terms.interpretation["critical"] if finding.label in study.triage.critical else fhir_verdict
        assert fhir_obs["interpretation"][-1]["coding"][0]["code"] == flag["fhir"].code
        assert str(hl7_obx(8)) == flag["v2"].code
        # Same number.
        assert sr_group["probability"] == pytest.approx(finding.probability, abs=1e-6)
        assert fhir_obs["valueQuantity"]["value"] == pytest.approx(finding.probability, abs=1e-4)
        assert float(str(hl7_obx(9))) == pytest.approx(finding.probability, abs=1e-4)
    # Report level: the same LOINC procedure in the SR, FHIR and OBR-4.
    report = next(r for r in fhir if r["resourceType"] == "DiagnosticReport")
    assert report["code"]["coding"][0]["code"] == str(oru.segment("OBR")(4)(1)(1)) == terms.report["single_view"].code
    assert report["code"]["coding"][1]["code"] == terms.report["sr_title"].code == "18748-4"


@pytest.mark.parametrize("section", ["interpretation", "priority"])
def test_hl7_and_fhir_vocabularies_are_sourced(section):
    terms = load_terminology()
    groups = getattr(terms, section)
    assert groups, section
    for name, kinds in RAW[section].items():
        if name.startswith("_"):
            continue
        for kind, entry in kinds.items():
            assert len(entry.get("source", "")) > 20, f"{section}.{name}.{kind} has no source"
            assert groups[name][kind].code == entry["code"]
    for kind in ("v2_tq1", "v2_obr27"):
        assert terms.priority["stat"][kind].code == "S" and terms.priority["routine"][kind].code == "R"


def test_v2_table_codes_exist_in_hl7apy_v251_tables():
    from hl7apy.v2_5_1.tables import TABLES

    terms = load_terminology()
    for verdict in terms.interpretation.values():
        assert verdict["v2"].code in TABLES["HL70078"][1]
    for priority in terms.priority.values():
        assert priority["v2_tq1"].code in TABLES["HL70485"][1]
        assert priority["v2_obr27"].code in TABLES["HL70027"][1]
    assert terms.fhir["radiology_section"].code in TABLES["HL70074"][1]


def test_every_fhir_code_is_sourced():
    for key, entry in RAW["fhir"].items():
        assert len(entry.get("source", "")) > 20, key
