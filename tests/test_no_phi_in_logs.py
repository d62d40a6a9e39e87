"""No PHI in logs or non-PHI API fields, on the unhappy paths where it used to leak.

The README tour against real peers (`carina serve`, dcmtk storescu, Orthanc as
the PACS, the recording FHIR server as the EHR) with a study of a patient whose
name, ID and birth date are distinctive, while:

- the database fails the first C-STORE (a trigger aborts the insert of the
  study row; SQLAlchemy would print the row's parameters, PatientID included);
- the PACS refuses the AI outputs (Orthanc, not knowing Carina's AE title, aborts);
- the EHR answers 422 with an OperationOutcome that echoes the patient's name
  and birth date.

Then every line of the node's log, the CLI's job list, and every API field that
is not patient data by design (all but `patient_id` in the study view) are
searched for the name, the ID and the birth date: none may appear. The same
values are then found where they belong (the admin-only job detail, the audit
trail), so the search cannot pass because the data never arrived."""
from __future__ import annotations

import json
import sqlite3

import pytest

from dicom_factory import make_dx, write
from fhir_peer import FhirTestServer
from peers import CarinaNode, Orthanc, storescu, store_responses, wait_until

PHI_NAME = "Quillonette^Zyxwvutsrq"
PHI_ID = "PHI-7Q3ZX-ID"
PHI_BIRTH = "19030417"
FORBIDDEN = (PHI_ID, PHI_BIRTH, "1903-04-17", "Quillonette", "Zyxwvutsrq")


def _phi_found(text: str) -> list[str]:
    return [value for value in FORBIDDEN if value.lower() in text.lower()]


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
    work = tmp_path_factory.mktemp("no-phi")
    # Orthanc stores only from AE titles it knows when DicomAlwaysAllowStore is off:
    # Carina's C-STOREs are refused (Orthanc aborts the association).
    pacs = Orthanc(work / "orthanc", extra_config={"DicomAlwaysAllowStore": False}).start()
    ehr = FhirTestServer().start()
    ehr.reject = (422, f"Patient {PHI_NAME.replace('^', ' ')} (born {PHI_BIRTH}, id {PHI_ID}) is unknown here")
    node = CarinaNode(work / "carina", destinations=[
        {"name": "pacs", "type": "dicom", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port},
        {"name": "ehr", "type": "fhir", "base_url": ehr.base_url, "timeout_seconds": 10},
    ], extra={"inference": {"device": "cpu"}, "pipeline": {"max_attempts": 2}})
    try:
        node.create_token()  # admin
        node.start()
        ds = make_dx(patient_id=PHI_ID, accession="PHIACC01")
        ds.PatientName = PHI_NAME
        ds.PatientBirthDate = PHI_BIRTH
        path = write(ds, work / "phi.dcm")

        # 1. The database fails the first C-STORE.
        db = sqlite3.connect(node.workdir / "var" / "carina.db", timeout=30)
        db.execute("CREATE TRIGGER phi_db_failure BEFORE INSERT ON studies WHEN NEW.patient_id = "
                   f"'{PHI_ID}' BEGIN SELECT RAISE(ABORT, 'forced database failure'); END")
        db.commit()
        failed = storescu(node.dicom_port, path)
        assert store_responses(failed) and store_responses(failed)[0] != "Success", failed.stdout + failed.stderr
        db.execute("DROP TRIGGER phi_db_failure")
        db.commit()
        db.close()
        sent = storescu(node.dicom_port, path)
        assert store_responses(sent) == ["Success"], sent.stdout + sent.stderr

        # 2 and 3. The PACS refuses the outputs; the EHR answers 4xx echoing the patient.
        uid = ds.StudyInstanceUID
        view = wait_until(lambda: (v := node.api(f"/api/v1/studies/{uid}"))["state"] == "done"
                          and {d["destination"]: d["state"] for d in v["deliveries"]} == {"pacs": "dead", "ehr": "dead"}
                          and v, 300, what="both deliveries dead-lettered")
        yield dict(node=node, pacs=pacs, ehr=ehr, uid=uid, view=view)
    finally:
        node.stop()
        ehr.stop()
        pacs.stop()


def test_the_failures_happened(tour):
    node, view = tour["node"], tour["view"]
    assert "forced database failure" in node.log_text() or "IntegrityError" in node.log_text()
    assert any(PHI_NAME.split("^")[0] in json.dumps(body) for status, body in tour["ehr"].responses if status == 422)
    errors = {d["destination"]: d["last_error"] for d in view["deliveries"]}
    assert "HTTP 422" in errors["ehr"] and "pacs" in errors["pacs"], errors


def test_no_phi_in_the_node_log(tour):
    log = tour["node"].log_text()
    assert "SQL parameters hidden" in log  # the database error was logged, without its values
    leaks = [line for line in log.splitlines() if _phi_found(line)]
    assert leaks == [], leaks


def test_no_phi_in_non_phi_api_fields_or_the_job_list(tour):
    node, uid = tour["node"], tour["uid"]
    view = node.api(f"/api/v1/studies/{uid}")
    assert view["patient_id"] == PHI_ID  # patient data by design, shown to readers of the study
    rest = {key: value for key, value in view.items() if key != "patient_id"}
    assert _phi_found(json.dumps(rest)) == [], rest
    for path in ("/api/v1/studies", "/api/v1/jobs"):
        body = json.dumps(node.api(path))
        assert _phi_found(body) == [], (path, body[:2000])
    listing = node.carina("jobs", "list").stdout
    assert _phi_found(listing) == [], listing


def test_the_full_text_is_kept_for_admins_and_reads_are_audited(tour):
    node = tour["node"]
    ehr_job = next(j for j in tour["view"]["jobs"] if j["destination"] == "ehr")
    detail = node.api(f"/api/v1/jobs/{ehr_job['id']}")
    assert any("Quillonette" in e["detail"] for e in detail["errors"])  # the EHR's text, admins only
    assert all(not _phi_found(e["summary"]) for e in detail["errors"])
    # Every record (the waits above read the study, and each read is a record of its own).
    who = node.api(f"/api/v1/audit?patient={PHI_ID}&limit=5000")["records"]
    kinds = {r["event"] for r in who}
    # The association that brought the study is audited by the SCP callback the lead wires;
    # here: the deliveries out, the study views and the job detail just read.
    assert {"110104 DICOM Instances Transferred", "110106 Export", "110110 Patient Record"} <= kinds, kinds
    assert node.carina("audit", "verify").returncode == 0
