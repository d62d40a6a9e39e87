"""HL7 v2 ORU^R01 over MLLP to a separate python-hl7 receiver process.

The receiver (tests/hl7_peer.py) parses every message with python-hl7, not
hl7apy, records it, and answers with a scripted ACK sequence. Carina's real
encode stage and worker run the deliveries: AE and silence retry, AR
dead-letters with the receiver's MSA-3 text, AA completes.
"""
from __future__ import annotations

import pytest

from hl7_peer import Hl7Peer
from inference.types import CHESTXRAY14
from node.outputs.hl7_oru import control_id
from node.report import report_id
from node.terminology import load_terminology
from peers import free_port
from pipeline_rig import PipelineRig

REJECT_TEXT = "unknown order ACC0001 | not on the worklist"


def _rig(tmp_path, port: int, **destination) -> PipelineRig:
    spec = {"name": "ris", "type": "hl7", "host": "127.0.0.1", "port": port, "sending_facility": "RADIOLOGY",
            "receiving_application": "TESTRIS", "ack_timeout_seconds": 5, "connect_timeout_seconds": 2}
    spec.update(destination)
    return PipelineRig(tmp_path, destinations=[spec])


@pytest.fixture
def peer_factory(tmp_path):
    started = []

    def start(acks: str, **kw) -> Hl7Peer:
        peer = Hl7Peer(tmp_path / "peer", acks, **kw).start()
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.stop()


def test_ae_is_retried_then_aa_completes(tmp_path, peer_factory):
    peer = peer_factory("AE,AA")
    rig = _rig(tmp_path, peer.port)
    study_id, ds = rig.add_study({"Pneumothorax": 0.91, "Cardiomegaly": 0.7}, patient_name="Müller^Jürgen")
    rig.encode(study_id)
    job = rig.run_deliveries(study_id)["ris"]
    assert (job.state, job.attempts) == ("done", 2), (job.last_error, peer.errors())
    first, second = peer.messages()
    assert [first["answered"], second["answered"]] == ["AE", "AA"]
    # The retry is the same message: same control id, derived from report and version.
    assert first == {**second, "answered": "AE"}
    assert first["control_id"] == control_id(report_id("MODALITY", ds.StudyInstanceUID), 1)
    assert first["message_type"] == "ORU^R01^ORU_R01" and first["version"] == "2.5.1"
    assert first["charset"] == "UNICODE UTF-8"
    assert first["segments"][:5] == ["MSH", "PID", "PV1", "ORC", "OBR"]
    # python-hl7 reads 14 OBX, one per finding, coded from the one terminology map.
    terms = load_terminology()
    assert len(first["obx"]) == 14
    assert [o["code"] for o in first["obx"]] == [terms.finding(label).snomed.code for label in CHESTXRAY14]
    assert {o["system"] for o in first["obx"]} == {"SCT"} and {o["value_type"] for o in first["obx"]} == {"CWE"}
    by_code = {o["code"]: o for o in first["obx"]}
    pneumothorax = by_code[terms.finding("Pneumothorax").snomed.code]
    assert pneumothorax["value"] == terms.sr["present"].code and pneumothorax["flag"] == "AA"
    assert float(pneumothorax["probability"]) == pytest.approx(0.91)
    assert by_code[terms.finding("Cardiomegaly").snomed.code]["flag"] == "A"
    assert by_code[terms.finding("Mass").snomed.code] | {"flag": "N", "value": terms.sr["absent"].code} == \
        by_code[terms.finding("Mass").snomed.code]
    assert {o["status"] for o in first["obx"]} == {"P"} and first["result_status"] == "P"
    assert first["tq1_priority"] == "S" and first["obr27_priority"] == "S"
    assert first["procedure"] == "36554-4" and first["procedure_system"] == "LN"
    assert first["placer"] == first["filler"] == "ACC0001"
    # Demographics from the DICOM header, UTF-8 intact.
    assert first["pid"] == {"id": "CARINA-TEST-001", "authority": "&1.2.826.0.1.3680043.10.1249.1&ISO",
                            "family": "Müller", "given": "Jürgen", "birth_date": "19600101", "sex": "F"}
    assert any("DEMO WEIGHTS" in note for note in first["notes"])
    rig.close()


def test_ar_goes_to_dead_letter_with_msa3(tmp_path, peer_factory):
    peer = peer_factory("AR", reject_text=REJECT_TEXT)
    rig = _rig(tmp_path, peer.port)
    study_id, _ = rig.add_study({})
    rig.encode(study_id)
    job = rig.run_deliveries(study_id)["ris"]
    assert (job.state, job.attempts) == ("dead", 1)  # no retry after AR
    # MSA-3 is the receiver's free text: in the admin-only error detail, not in last_error.
    assert "MSA-1 AR" in job.last_error and REJECT_TEXT not in job.last_error
    assert REJECT_TEXT in rig.error_detail(job)
    assert [m["answered"] for m in peer.messages()] == ["AR"]
    assert peer.messages()[0]["tq1_priority"] == "R"  # nothing critical: routine
    rig.close()


def test_no_ack_times_out_and_is_retried(tmp_path, peer_factory):
    peer = peer_factory("NONE,AA")
    rig = _rig(tmp_path, peer.port, ack_timeout_seconds=0.5)
    study_id, _ = rig.add_study({})
    rig.encode(study_id)
    job = rig.run_deliveries(study_id)["ris"]
    assert (job.state, job.attempts) == ("done", 2)
    assert [m["answered"] for m in peer.messages()] == ["NONE", "AA"]
    rig.close()


def test_unreachable_receiver_is_retried_then_dead_lettered(tmp_path):
    rig = _rig(tmp_path, free_port())
    study_id, _ = rig.add_study({})
    rig.encode(study_id)
    job = rig.run_deliveries(study_id)["ris"]
    # Deliveries give up by time (delivery.give_up_after_seconds), however many attempts that takes.
    window = rig.settings.delivery.give_up_after_seconds
    assert job.state == "dead" and job.attempts >= 2 and job.finished_at - job.retry_since >= window
    assert "ConnectionRefusedError" in job.last_error
    rig.close()


def test_delimiters_in_names_are_escaped(tmp_path, peer_factory):
    peer = peer_factory("AA")
    rig = _rig(tmp_path, peer.port)
    # | & ~ are legal in a DICOM PN; in HL7 they are delimiters and must travel escaped.
    study_id, _ = rig.add_study({}, patient_name="O|Brien&Sons~Jr^Ann", accession="A|1&2")
    rig.encode(study_id)
    assert rig.run_deliveries(study_id)["ris"].state == "done"
    message = peer.messages()[0]
    assert message["pid"]["family"] == "O|Brien&Sons~Jr" and message["pid"]["given"] == "Ann"
    assert message["placer"] == "A|1&2"
    rig.close()
