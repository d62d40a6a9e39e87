"""FHIR push: transaction Bundles with conditional create/update to a real HTTP FHIR server.

The peer (tests/fhir_peer.py) implements R4 conditional semantics itself, so
"a re-send creates nothing new" is observed on the server, not assumed. The
deliver jobs run through Carina's real encode stage and worker (retry, backoff,
dead-letter).
"""
from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from fhir.resources.R4B.bundle import Bundle

from dicom_factory import make_dx
from fhir_peer import FhirTestServer
from node.db import Study
from node.destinations import fhir as fhir_sender
from node.destinations.fhir import transaction_bundle
from node.outputs.fhir_report import build_report_resources, validate
from scored_factory import scored_study
from peers import free_port
from pipeline_rig import DEMO, PATIENT_SYSTEM, PipelineRig, image_result

TOKEN_ENV = "CARINA_TEST_EHR_TOKEN"
PASSWORD_ENV = "CARINA_TEST_EHR_PASSWORD"
EXPECTED = {"DiagnosticReport": 1, "Observation": 14, "Device": 1, "ImagingStudy": 1, "Provenance": 1}


@pytest.fixture
def server():
    peer = FhirTestServer(token="ehr-secret-token").start()
    yield peer
    peer.stop()


def _rig(tmp_path, base_url: str, **destination) -> PipelineRig:
    spec = {"name": "ehr", "type": "fhir", "base_url": base_url,
            "auth": {"type": "bearer", "token_env": TOKEN_ENV}, "timeout_seconds": 5}
    spec.update(destination)
    return PipelineRig(tmp_path, destinations=[spec])


def _statuses(server, index: int) -> list[str]:
    status, body = server.responses[index]
    assert status == 200, body
    return [entry["response"]["status"] for entry in body["entry"]]


def _assert_valid_transaction(bundle: dict) -> None:
    Bundle.model_validate(bundle)
    assert bundle["type"] == "transaction"
    for entry in bundle["entry"]:
        resource = dict(entry["resource"])
        resource.setdefault("id", "x")  # conditional entries carry no id; the model check needs none either
        validate(resource)


