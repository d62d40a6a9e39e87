"""End to end through a running node: order in over MLLP, images in over DICOM,
results out to a FHIR server and two HL7 receivers, and back out through the
FHIR pull API.

`carina serve` runs as a subprocess (tests/peers.py CarinaNode) with:
- its inbound HL7 listener, fed an ORM^O01 by python-hl7's MLLPClient;
- destination `ehr` (FHIR): tests/fhir_peer.py, which commits the first
  transaction and then answers 500, so the retry must match, not duplicate;
- destination `ris` (HL7): python-hl7's asyncio MLLP server in its own
  process answering AE once, then AA;
- destination `ris-reject` (HL7): the same server answering AR.
Triage is configured with threshold 0 so the demo model's study is STAT.
"""
from __future__ import annotations

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import OperationOutcome
from fhirpy.base.searchset import Raw
from hl7.client import MLLPClient

from dicom_factory import make_dx, write
from fhir_peer import FhirTestServer
from hl7_peer import Hl7Peer
from inference.types import CHESTXRAY14
from node.outputs.fhir_report import TRIAGE_PRIORITY_URL
from node.terminology import load_terminology
from peers import CarinaNode, free_port, storescu, wait_until

TOKEN_ENV = "CARINA_E2E_EHR_TOKEN"
REJECT = "order ORD-E2E cancelled in the RIS"
ORM = "\r".join([
    "MSH|^~\\&|RIS|HOSP|CARINA|RAD|20261121080000||ORM^O01^ORM_O01|ORM-E2E|P|2.5.1",
    "PID|1||E2E-PAT^^^HOSP^MR||Tester^Eve||19700101|F",
    "ORC|NW|ORD-E2E|E2E-ACC",
    "OBR|1|ORD-E2E|E2E-ACC|XRCHEST1^XR chest 1 view^L||||||||||||||E2E-ACC",
]) + "\r"


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    work = tmp_path_factory.mktemp("push-e2e")
    ehr = FhirTestServer(token="e2e-token").start()
    ehr.commit_then_fail = 1
    ris = Hl7Peer(work / "ris", "AE,AA").start()
    rejecting = Hl7Peer(work / "ris-reject", "AR", reject_text=REJECT).start()
    listener_port = free_port()
    node = CarinaNode(
        work / "carina",
        destinations=[
            {"name": "ehr", "type": "fhir", "base_url": ehr.base_url,
             "auth": {"type": "bearer", "token_env": TOKEN_ENV}},
            {"name": "ris", "type": "hl7", "host": "127.0.0.1", "port": ris.port, "ack_timeout_seconds": 10},
            {"name": "ris-reject", "type": "hl7", "host": "127.0.0.1", "port": rejecting.port},
        ],
        extra={"triage": {"critical_findings": ["Pneumothorax"], "threshold": 0.0},
               "hl7_listener": {"enabled": True, "host": "127.0.0.1", "port": listener_port}},
    )
    node.create_token()
    mp = pytest.MonkeyPatch()
    mp.setenv(TOKEN_ENV, "e2e-token")  # the secret reaches the node only through its environment
    try:
        node.start()
        with MLLPClient("127.0.0.1", listener_port) as client:
            ack = client.send_message(ORM)
        assert b"MSA|AA|ORM-E2E" in ack, ack
        dx = make_dx(patient_id="E2E-PAT", accession="E2E-ACC", patient_name="Tester^Eve")
        sent = storescu(node.dicom_port, write(dx, work / "dx.dcm"))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        view = wait_until(
            lambda: (v := node.api(f"/api/v1/studies/{dx.StudyInstanceUID}"))["state"] == "done"
            and len(v["deliveries"]) == 3 and all(d["state"] in ("done", "dead") for d in v["deliveries"]) and v,
            180, what="study done and all three deliveries settled",
        )
        yield dict(node=node, ehr=ehr, ris=ris, rejecting=rejecting, dx=dx, view=view)
    finally:
        mp.undo()
        node.stop()
        ris.stop()
        rejecting.stop()
        ehr.stop()


