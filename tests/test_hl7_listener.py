"""Inbound MLLP listener: ORM^O01 orders and ADT demographics, each answered with an ACK.

The sender is python-hl7's MLLPClient (an independent implementation), over
one persistent connection, as an interface engine would send. The recorded
order then shapes the ORU Carina sends for that accession.
"""
from __future__ import annotations

import hl7
import pytest
from hl7.client import MLLPClient

from node.config import Hl7Destination, Hl7ListenerSettings
from node.db import InboundOrder, InboundPatient, Study
from node.destinations import hl7 as hl7_sender
from node.mllp_listener import MllpListener
from node.outputs.hl7_oru import encode
from peers import free_port
from pipeline_rig import PipelineRig

ORM = "\r".join([
    "MSH|^~\\&|RIS|HOSP|CARINA|RAD|20261121080000||ORM^O01^ORM_O01|ORM0001|P|2.5.1",
    "PID|1||PAT-77^^^HOSP^MR||O\\F\\Brien^Ann^M||19510203|F",
    "PV1|1|E",
    "ORC|NW|PLAC-77|FILL-77||SC",
    "TQ1|1||||||||S^Stat^HL70485",
    "OBR|1|PLAC-77|FILL-77|XRCHEST1^XR chest 1 view^L||||||||||||||ACC-77",  # OBR-18: accession
]) + "\r"
ADT = "\r".join([
    "MSH|^~\\&|ADT|HOSP|CARINA|RAD|20261121081000||ADT^A08^ADT_A01|ADT0001|P|2.5.1",
    "EVN|A08|20261121081000",
    "PID|1||PAT-77^^^HOSP^MR||O'Brien^Ann^Marie||19510203|F",
    "PV1|1|I",
]) + "\r"


@pytest.fixture
def listener(tmp_path):
    rig = PipelineRig(tmp_path)
    server = MllpListener(rig.db, Hl7ListenerSettings(enabled=True, port=free_port(), application="CARINA",
                                                      facility="RAD")).start()
    yield rig, server
    server.stop()
    rig.close()


def _ack(raw: bytes):
    assert raw.startswith(b"\x0b") and raw.endswith(b"\x1c\x0d")
    return hl7.parse(raw[1:-2].decode("utf-8"))


def test_orders_and_demographics_are_recorded_and_acked(listener):
    rig, server = listener
    with MLLPClient("127.0.0.1", server.port) as client:  # one connection, several messages
        order_ack = _ack(client.send_message(ORM))
        adt_ack = _ack(client.send_message(ADT))
    for ack, control in ((order_ack, "ORM0001"), (adt_ack, "ADT0001")):
        assert str(ack.segment("MSA")(1)) == "AA" and str(ack.segment("MSA")(2)) == control
        msh = ack.segment("MSH")
        assert str(msh(3)) == "CARINA" and str(msh(4)) == "RAD" and str(msh(12)) == "2.5.1"
    assert str(order_ack.segment("MSH")(5)) == "RIS" and str(order_ack.segment("MSH")(9)) == "ACK^O01^ACK"
    with rig.db.session() as s:
        order = s.query(InboundOrder).one()
        assert (order.accession_number, order.placer_order_number, order.filler_order_number) == \
            ("ACC-77", "PLAC-77", "FILL-77")
        assert (order.order_control, order.priority, order.patient_id) == ("NW", "S", "PAT-77")
        assert (order.procedure_code, order.procedure_text, order.procedure_system) == \
            ("XRCHEST1", "XR chest 1 view", "L")
        patient = s.get(InboundPatient, "PAT-77")
        # The ADT after the order updated the demographics (name unescaped, in DICOM PN form).
        assert (patient.name, patient.birth_date, patient.sex, patient.patient_class) == \
            ("O'Brien^Ann^Marie", "19510203", "F", "I")


def test_unsupported_and_broken_messages_are_rejected_with_a_reason(listener):
    rig, server = listener
    oru = "MSH|^~\\&|X||CARINA||20261121||ORU^R01^ORU_R01|ORU1|P|2.5.1\rPID|1||P1\r"
    no_accession = ORM.replace("|ACC-77", "|").replace("FILL-77", "")
    with MLLPClient("127.0.0.1", server.port) as client:
        rejected = _ack(client.send_message(oru))
        missing = _ack(client.send_message(no_accession))
        garbage = _ack(client.send_message("this is not HL7"))
    assert str(rejected.segment("MSA")(1)) == "AR" and str(rejected.segment("MSA")(2)) == "ORU1"
    assert "ORU^R01 is not handled" in rejected.unescape(str(rejected.segment("MSA")(3)))
    assert str(rejected.segment("ERR")(3)(1)(1)) == "200"  # Table 0357: unsupported message type
    assert str(missing.segment("MSA")(1)) == "AR" and "accession" in str(missing.segment("MSA")(3))
    assert str(garbage.segment("MSA")(1)) == "AR"
    with rig.db.session() as s:
        assert s.query(InboundOrder).count() == 0


def test_recorded_order_shapes_the_oru(listener):
    rig, server = listener
    with MLLPClient("127.0.0.1", server.port) as client:
        _ack(client.send_message(ORM))
    # The images arrive later with the accession and no patient name in the header.
    study_id, _ = rig.add_study({}, accession="ACC-77", patient_id="PAT-77", patient_name="")
    rig.encode(study_id)
    ris = Hl7Destination(name="ris", type="hl7", host="127.0.0.1", port=2575)
    with rig.db.session() as s:
        work = hl7_sender.load(rig.ctx, s, s.get(Study, study_id), ris)
    message = hl7.parse(encode(hl7_sender.message_for(rig.ctx, work)))
    obr = message.segment("OBR")
    assert str(obr(2)) == "PLAC-77" and str(obr(3)) == "FILL-77" and str(obr(18)) == "ACC-77"
    assert str(obr(4)) == "36554-4^XR Chest Single view^LN^XRCHEST1^XR chest 1 view^L"
    assert message.unescape(str(message.segment("PID")(5)(1)(1))) == "O|Brien"  # filled from the RIS
    assert str(message.segment("PV1")(2)) == "E"