def test_bundle_is_conditional_and_self_contained():
    ds = make_dx(np.tile(np.linspace(20, 230, 64, dtype=np.uint8), (64, 1)), patient_id="PUSH-1")
    result = image_result(ds, {"Effusion": 0.8})
    study = scored_study([(ds, result)], model=DEMO, calling_ae="MOD",
                         issued=dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc))
    resources = build_report_resources(study, patient_system=PATIENT_SYSTEM)
    bundle = transaction_bundle(resources)
    _assert_valid_transaction(bundle)
    requests = {e["resource"]["resourceType"]: e["request"] for e in bundle["entry"]}
    report = next(r for r in resources if r["resourceType"] == "DiagnosticReport")
    assert requests["DiagnosticReport"] == {
        "method": "PUT", "url": f"DiagnosticReport?identifier=urn:ietf:rfc:3986|urn:uuid:{report['id']}"}
    assert requests["Observation"]["method"] == "PUT"
    assert requests["Device"]["method"] == "POST" and requests["Device"]["ifNoneExist"].startswith(
        "identifier=urn:dicom:uid|urn:oid:2.25.")
    assert requests["ImagingStudy"] == {"method": "POST", "url": "ImagingStudy",
                                        "ifNoneExist": f"identifier=urn:dicom:uid|urn:oid:{ds.StudyInstanceUID}"}
    provenance = next(r for r in resources if r["resourceType"] == "Provenance")
    assert requests["Provenance"] == {"method": "PUT", "url": f"Provenance/{provenance['id']}"}
    assert "Patient" not in requests  # the EHR owns its patients ...
    sent_report = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    assert sent_report["subject"] == {"identifier": {"system": PATIENT_SYSTEM, "value": "PUSH-1"}}  # ... by identifier
    assert "id" not in sent_report and "versionId" not in sent_report["meta"]
    assert sent_report["meta"]["security"][0]["code"] == "AIAST"  # the AI label travels
    full_urls = {e["fullUrl"] for e in bundle["entry"]}
    assert all(ref["reference"] in full_urls for ref in sent_report["result"] + sent_report["imagingStudy"])
    # Opting in: the Patient is conditionally created and referenced inside the Bundle.
    with_patient = transaction_bundle(resources, send_patient=True)
    _assert_valid_transaction(with_patient)
    patient_entry = next(e for e in with_patient["entry"] if e["resource"]["resourceType"] == "Patient")
    assert patient_entry["request"] == {"method": "POST", "url": "Patient",
                                        "ifNoneExist": f"identifier={PATIENT_SYSTEM}|PUSH-1"}
    report_entry = next(e for e in with_patient["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    assert report_entry["resource"]["subject"]["reference"] == patient_entry["fullUrl"]


def test_redelivery_after_failures_creates_nothing_new(tmp_path, server, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "ehr-secret-token")
    server.outage = 1  # first attempt: 500, nothing stored
    server.commit_then_fail = 1  # second: stored, then 500 - the sender cannot know it arrived
    rig = _rig(tmp_path, server.base_url)
    study_id, _ = rig.add_study({"Pneumothorax": 0.93})
    rig.encode(study_id)
    job = rig.run_deliveries(study_id)["ehr"]
    assert (job.state, job.attempts) == ("done", 3)
    assert [status for status, _ in server.responses] == [500, 500, 200]
    assert server.counts() == EXPECTED
    # The third transaction matched everything the second one created: no 201 at all.
    assert set(_statuses(server, 2)) == {"200 OK"}
    for bundle in server.bundles:
        _assert_valid_transaction(bundle)
    assert server.bundles[1] == server.bundles[2]  # a retry resends the same content
    report = server.of_type("DiagnosticReport")[0]
    assert report["meta"]["versionId"] == "2"  # updated in place by the retry
    # References were resolved to the server's ids.
    observation_ids = {o["id"] for o in server.of_type("Observation")}
    assert {ref["reference"].split("/")[1] for ref in report["result"]} == observation_ids
    assert report["subject"] == {"identifier": {"system": PATIENT_SYSTEM, "value": "CARINA-TEST-001"}}

    # Sending the same version once more (e.g. an operator's resend) changes nothing either.
    with rig.db.session() as s:
        work = fhir_sender.load(rig.ctx, s, s.get(Study, study_id), rig.settings.destinations[0])
    fhir_sender.send(rig.ctx, work)
    assert server.counts() == EXPECTED and set(_statuses(server, 3)) == {"200 OK"}
    rig.close()


def test_rerun_updates_the_report_in_place(tmp_path, server, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "ehr-secret-token")
    rig = _rig(tmp_path, server.base_url)
    study_id, ds = rig.add_study({"Effusion": 0.8})
    rig.encode(study_id)
    rig.run_deliveries(study_id)
    report_before = server.of_type("DiagnosticReport")[0]
    rig.rescore(study_id, ds, {"Effusion": 0.85, "Pneumothorax": 0.9})
    rig.encode(study_id)
    jobs = rig.run_deliveries(study_id)
    assert jobs["ehr"].state == "done" and jobs["ehr"].study_version == 2
    # Same report and observations, updated; only the new AI run's Provenance is new.
    assert server.counts() == {**EXPECTED, "Provenance": 2}
    report = server.of_type("DiagnosticReport")[0]
    assert report["id"] == report_before["id"] and report["status"] == "amended"
    assert "Pneumothorax" in report["conclusion"]
    statuses = _statuses(server, 1)
    assert statuses.count("201 Created") == 1  # the Provenance
    rig.close()


def test_client_error_goes_to_dead_letter_with_the_servers_text(tmp_path, server, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "ehr-secret-token")
    server.reject = (422, "DiagnosticReport.subject: patient CARINA-TEST-001 is unknown here")
    rig = _rig(tmp_path, server.base_url)
    study_id, _ = rig.add_study({})
    rig.encode(study_id)
    job = rig.run_deliveries(study_id)["ehr"]
    assert (job.state, job.attempts) == ("dead", 1)  # 4xx: no retry
    # The server's text echoes a patient: kept for admins in the job's error detail, never in last_error.
    assert "HTTP 422" in job.last_error and "CARINA-TEST-001" not in job.last_error
    assert "patient CARINA-TEST-001 is unknown here" in rig.error_detail(job)
    assert server.store == {}
    rig.close()


def test_authentication_from_the_environment(tmp_path, server, monkeypatch):
    rig = _rig(tmp_path, server.base_url)
    study_id, _ = rig.add_study({})
    rig.encode(study_id)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    job = rig.run_deliveries(study_id)["ehr"]
    assert job.state == "dead" and TOKEN_ENV in job.last_error and "not set" in job.last_error
    assert server.responses == []  # nothing was sent without credentials
    rig.close()

    rig = _rig(tmp_path / "wrong", server.base_url)
    study_id, _ = rig.add_study({})
    rig.encode(study_id)
    monkeypatch.setenv(TOKEN_ENV, "not-the-token")
    job = rig.run_deliveries(study_id)["ehr"]
    assert job.state == "dead" and "HTTP 401" in job.last_error and "authentication required" in rig.error_detail(job)
    rig.close()


def test_basic_authentication(tmp_path, monkeypatch):
    peer = FhirTestServer(basic=("carina", "pa55|word")).start()
    try:
        monkeypatch.setenv(PASSWORD_ENV, "pa55|word")
        rig = _rig(tmp_path, peer.base_url, auth={"type": "basic", "username": "carina", "password_env": PASSWORD_ENV})
        study_id, _ = rig.add_study({})
        rig.encode(study_id)
        assert rig.run_deliveries(study_id)["ehr"].state == "done"
        assert peer.counts() == EXPECTED
        rig.close()
    finally:
        peer.stop()


def test_unreachable_server_is_retried_then_dead_lettered(tmp_path, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "x")
    rig = _rig(tmp_path, f"http://127.0.0.1:{free_port()}/fhir")
    study_id, _ = rig.add_study({})
    rig.encode(study_id)
    job = rig.run_deliveries(study_id)["ehr"]
    # Deliveries give up by time (delivery.give_up_after_seconds), however many attempts that takes.
    window = rig.settings.delivery.give_up_after_seconds
    assert job.state == "dead" and job.attempts >= 2 and job.finished_at - job.retry_since >= window
    assert "ConnectError" in job.last_error
    with rig.db.session() as s:
        assert s.get(Study, study_id).state == "done"  # a failed delivery does not fail the study
    rig.close()


def test_secrets_are_never_in_the_configuration():
    from node.config import Settings

    with pytest.raises(Exception) as err:
        Settings(destinations=[{"name": "ehr", "type": "fhir", "base_url": "https://ehr.example.org/fhir",
                                "auth": {"type": "bearer", "token_env": "eyJhbGciOi.JIUzI1NiJ9.token"}}])
    assert "environment variable" in str(err.value)
    with pytest.raises(Exception):
        Settings(destinations=[{"name": "ehr", "type": "fhir", "base_url": "https://ehr.example.org/fhir",
                                "auth": {"type": "bearer", "token": "literal-secret"}}])
    with pytest.raises(Exception):
        Settings(destinations=[{"name": "ehr", "type": "fhir", "base_url": "ftp://ehr"}])
    with pytest.raises(Exception) as err:
        Settings(destinations=[{"name": "x", "type": "fhir", "base_url": "http://a/fhir"},
                               {"name": "x", "type": "hl7", "host": "h", "port": 1}])
    assert "unique" in str(err.value)