def _delivery(view, name):
    return next(d for d in view["deliveries"] if d["destination"] == name)


def test_fhir_push_retry_after_commit_creates_nothing_new(running):
    ehr, view = running["ehr"], running["view"]
    delivery = _delivery(view, "ehr")
    assert (delivery["state"], delivery["attempts"]) == ("done", 2), delivery
    assert [status for status, _ in ehr.responses] == [500, 200]
    assert ehr.counts() == {"DiagnosticReport": 1, "Observation": 14, "Device": 1, "ImagingStudy": 1,
                            "Provenance": 1}
    assert {e["response"]["status"] for e in ehr.responses[1][1]["entry"]} == {"200 OK"}
    for bundle in ehr.bundles:
        Bundle.model_validate(bundle)
    report = ehr.of_type("DiagnosticReport")[0]
    assert report["status"] == "preliminary"
    assert report["basedOn"][0]["identifier"]["value"] == "E2E-ACC"
    priority = next(e for e in report["extension"] if e["url"] == TRIAGE_PRIORITY_URL)
    assert priority["valueCodeableConcept"]["coding"][0]["code"] == "stat"


def test_hl7_push_ae_then_aa(running):
    ris, view = running["ris"], running["view"]
    delivery = _delivery(view, "ris")
    assert (delivery["state"], delivery["attempts"]) == ("done", 2), (delivery, ris.errors())
    messages = ris.messages()
    assert [m["answered"] for m in messages] == ["AE", "AA"]
    assert messages[0]["control_id"] == messages[1]["control_id"]
    terms = load_terminology()
    for message in messages:
        assert [o["code"] for o in message["obx"]] == [terms.finding(label).snomed.code for label in CHESTXRAY14]
    message = messages[-1]
    assert message["pid"]["id"] == "E2E-PAT" and message["pid"]["family"] == "Tester"
    assert message["placer"] == "ORD-E2E" and message["filler"] == "E2E-ACC"  # from the inbound order
    assert message["tq1_priority"] == "S" and message["obr27_priority"] == "S"
    pneumothorax = next(o for o in message["obx"] if o["code"] == terms.finding("Pneumothorax").snomed.code)
    assert pneumothorax["flag"] == "AA"


def test_hl7_push_ar_goes_to_dead_letter(running):
    delivery = _delivery(running["view"], "ris-reject")
    assert (delivery["state"], delivery["attempts"]) == ("dead", 1)
    # The RIS's MSA-3 text stays out of last_error (it may name the patient); admins read it in the job detail.
    assert "AR" in delivery["last_error"] and REJECT not in delivery["last_error"]
    jobs = running["node"].carina("jobs", "list").stdout
    assert "ris-reject" in jobs and REJECT not in jobs
    job_id = next(j["id"] for j in running["view"]["jobs"] if j["destination"] == "ris-reject")
    detail = running["node"].api(f"/api/v1/jobs/{job_id}")
    assert any(REJECT in e["detail"] for e in detail["errors"])


def test_ehr_pulls_the_same_report_from_the_node(running):
    node = running["node"]
    client = SyncFHIRClient(f"{node.url}/fhir", authorization=f"Bearer {node.token}")
    bundle = (
        client.resources("DiagnosticReport")
        .search(Raw(**{"based-on:identifier": "E2E-ACC"}))
        .include("DiagnosticReport", "subject")
        .revinclude("Provenance", "target")
        .fetch_raw()
    )
    types = sorted(e.resource.resourceType for e in bundle.entry)
    assert types == ["DiagnosticReport", "Patient", "Provenance"]
    report = next(e.resource for e in bundle.entry if e.resource.resourceType == "DiagnosticReport")
    pushed = running["ehr"].of_type("DiagnosticReport")[0]
    assert report.conclusion == pushed["conclusion"] and report.identifier[1].value == pushed["identifier"][1]["value"]
    with pytest.raises(OperationOutcome) as err:  # only based-on:identifier is supported
        client.resources("DiagnosticReport").search(Raw(**{"based-on": "ServiceRequest/1"})).fetch()
    assert "based-on" in str(err.value)
