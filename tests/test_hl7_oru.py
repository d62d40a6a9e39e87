"""node.outputs.hl7_oru: the ORU^R01 itself (structure, statuses, control ids, escaping)."""
from __future__ import annotations

import dataclasses
import datetime as dt

import hl7
import numpy as np
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from dicom_factory import make_dx
from inference.types import CHESTXRAY14, Finding, ModelInfo
from node.destinations.hl7 import parse_ack
from node.outputs.hl7_oru import OrderContext, OruHeader, build_oru, control_id, encode, hd_from_system
from node.study_facts import StudyFacts
from scored_factory import scored_from_facts

ISSUED = dt.datetime(2026, 11, 21, 9, 41, 7, tzinfo=dt.timezone.utc)
DEMO = ModelInfo("densenet121-res224-all", "demo-seed0", demo=True)
REAL = ModelInfo("densenet121-res224-all", "2.0.0", demo=False, weights_sha256="ab" * 32)


def _study(**dx):
    ds = make_dx(np.full((16, 16), 100, np.uint8), **dx)
    findings = [Finding(label, 0.8 if label == "Effusion" else 0.1, 0.5, label == "Effusion") for label in CHESTXRAY14]
    return StudyFacts.from_datasets([ds]), {ds.SOPInstanceUID: findings}


def _oru(facts, findings, model=DEMO, *, study_version=1, status=None, calling_ae="MODALITY", triage=None, **kw):
    study = scored_from_facts(facts, findings, model, version=study_version, status=status, calling_ae=calling_ae,
                              triage=triage, issued=ISSUED)
    return encode(build_oru(study, **kw))


def test_message_is_valid_v251_oru_r01():
    facts, findings = _study()
    text = _oru(facts, findings, header=OruHeader("CARINA", "RADIOLOGY", "RIS", "HOSP", "T"),
                patient_authority=hd_from_system("urn:oid:1.2.3"))
    # hl7apy re-parses it strictly against the v2.5.1 ORU_R01 structure.
    parsed = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    parsed.validate()
    message = hl7.parse(text)  # and python-hl7 reads the same fields
    msh = message.segment("MSH")
    assert str(msh(3)) == "CARINA" and str(msh(4)) == "RADIOLOGY" and str(msh(5)) == "RIS" and str(msh(6)) == "HOSP"
    assert str(msh(7)) == "20261121094107+0000" and str(msh(11)) == "T" and str(msh(12)) == "2.5.1"
    assert str(message.segment("PID")(3)) == "CARINA-TEST-001^^^&1.2.3&ISO^MR"
    assert str(message.segment("PV1")(2)) == "U"
    obr = message.segment("OBR")
    assert str(obr(7)) == "20261121093000"  # study date/time
    assert str(obr(22)) == "20261121094107+0000" and str(obr(24)) == "RAD"
    assert len(message.segments("OBX")) == 14
    assert text.endswith("\r") and text.count("\r") == len(message) and "\n" not in text  # CR ends every segment


def test_control_id_is_deterministic_per_report_version():
    facts, findings = _study()
    first = hl7.parse(_oru(facts, findings)).segment("MSH")(10)
    again = hl7.parse(_oru(facts, findings)).segment("MSH")(10)
    amended = hl7.parse(_oru(facts, findings, study_version=2, status="amended")).segment("MSH")(10)
    other_route = hl7.parse(_oru(facts, findings, calling_ae="OTHER")).segment("MSH")(10)
    assert str(first) == str(again)
    assert len({str(first), str(amended), str(other_route)}) == 3
    assert len(str(first)) <= 20  # MSH-10 is ST(20) in v2.5.1
    assert control_id("r", 1) == control_id("r", 1) != control_id("r", 2)


@pytest.mark.parametrize("status,code", [("preliminary", "P"), ("amended", "C")])  # Carina never issues F
def test_result_status(status, code):
    facts, findings = _study()
    message = hl7.parse(_oru(facts, findings, status=status))
    assert str(message.segment("OBR")(25)) == code
    assert {str(obx(11)) for obx in message.segments("OBX")} == {code}


def test_unknown_status_is_refused():
    facts, findings = _study()
    with pytest.raises(ValueError):
        _oru(facts, findings, status="registered")


def test_order_context_from_an_inbound_order():
    facts, findings = _study(accession="ACC-9")
    order = OrderContext(placer_order_number="PLAC-77", filler_order_number="", procedure_code="XRCHEST1",
                         procedure_text="XR chest 1 view", procedure_system="L", patient_class="E")
    message = hl7.parse(_oru(facts, findings, order=order))
    obr, orc = message.segment("OBR"), message.segment("ORC")
    assert str(orc(1)) == "RE" and str(orc(2)) == str(obr(2)) == "PLAC-77"
    assert str(orc(3)) == str(obr(3)) == str(obr(18)) == "ACC-9"  # the accession stays the filler number
    assert str(obr(4)) == "36554-4^XR Chest Single view^LN^XRCHEST1^XR chest 1 view^L"
    assert str(message.segment("PV1")(2)) == "E"


def test_no_accession_and_missing_demographics_still_make_a_valid_message():
    facts, findings = _study(accession="", patient_name="")
    facts = dataclasses.replace(facts, patient_birth_date="", patient_sex="")
    text = _oru(facts, findings, model=REAL)
    parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True).validate()
    message = hl7.parse(text)
    assert str(message.segment("ORC")(2)) == "" and str(message.segment("OBR")(3)) == ""
    assert str(message.segment("PID")(5)) == "UNKNOWN"  # PID-5 is required
    assert "DEMO" not in text


def test_all_delimiters_are_escaped_and_come_back():
    facts, findings = _study()
    facts = dataclasses.replace(facts, patient_name="Back\\slash|Pipe^Amp&Tilde~", accession_number="A^B")
    text = _oru(facts, findings)
    pid = text.split("\r")[1]
    assert "Back\\E\\slash\\F\\Pipe^Amp\\T\\Tilde\\R\\" in pid
    message = hl7.parse(text)
    assert message.unescape(str(message.segment("PID")(5)(1)(1))) == "Back\\slash|Pipe"
    assert message.unescape(str(message.segment("PID")(5)(1)(2))) == "Amp&Tilde~"
    assert message.unescape(str(message.segment("OBR")(3))) == "A^B"


def test_ack_reading():
    ack = parse_ack("MSH|^~\\&|RIS||CARINA||20261121||ACK^R01^ACK|9|P|2.5.1\rMSA|AR|ABC|no \\F\\ order\r"
                    "ERR||||E||||patient unknown\r")  # ERR-8 user message
    assert (ack.code, ack.control_id) == ("AR", "ABC") and ack.text == "no | order | patient unknown"
    old = parse_ack("MSH|^~\\&|RIS||CARINA||20261121||ACK|9|P|2.3\nMSA|AE|XYZ\nERR|^^^207&Application error\n")
    assert (old.code, old.control_id) == ("AE", "XYZ") and "Application error" in old.text
    with pytest.raises(ValueError):
        parse_ack("MSH|^~\\&|RIS\rPID|1")
